"""Speed of training and inference under each speed option, measured side by side.

    python -m benchmark.speed --quick          # small sizes: a minute or two on 2 CPU cores
    python -m benchmark.speed                  # default model, 256x256: ~40 min on 2 cores
    python -m benchmark.speed --configs fp32,bf16+cl --batch_sizes 4 --repeats 5
    python -m benchmark.speed --equivalence    # fixed-seed demo runs: validation L1 per option
    python -m benchmark.speed --device cuda    # on a GPU: batch 16 and 64, MFU, loader headroom

A configuration is option names joined by "+" (`bf16+fused+cl+data`). `fp32` alone is the plain
baseline: fp32, eager, NCHW, PyTorch's default (multi-tensor) Adam stepped after backward, every
image decoded in the training process each time it is used, and inference one image after
another with no overlapped file work. `inbwd` is --step_in_backward.

Every measurement runs in a subprocess of its own (so its peak memory is its own, loader workers
included), configurations take turns (A B C A B C ...) so that a changing load on the machine hits
all of them alike, and each figure is the median over --repeats runs, with its spread. Training
runs train.py itself: its JSON log (one entry per step) gives each step's seconds, and the first
--warmup_steps are left out. Folder inference runs inference.py: the PNGs' modification times give
its steady rate, the first batch left out. FLOPs are counted by FlopCounterMode on one real
training step and one generator forward.
"""

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmark.configs import (DEFAULT_CONFIGS, EQUIVALENCE_CONFIGS, OPTIONS, PLAIN_TRAIN,
                               QUICK_CONFIGS, as_config_dict, loader_options, measured_as,
                               model_of, parse_config, slug, unique_configs)
from benchmark.report import print_tables, report
from benchmark.runs import run_child, train_steps

REPO = Path(__file__).resolve().parents[1]


# --- The benchmark --------------------------------------------------------------------------------

def machine_info(device):
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "threads": torch.get_num_threads(), "device": device}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                           if line.startswith("model name"))
        flags = set(next(line for line in cpuinfo.splitlines()
                         if line.startswith("flags")).split())
        info["cpu_flags"] = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_fp16",
                                            "amx_bf16", "amx_tile", "amx_fp16"})
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def prepare_inputs(args, workdir):
    """The synthetic data set (no epoch ends within a training run), and a folder to translate."""
    from demo.data import write_demo_dataset
    pairs = max(args.batch_sizes) * (args.warmup_steps + args.steps + 1)
    write_demo_dataset(workdir / "data", num_train=pairs, num_val=2, size=args.image_size)
    write_demo_dataset(workdir / "to_translate", num_train=args.infer_images, num_val=1,
                       size=args.image_size, seed=1)


def train_argv(args, workdir, run, flags):
    return ["--data_dir", str(workdir / "data"), "--image_size", str(args.image_size),
            "--generator_channels", str(args.channels), "--discriminator_channels",
            str(args.channels), "--device", args.device,
            # One log entry per step on the CPU; on a GPU, reading the losses every step would
            # make the CPU wait for the GPU each time, which the loop otherwise avoids.
            "--log_every_steps", "1" if args.device == "cpu" else "5",
            "--sample_every_steps", "0", "--checkpoint_every_steps", "0", "--num_samples", "1",
            "--checkpoint_dir", str(run / "checkpoints"), "--log_file", str(run / "log.json"),
            "--sample_dir", str(run / "samples"), *flags]


def run_training(args, workdir, kind, name, batch_size, tag, env, extra_steps=0, **spec):
    """train.py through the `kind` child ("train" or "profile") for warm-up + timed steps;
    returns (the child's result, seconds of each step after the warm-up)."""
    run = workdir / "runs" / f"{kind}_{slug(name)}_b{batch_size}{tag}"
    flags, _, config_env = parse_config(name)
    argv = train_argv(args, workdir, run, flags) + [
        "--batch_size", str(batch_size), "--overwrite",
        "--max_steps", str(args.warmup_steps + args.steps + extra_steps)]
    result = run_child(kind, {"argv": argv, "device": args.device, **spec}, run,
                       {**env, **config_env})
    steps, first = train_steps(run / "log.json", args.warmup_steps)
    remove_tree(run / "checkpoints")  # hundreds of MB each at 256x256
    return {**result, "first_step_s": first}, steps


