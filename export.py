"""Export a trained generator for other runtimes, checked against the checkpoint first.

    python export.py --model_path checkpoints/generator.pth --output generator.onnx

The format follows the extension of --output:
  .onnx         for onnxruntime (C++, C#, Python, ...). Opset 18; input "label" (B, 3, H, W)
                float32 RGB in [-1, 1], output "photo" (B, 3, H, W) in [-1, 1]; B, H and W
                dynamic, H and W multiples of 2^depth (256 for a 256-pixel model). The graph
                is the generator in evaluation mode (batch norm's running statistics, no
                dropout).
  .safetensors  the generator's weights, with the run's configuration as JSON in the metadata:
                a checkpoint that loads without pickle (inference.py and app.py read it).
  .pt2          a torch.export program (dynamic B, H and W, evaluation mode) for AOTInductor
                and other PyTorch runtimes; the configuration is its extra file
                pix2pix_config.json.
What inference.Translator does around the network (scaling, padding, cropping) stays outside
the exported graph; the README's "Export and deploy" says what a caller repeats.

Before anything is written, the export and the checkpoint (fp32, PyTorch) translate the same
label maps (two sizes, batches of 1 and 2): mean |difference| < 1/255 and max < 4/255 on 0-255
images, or the export fails and no file is written.
"""

import argparse
import contextlib
import importlib
import io
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from checkpoints import EXPORT_FORMAT
from demo.data import real_profile_pair
from exported import ONNX_INPUT, ONNX_OUTPUT, PT2_CONFIG, load_onnx, read_pt2
from inference import Translator, load_generator
from models import ModelConfig
from utils import UserError, atomic_write, run_cli

ONNX_OPSET = 18
PARITY_MEAN, PARITY_MAX = 1.0, 4.0  # limits of |export - checkpoint| on 0-255 images


def export_metadata(config):
    """What an exported file carries besides the network: string keys and values."""
    return {"format": EXPORT_FORMAT, "version": "1", "config": json.dumps(config)}


def require(path, *names):
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            raise UserError(f"{path}: exporting it needs {', '.join(names)}: pip install -r "
                            "requirements-extras.txt") from None


def exportable_sizes():
    """NOTE: torch.export assumes a dynamic size is never 1 (so that it cannot broadcast) and
    would refuse one block of 2^depth, the commonest size (256 x 256); size-oblivious
    reasoning drops that assumption. A private switch of torch.fx, checked for."""
    import torch.fx.experimental._config as fx_config
    if hasattr(fx_config, "backed_size_oblivious"):
        return fx_config.patch(backed_size_oblivious=True)
    return contextlib.nullcontext()


def example_and_dims(config, batch_name="batch"):
    """An example input and its dynamic dimensions: B free, H and W multiples of 2^depth.
    The example is two blocks high and wide: torch.export would fix a size of one as a
    constant."""
    block = 2 ** ModelConfig.from_dict(config["model"]).depth
    example = torch.rand(2, 3, 2 * block, 2 * block) * 2 - 1
    dims = {0: torch.export.Dim(batch_name, min=1),
            2: block * torch.export.Dim("height_blocks", min=1),
            3: block * torch.export.Dim("width_blocks", min=1)}
    return example, (dims,)


# --- Writing each format (bytes, so that nothing is on disk before the check) ---------------

def onnx_bytes(generator, config, path):
    require(path, "onnx", "onnxscript")
    example, dims = example_and_dims(config)
    # The exporter reports its progress on stdout and warns about its own internals.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            exportable_sizes():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(generator, (example,), dynamo=True, verbose=False,
                                    input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                                    dynamic_shapes=dims, opset_version=ONNX_OPSET)
    model = program.model_proto
    for key, value in export_metadata(config).items():
        model.metadata_props.add(key=key, value=value)
    return model.SerializeToString()


def safetensors_bytes(generator, config, path):
    require(path, "safetensors")
    from safetensors.torch import save
    state_dict = {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    return save(state_dict, metadata=export_metadata(config))


def pt2_bytes(generator, config, path):
    example, dims = example_and_dims(config)
    with warnings.catch_warnings(), exportable_sizes():
        warnings.simplefilter("ignore")
        program = torch.export.export(generator, (example,), dynamic_shapes=dims)
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={PT2_CONFIG: json.dumps(config)})
    return buffer.getvalue()


