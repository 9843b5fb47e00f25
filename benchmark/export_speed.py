"""Inference speed of the exported ONNX generator in onnxruntime beside the PyTorch path.

    python -m benchmark.export_speed                   # default model, fresh weights, 256x256
    python -m benchmark.export_speed --model_path checkpoints/generator.pth --calls 20

The checkpoint is exported with export.py (its parity check included) into a temporary folder;
then inference.Translator translates the same 256x256 label maps with the PyTorch generator
(fp32, and --precision auto where that differs) and with onnxruntime, batch 1 and 4, the
runtimes taking turns call by call so that a changing load on the machine hits them alike.
Each figure is images / median seconds per call, over --calls calls after 2 warm-up calls;
both runtimes use PyTorch's number of threads.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BATCH_SIZES = (1, 4)


def time_calls(translators, maps, calls, warmup=2):
    """{name: [seconds per call]}, the translators taking turns call by call."""
    seconds = {name: [] for name in translators}
    for k in range(warmup + calls):
        for name, translator in translators.items():
            started = time.perf_counter()
            translator.translate(maps)
            if k >= warmup:
                seconds[name].append(time.perf_counter() - started)
    return seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model_path", default=None,
                        help="checkpoint to export (default: fresh default-size weights)")
    parser.add_argument("--calls", type=int, default=10, help="timed calls per batch size")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch

    import devices
    import export
    from benchmark.latency import fresh_checkpoint, machine_line
    from demo.data import real_profile_pair
    from inference import Translator, load_generator

    with tempfile.TemporaryDirectory() as folder:
        model_path = args.model_path or fresh_checkpoint(Path(folder) / "generator.pth")
        export.export(model_path, Path(folder) / "generator.onnx")
        generator, config = load_generator(model_path)
        onnx_generator, _ = load_generator(Path(folder) / "generator.onnx")
    auto, _ = devices.resolve_precision("auto", "cpu")
    translators = {"pytorch fp32": Translator(generator, config, "cpu", precision="fp32"),
                   "onnxruntime fp32": Translator(onnx_generator, config, "cpu")}
    if auto != "fp32":
        translators[f"pytorch {auto} (auto)"] = Translator(generator, config, "cpu",
                                                           precision=auto)
    rng = np.random.default_rng(0)
    maps = [real_profile_pair(rng, 256)[0] for _ in range(max(BATCH_SIZES))]
    print(f"machine: {machine_line()}, {torch.get_num_threads()} threads\n"
          f"weights: {args.model_path or 'freshly initialised default-size generator'}\n"
          f"256x256 label maps through inference.Translator, median of {args.calls} calls\n")
    print(f"{'runtime':<24}{'batch':>6}{'img/s':>10}{'vs pytorch fp32':>17}")
    for batch_size in BATCH_SIZES:
        seconds = time_calls(translators, maps[:batch_size], args.calls)
        rates = {name: batch_size / statistics.median(s) for name, s in seconds.items()}
        for name, rate in rates.items():
            print(f"{name:<24}{batch_size:>6}{rate:>10.2f}"
                  f"{rate / rates['pytorch fp32']:>16.2f}x")


if __name__ == "__main__":
    main()