def measure_train(args, workdir, name, batch_size, rep, env):
    result, steps = run_training(args, workdir, "train", name, batch_size, f"_r{rep}", env)
    return {"img_s": batch_size / statistics.median(steps), "step_s": statistics.median(steps),
            "first_step_s": result["first_step_s"], "wall_s": result["wall_s"],
            "peak_mib": result["tree_peak_rss_mib"], "main_maxrss_mib": result["maxrss_mib"],
            "cuda_peak_mib": result.get("cuda_peak_mib")}


def measure_profile(args, workdir, name, env):
    """Seconds per training step in convolutions, in the optimisers and in the rest, at the
    largest batch size (under torch.profiler, so slightly slower than measure_train's)."""
    result, _ = run_training(args, workdir, "profile", name, max(args.batch_sizes), "", env,
                             extra_steps=1, warmup_steps=args.warmup_steps, steps=args.steps)
    return result["profile"]  # seconds per step of the profiled window, by kind


def measure_loader(args, workdir, name, rep):
    run = workdir / "runs" / f"loader_{slug(name)}_r{rep}"
    flags, _, env = parse_config(name)
    config = {**as_config_dict(train_argv(args, workdir, run, flags)), "num_samples": 1}
    spec = {"config": config, "batch_sizes": args.batch_sizes, "device": args.device,
            "batches": args.warmup_steps + args.steps}
    return run_child("loader", spec, run, env)["loader_img_s"]


def measure_inference(args, workdir, name, rep, env):
    run = workdir / "runs" / f"inference_{slug(name)}_r{rep}"
    argv = ["--input_dir", str(workdir / "to_translate" / "train"),
            "--model_path", str(workdir / f"generator_{model_of(name)}.pth"),
            "--device", args.device, "--input_layout", "side_by_side", "--label_side", "right",
            *parse_config(name)[1]]
    spec = {"argv": argv, "batch_sizes": args.infer_batch_sizes, "device": args.device,
            "output_dir": str(run / "outputs")}
    result = run_child("inference", spec, run, {**env, **parse_config(name)[2]})["inference"]
    remove_tree(run / "outputs")
    return result


def measure_forward(args, workdir, name, rep, env):
    run = workdir / "runs" / f"forward_{slug(name)}_r{rep}"
    precision, channels_last = forward_options(name, args.device)
    spec = {"checkpoint": str(workdir / f"generator_{model_of(name)}.pth"), "device": args.device,
            "image_size": args.image_size, "channels_last": channels_last,
            "compile": "compile" in name.split("+"), "precision": precision,
            "fold": bool({"default", "fold"} & set(name.split("+"))),
            "batch_sizes": args.infer_batch_sizes, "warmup": 2, "iterations": args.steps}
    return run_child("forward", spec, run, {**env, **parse_config(name)[2]})["forward"]


def forward_options(name, device):
    """(precision, channels_last) of a configuration's bare forward: `default` as inference.py
    decides them by default (for `device`), the named options over that."""
    import devices
    options = name.split("+")
    precision = devices.resolve_precision("auto", device)[0] if "default" in options else "fp32"
    precision = next((p for p in ("bf16", "fp16") if p in options), precision)
    channels_last = "on" if "cl" in options else "off" if "nocl" in options else \
        "auto" if "default" in options else "off"
    return precision, devices.resolve_channels_last(channels_last, device, precision)


def remove_tree(path):
    import shutil
    shutil.rmtree(path, ignore_errors=True)