FORMATS = {  # extension: (write to bytes, read back as (generator, configuration))
    ".onnx": (onnx_bytes, load_onnx),
    ".safetensors": (safetensors_bytes, load_generator),
    ".pt2": (pt2_bytes, read_pt2),
}


# --- Parity ---------------------------------------------------------------------------------

def parity_label_maps(image_size, seed=0):
    """Label maps with the real set's profile, in two sizes: three square ones, three twice
    as wide (two scenes side by side)."""
    rng = np.random.default_rng(seed)
    square = [real_profile_pair(rng, image_size)[0] for _ in range(3)]
    wide = [np.concatenate([real_profile_pair(rng, image_size)[0] for _ in range(2)], axis=1)
            for _ in range(3)]
    return [square, wide]


def check_parity(reference, candidate, config, name):
    """Translate the same label maps with both generators (fp32, batches of 1 and 2) and
    compare the 0-255 photos; (mean, max) |difference|, or a UserError past the limits."""
    translators = [Translator(g, config, "cpu", precision="fp32") for g in (reference, candidate)]
    differences = []
    for arrays in parity_label_maps(config["model"]["image_size"]):
        for batch in (arrays[:1], arrays[1:]):
            expected, found = (t.translate(batch) for t in translators)
            differences += [np.abs(a.astype(np.int16) - b.astype(np.int16))
                            for a, b in zip(expected, found)]
    mean = float(np.mean([d.mean() for d in differences]))
    worst = int(max(d.max() for d in differences))
    line = (f"parity of {name} with the checkpoint (fp32) on {len(differences)} label maps, "
            f"2 sizes, batches of 1 and 2: mean |difference| {mean:.3f}/255, max {worst}/255")
    if not (mean < PARITY_MEAN and worst < PARITY_MAX):
        raise UserError(f"{line}; over the limits (mean < {PARITY_MEAN:g}, max < "
                        f"{PARITY_MAX:g}): the export does not match, nothing written")
    print(f"{line} (limits: mean < {PARITY_MEAN:g}, max < {PARITY_MAX:g})")
    return mean, worst


# --- Export ---------------------------------------------------------------------------------

def export(model_path, output):
    """Write `output` in the format its extension names, once it has passed the parity check;
    returns the check's (mean, max) |difference| on 0-255 images."""
    output = Path(output)
    suffix = output.suffix.lower()
    if suffix not in FORMATS:
        raise UserError(f"--output {output}: unknown format {suffix or '(no extension)'!r}; "
                        f"end it in {', '.join(FORMATS)}")
    if output.is_dir():
        raise UserError(f"--output {output}: is a folder, expected a file path")
    generator, config = load_generator(model_path)
    if not isinstance(generator, torch.nn.Module):
        raise UserError(f"{model_path}: already an ONNX graph; export from the .pth or "
                        ".safetensors")
    write, read = FORMATS[suffix]
    data = write(generator, config, output)
    with tempfile.TemporaryDirectory() as folder:
        written = Path(folder) / output.name
        written.write_bytes(data)
        exported, exported_config = read(written)
        if json.dumps(exported_config, sort_keys=True) != json.dumps(config, sort_keys=True):
            raise UserError(f"{output}: the configuration read back differs from the "
                            "checkpoint's; nothing written")
        parity = check_parity(generator, exported, config, output.name)
    atomic_write(output, lambda f: f.write(data))
    print(f"wrote {output} ({len(data) / 1e6:.1f} MB)")
    return parity


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model_path", default="./checkpoints/generator.pth",
                        help="generator.pth, latest.pth, a run folder (runs/NAME) or a "
                             ".safetensors export")
    parser.add_argument("--output", required=True,
                        help="the file to write: .onnx, .safetensors or .pt2")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    export(args.model_path, args.output)


if __name__ == "__main__":
    run_cli(main)