def run_benchmark(args, workdir):
    import torch  # noqa: F401  (the parent only builds inputs; children measure)
    info = machine_info(args.device)
    prepare_inputs(args, workdir)
    # One compile cache for the whole benchmark: the first run of a compiled configuration
    # starts cold, later ones warm (see first_step_s).
    env = {"TORCHINDUCTOR_CACHE_DIR": str(workdir / "inductor_cache")}
    flops = {}  # per model ("default", "paper"): FLOPs of a training step and a forward
    for model in dict.fromkeys(model_of(name) for name in args.configs):
        flops_run = workdir / "runs" / f"flops_{model}"
        preset = ["--preset", "paper"] if model == "paper" else []
        flops[model] = run_child("flops", {
            "argv": train_argv(args, workdir, flops_run, PLAIN_TRAIN + preset),
            "batch_sizes": args.batch_sizes, "device": args.device}, flops_run)
        flops[model]["train_step"] = {int(k): v for k, v in flops[model]["train_step"].items()}
        # Inference translates with the generator that run saved (one step trained).
        (flops_run / "checkpoints" / "generator.pth").replace(workdir / f"generator_{model}.pth")
        remove_tree(flops_run / "checkpoints")
    measured = {part: unique_configs(args.configs, part) for part in args.parts}
    raw = {"train": {}, "loader": {}, "inference": {}, "forward": {}, "profile": {}}
    for rep in range(args.repeats):
        print(f"repetition {rep + 1}/{args.repeats}", flush=True)
        for name in measured.get("train", []):
            for batch_size in args.batch_sizes:
                result = measure_train(args, workdir, name, batch_size, rep, env)
                raw["train"].setdefault((name, batch_size), []).append(result)
                print(f"  train {name:<32} batch {batch_size:<3} {result['img_s']:8.2f} img/s",
                      flush=True)
        for name in measured.get("profile", []) if rep == 0 else []:  # one run: shares
            raw["profile"][name] = measure_profile(args, workdir, name, env)
        for name in measured.get("loader", []):
            for batch_size, img_s in measure_loader(args, workdir, name, rep).items():
                raw["loader"].setdefault((name, int(batch_size)), []).append(img_s)
        for part, measure in (("inference", measure_inference), ("forward", measure_forward)):
            for name in measured.get(part, []):
                for batch_size, result in measure(args, workdir, name, rep, env).items():
                    raw[part].setdefault((name, int(batch_size)), []).append(result)
                    rate = result["img_s"] if part == "inference" else \
                        int(batch_size) / result["seconds"]
                    print(f"  {part} {name:<28} batch {batch_size:<3} {rate:8.2f} img/s",
                          flush=True)
    return {"machine": info, "settings": settings_of(args), "flops": flops,
            "same_as": {part: {name: first for name in args.configs
                               if (first := measured_as(args.configs, part, name)) != name}
                        for part in measured},
            **report(args, info, raw, flops,
                     {name: measured_as(args.configs, "loader", name) for name in args.configs},
                     {name: loader_options(name) for name in args.configs})}


def settings_of(args):
    return {k: v for k, v in vars(args).items() if k not in ("output", "workdir")}


# --- Equivalence: does each option train to the same quality? ------------------------------------

def run_equivalence(args, workdir):
    """The demo run (128x128, batch 4, fixed seed) for each configuration: loss curves and the
    final validation L1, compared with the first configuration's (within 10%?)."""
    epochs = max(1, math.ceil(args.equivalence_steps / 50))  # the demo set: 50 steps per epoch
    results = {}
    for name in args.configs:
        run = workdir / "runs" / f"equivalence_{slug(name)}"
        command = [sys.executable, str(REPO / "train.py"), "--demo", "--data_dir",
                   str(workdir / "demo_data"), "--epochs", str(epochs), "--device", args.device,
                   "--checkpoint_dir", str(run / "checkpoints"), "--log_file",
                   str(run / "log.json"), "--sample_dir", str(run / "samples"), "--overwrite",
                   *parse_config(name)[0]]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, check=False,
                              env={**os.environ, **parse_config(name)[2]})
        if done.returncode != 0:
            raise RuntimeError(f"{name}: the demo run failed:\n{done.stderr[-1500:]}")
        log = json.loads((run / "log.json").read_text())
        results[name] = {
            "seconds": time.perf_counter() - start,
            "val_l1_per_epoch": [round(e["val_l1"], 5) for e in log["epochs"]],
            "g_l1_every_50_steps": [round(e["g_l1"], 5) for e in log["steps"]
                                    if e["step"] % 50 == 0],
            "d_loss_every_50_steps": [round((e["d_real"] + e["d_fake"]) / 2, 5)
                                      for e in log["steps"] if e["step"] % 50 == 0],
            "final_val_l1": log["epochs"][-1]["val_l1"]}
        base = results[args.configs[0]]["final_val_l1"]
        results[name]["relative_to_first"] = results[name]["final_val_l1"] / base - 1
        results[name]["within_10_percent"] = abs(results[name]["relative_to_first"]) <= 0.10
        print(f"{name:<30} final val L1 {results[name]['final_val_l1']:.4f} "
              f"({results[name]['relative_to_first']:+.1%} vs {args.configs[0]}), "
              f"val L1 per epoch {results[name]['val_l1_per_epoch']}, "
              f"{results[name]['seconds']:.0f} s", flush=True)
    return {"machine": machine_info(args.device), "settings": settings_of(args),
            "equivalence": results}


# --- Command line ---------------------------------------------------------------------------------

# Per device, then what --quick changes; a flag given on the command line wins over both.
DEFAULTS = {
    "cpu": {"configs": DEFAULT_CONFIGS["cpu"], "batch_sizes": "1,4", "infer_batch_sizes": "1,8",
            "image_size": 256, "steps": 6, "warmup_steps": 2, "repeats": 3, "infer_images": 48},
    "cuda": {"configs": DEFAULT_CONFIGS["cuda"], "batch_sizes": "16,64",
             "infer_batch_sizes": "1,8,64", "image_size": 256, "steps": 20, "warmup_steps": 5,
             "repeats": 3, "infer_images": 256},
}
PARTS = ("train", "profile", "loader", "inference", "forward")
QUICK = {"configs": QUICK_CONFIGS, "batch_sizes": "4", "image_size": 64, "steps": 4,
         "warmup_steps": 2, "repeats": 2, "infer_images": 32}


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--configs", help="comma-separated; the first is the baseline "
                        f"(options: {', '.join(OPTIONS)}; default on the CPU: "
                        f"{DEFAULT_CONFIGS['cpu']})")
    parser.add_argument("--batch_sizes", help="training batch sizes (CPU 1,4; CUDA 16,64)")
    parser.add_argument("--infer_batch_sizes", help="inference batch sizes (CPU 1,8; CUDA 1,8,64)")
    parser.add_argument("--image_size", type=int, help="training and inference size (256)")
    parser.add_argument("--channels", type=int, default=64,
                        help="width of both networks' first layer (64: the default model)")
    parser.add_argument("--steps", type=int, help="timed training steps / forward calls")
    parser.add_argument("--warmup_steps", type=int, help="training steps left out of timing")
    parser.add_argument("--repeats", type=int, help="runs of each measurement (interleaved)")
    parser.add_argument("--infer_images", type=int, help="images in the translated folder")
    parser.add_argument("--parts", default="train,profile,loader,inference,forward",
                        help="which measurements (comma-separated)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="peak TFLOP/s for MFU (default: a table of known GPUs)")
    parser.add_argument("--quick", action="store_true", help="small sizes, a minute or two")
    parser.add_argument("--equivalence", action="store_true",
                        help="fixed-seed demo runs (128x128) per configuration instead: loss "
                             "curves and final validation L1 against the first configuration")
    parser.add_argument("--equivalence_steps", type=int, default=300)
    parser.add_argument("--output", default="benchmark_results.json")
    parser.add_argument("--workdir", default=None,
                        help="keep data, logs and outputs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.device == "auto":
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    defaults = {**DEFAULTS[args.device], **(QUICK if args.quick else {})}
    if args.equivalence:
        defaults["configs"] = EQUIVALENCE_CONFIGS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for name in args.configs:
        parse_config(name)  # an unknown option stops here
    args.batch_sizes = sorted(int(b) for b in args.batch_sizes.split(","))
    args.infer_batch_sizes = sorted(int(b) for b in args.infer_batch_sizes.split(","))
    args.parts = [p.strip() for p in args.parts.split(",")]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from "
                     f"{', '.join(PARTS)}")
    if min(args.batch_sizes + args.infer_batch_sizes + [args.steps, args.repeats]) < 1 or \
            args.warmup_steps < 1 or args.infer_images < 2:
        parser.error("batch sizes, --steps, --repeats, --warmup_steps must be >= 1, "
                     "--infer_images >= 2")
    return args


def main(argv=None):
    args = parse(argv)
    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = Path(args.workdir).resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_")))
        sys.path.insert(0, str(REPO))
        if args.equivalence:
            results = run_equivalence(args, workdir)
        else:
            results = run_benchmark(args, workdir)
            print_tables(results)
    Path(args.output).write_text(json.dumps(results, indent=1, default=str))
    print(f"\nwrote {args.output}")
    return results


if __name__ == "__main__":
    main()
