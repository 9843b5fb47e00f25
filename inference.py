"""Translate a folder of label maps to photos with a trained generator (any image size).

    python inference.py --input_dir ./test_inputs --output_dir ./outputs \\
        --model_path ./checkpoints/generator.pth

The checkpoint carries the run's configuration, so no architecture flags are needed.
--model_path also takes a run folder (runs/NAME) and export.py's .safetensors and .onnx files
(exported.py reads them): every script that uses a generator gets it ready through
load_translator here.
"""

import argparse
import collections
import contextlib
import errno
import os
import sys
import tempfile
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import devices
from checkpoints import load_checkpoint, load_state, run_file
from config import check_model_values, refuse_removed
from config import saved as saved_config
from dataset import LABEL_SIDES, PAIR_NAME, read_rgb, scan_folder
from exported import load_onnx, read_safetensors
from labelmaps import LABEL_FORMATS, detect_label_side, split_halves
from models import ModelConfig, build_generator, fold_batch_norm
from utils import (UserError, WriteError, atomic_write, make_folder, one_line, run_cli, to_uint8,
                   to_unit_range)

INPUT_LAYOUTS = ("auto", "labels", "side_by_side", "paired")


# --- Loading: a checkpoint, a run folder or an exported file -----------------------------------

def load_generator(path, device="cpu"):
    """(generator, the run's configuration dict) from whatever --model_path names:
    generator.pth, latest.pth or an epoch snapshot; a run folder (runs/NAME: its
    generator.pth); export.py's .safetensors (an nn.Module again, in eval mode) or .onnx
    (an OnnxGenerator: onnxruntime runs it, in fp32)."""
    path = run_file(path, "generator.pth")
    suffix = path.suffix.lower()
    if suffix in (".onnx", ".safetensors") and not path.is_file():
        raise UserError(f"{path}: file not found")
    if suffix == ".onnx":
        return load_onnx(path, device)
    if suffix == ".pt2":
        raise UserError(f"{path}: a torch.export program, for AOTInductor and other PyTorch "
                        "runtimes (torch.export.load); --model_path takes .pth, .safetensors "
                        "or .onnx")
    if suffix == ".safetensors":
        state_dict, config = read_safetensors(path)
    else:
        checkpoint = load_checkpoint(path)
        state_dict, config = checkpoint.get("generator"), checkpoint.get("config")
    if not isinstance(config, dict) or "model" not in config:
        raise UserError(f"{path}: the checkpoint's configuration is missing or unreadable")
    refuse_removed(path, config, resume=False)
    # Data, not trusted: checked as the command line's values are, before anything is built.
    model_config = saved_config(path, check_model_values, config["model"])
    if not isinstance(state_dict, dict):
        raise UserError(f"{path}: the checkpoint holds no generator weights")
    generator = build_generator(model_config)
    load_state(generator, state_dict, path, "generator")
    return generator.to(device).eval(), config


def runs_in_pytorch(generator, path, paper_test_mode=False, compile=False):
    """Refuse the options that need an nn.Module when `generator` is an ONNX graph."""
    if isinstance(generator, torch.nn.Module):
        return True
    for flag, given in (("--paper_test_mode", paper_test_mode), ("--compile", compile)):
        if given:
            raise UserError(f"{path}: {flag} needs a PyTorch generator (.pth or .safetensors);"
                            " an .onnx graph is fixed in evaluation mode")
    return False


class Translator:
    """Owns pre- and post-processing: scale, pad, translate, crop, resize back.

    By default the input is scaled (nearest neighbour for label maps) so its short side is the
    training size, padded to a multiple of 2^depth, translated and the result resized to the
    input's size. `native=True` skips the scaling (padding still applies).
    """

    def __init__(self, generator, config, device, native=False, paper_test_mode=False,
                 precision="fp32", channels_last=False):
        self.generator = generator
        self.device = torch.device(device)
        self.image_size = config["model"]["image_size"]
        self.multiple = 2 ** ModelConfig.from_dict(config["model"]).depth
        self.input_is_label = config.get("direction", "label2photo") == "label2photo"
        self.native = native
        self.paper_test_mode = paper_test_mode
        self.precision = precision
        self.channels_last = channels_last
        if paper_test_mode:
            # The paper's test mode: dropout on, batch statistics of each image itself.
            generator.train()

    def _resize(self, image, size, is_label):
        if is_label:
            return F.interpolate(image, size=size, mode="nearest-exact")
        return F.interpolate(image, size=size, mode="bicubic", antialias=True,
                             align_corners=False).clamp_(-1, 1)

    def prepare(self, array):
        """(H, W, 3) uint8 -> (1, 3, H', W') padded tensor and what is needed to undo it."""
        # A copy: the caller's array may be read-only (np.asarray of a PIL image).
        image = to_unit_range(torch.tensor(array).permute(2, 0, 1)[None])
        height, width = image.shape[-2:]
        if not self.native:
            scale = self.image_size / min(height, width)
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            image = self._resize(image, size, self.input_is_label)
        h, w = image.shape[-2:]
        pad_h, pad_w = -h % self.multiple, -w % self.multiple
        # Replicate padding keeps label colours valid; the pad is cropped off afterwards.
        image = F.pad(image, (0, pad_w, 0, pad_h), mode="replicate")
        return image, (h, w, height, width)

    @torch.no_grad()
    def translate(self, arrays):
        """A list of (H, W, 3) uint8 arrays -> a list of translated uint8 arrays, same sizes."""
        prepared = [self.prepare(a) for a in arrays]
        outputs = [None] * len(arrays)
        groups = {}  # equal padded shapes run as one batch
        for i, (image, _) in enumerate(prepared):
            groups.setdefault(tuple(image.shape), []).append(i)
        for indices in groups.values():
            chunks = [[i] for i in indices] if self.paper_test_mode else [indices]
            for chunk in chunks:
                batch = torch.cat([prepared[i][0] for i in chunk]).to(self.device)
                if self.channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                with devices.autocast(self.device, self.precision):
                    fake = self.generator(batch).float()
                for i, image in zip(chunk, fake):
                    h, w, height, width = prepared[i][1]
                    image = image[None, :, :h, :w]
                    if (h, w) != (height, width):
                        image = self._resize(image, (height, width), not self.input_is_label)
                    outputs[i] = to_uint8(image[0]).permute(1, 2, 0).cpu().numpy()
        return outputs


def load_translator(model_path, device, precision="fp32", channels_last="off", compile=False,
                    native=False, paper_test_mode=False, label2photo_for="", fold=True):
    """The one way a script gets a generator ready for use: (Translator, a line saying how it
    runs). Loads --model_path (load_generator), decides `precision` and `channels_last` for
    `device` (an ONNX graph runs in fp32), sets the math mode, applies them, `fold` (batch
    norm folded, weights cast once) and `compile`.
    `label2photo_for` names a caller that needs label map -> photo (the page, evaluate.py):
    a photo2label model is refused."""
    precision, why = devices.resolve_precision(precision, device)
    devices.set_math_mode(device, precision)
    generator, config = load_generator(model_path, device)
    in_pytorch = runs_in_pytorch(generator, model_path, paper_test_mode, compile)
    if not in_pytorch:
        precision, why = "fp32", "onnxruntime runs the exported graph in fp32"
    channels_last = in_pytorch and devices.resolve_channels_last(channels_last, device, precision)
    generator = optimize_generator(generator, channels_last, compile,
                                   freeze=not paper_test_mode, precision=precision, fold=fold)
    translator = Translator(generator, config, device, native, paper_test_mode, precision,
                            channels_last)
    if label2photo_for and not translator.input_is_label:
        raise UserError(f"{model_path}: the model translates photos to label maps; "
                        f"{label2photo_for} needs a label2photo model")
    line = (f"device {device}, precision {precision} ({why})"
            f"{', channels_last' if channels_last else ''}")
    return translator, line


# --- Finding the inputs ---------------------------------------------------------------------

def list_inputs(folder, layout="auto"):
    """(files to translate, layout, skipped files). In a folder of NAME_input/NAME_target pairs
    every image but the NAME_target photos is translated."""
    files, others = scan_folder(folder, "input folder")
    for path in others:
        if not path.is_dir():  # sub-folders (an output folder, say) are no inputs
            warnings.warn(f"{path}: not an image file, skipped", stacklevel=2)
    if layout == "auto":
        layout = "paired" if any(PAIR_NAME.match(p.stem) for p in files) else "labels"
    skipped = []
    if layout == "paired":
        skipped = [p for p in files if (m := PAIR_NAME.match(p.stem)) and m["role"] == "target"]
        files = [p for p in files if p not in skipped]
        if not files:
            raise UserError(f"{folder}: only NAME_target photos, no label maps to translate")
    return files, layout, skipped


def find_side_by_side(files, requested, layout, label_side):
    """(files to split in halves, label side, the line saying why) for the inputs.

    `--input_layout side_by_side` splits every file. "auto" (in a folder without NAME_input
    files) splits them all if their halves differ as a label map's and a photo's do
    (labelmaps.detect_label_side), and none if no file's halves differ (plain label maps, wide
    ones too); a folder that mixes both is refused with a request for --input_layout.
    """
    if requested != "side_by_side" and not (requested == "auto" and layout == "labels"):
        return [], "", ""
    if label_side != "auto":
        return list(files), label_side, f"label map: {label_side} half (--label_side)"
    found = detect_label_side(files, lambda p: read_rgb(p, "side-by-side pair"),
                              alike_is_none=requested == "auto")
    return ([], "", "") if found is None else (list(files), found.side, str(found))


def input_half(array, label_side, input_is_label, path=""):
    """The half of a side-by-side array the generator translates."""
    left, right = split_halves(array, path)
    label, photo = (left, right) if label_side == "left" else (right, left)
    return label if input_is_label else photo


def output_paths(files, output_dir, case_sensitive=None):
    """One PNG per input, named after it (`1.jpg` -> `1.png`); inputs whose names would collide
    (`x.jpg`, `x.png`, `x.jpg.png`) keep their whole name (`x.jpg.png`, `x.png.png`,
    `x.jpg.png.png`). Names that differ only in case count as colliding where the output
    folder ignores case (`case_sensitive=None`: tested on the folder); what still collides
    is refused before the first image, naming both inputs."""
    output_dir = Path(output_dir)
    if case_sensitive is None:
        case_sensitive = folder_is_case_sensitive(output_dir)
    key = (lambda name: name) if case_sensitive else str.casefold
    names = [f"{p.stem}.png" for p in files]
    while True:  # a name that takes the whole input name can clash anew: until none does
        seen = collections.Counter(n.casefold() for n in names)
        clashing = [i for i, n in enumerate(names) if seen[n.casefold()] > 1
                    and n != f"{files[i].name}.png"]
        if not clashing:
            break
        for i in clashing:
            names[i] = f"{files[i].name}.png"
    owners = {}
    for path, name in zip(files, names):
        if key(name) in owners:
            raise UserError(f"{owners[key(name)]} and {path}: both would be written to "
                            f"{output_dir / name} (names that differ only in case); rename one")
        owners[key(name)] = path
    return [output_dir / name for name in names]


def folder_is_case_sensitive(folder):
    """Whether names differing only in case are different files in `folder` (a probe file)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".pix2pix-Case-", dir=folder)
    except OSError:  # not there or not writable: the writes themselves will say so
        return True
    os.close(fd)
    try:
        return not Path(probe).with_name(Path(probe).name.swapcase()).exists()
    finally:
        os.unlink(probe)


def refuse_input_folder(input_dir, output_dir):
    """Outputs named after their inputs would replace them (`x.png` -> `x.png`)."""
    if Path(output_dir).exists() and Path(output_dir).resolve() == Path(input_dir).resolve():
        raise UserError(f"{output_dir}: is the input folder; the photos would replace the label "
                        "maps they are made from; pass another --output_dir")


# --- Speed: a faster generator, and file work overlapped with it ------------------------------

def optimize_generator(generator, channels_last=False, compile=False, freeze=True,
                       precision="fp32", fold=True):
    """The generator as it runs fastest for use. With `freeze` (eval mode: not the paper's
    test mode) and `fold`, batch norm is folded into the convolutions (`models.fold_batch_norm`)
    and, for a bf16 or fp16 `precision`, every weight is cast once (autocast would cast each
    weight at every call); then channels-last, and torch.compile, which with `freeze` treats
    the weights as constants and packs them once instead of at every call."""
    if not isinstance(generator, torch.nn.Module):  # an OnnxGenerator: onnxruntime's own
        return generator
    if freeze and fold:
        generator = fold_batch_norm(generator)
        if precision in devices.AUTOCAST_DTYPES:
            generator = generator.to(devices.AUTOCAST_DTYPES[precision])
    if channels_last:
        generator = generator.to(memory_format=torch.channels_last)
    if compile:
        if freeze:
            import torch._inductor.config as inductor_config
            inductor_config.freezing = True
        generator = torch.compile(generator)
    return generator


def run_in(pool, fn, *args):
    """fn(*args) as a Future: in one of `pool`'s threads, or at once here if `pool` is None."""
    if pool is not None:
        return pool.submit(fn, *args)
    future = Future()
    try:
        future.set_result(fn(*args))
    except Exception as e:  # re-raised by future.result(), as from a thread
        future.set_exception(e)
    return future


def ahead(pool, fn, items, depth):
    """Futures of fn(item) for each item in order, started up to `depth` items ahead."""
    started = collections.deque()
    for item in items:
        started.append(run_in(pool, fn, item))
        if len(started) > depth:
            yield started.popleft()
    yield from started


def write_png(path, array, compression=1):
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG",
                                                             compress_level=compression))


# --- Command line ---------------------------------------------------------------------------

def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--input_dir", required=True, help="folder of label maps")
    parser.add_argument("--output_dir", required=True, help="where the PNGs go")
    parser.add_argument("--model_path", default="./checkpoints/generator.pth",
                        help="generator.pth, latest.pth, an epoch snapshot, a run folder "
                             "(runs/NAME), or export.py's .safetensors or .onnx")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--native", action="store_true",
                        help="translate at the input's own resolution (no scaling)")
    parser.add_argument("--paper_test_mode", action="store_true",
                        help="the paper's test mode: dropout on, per-image batch statistics")
    parser.add_argument("--input_layout", default="auto", choices=INPUT_LAYOUTS,
                        help="plain label maps, side-by-side pairs, or NAME_input files")
    parser.add_argument("--label_side", default="auto", choices=LABEL_SIDES,
                        help="side-by-side inputs: which half is the label map")
    parser.add_argument("--label_format", default="auto", choices=LABEL_FORMATS,
                        help="colour label maps, or single-channel Cityscapes label_ids / "
                             "train_ids maps (auto: told apart by their values)")
    devices.add_inference_speed_flags(parser)
    parser.add_argument("--io_threads", type=int, default=2,
                        help="threads decoding inputs and writing PNGs while the generator "
                             "runs; 0: one after another")
    parser.add_argument("--png_compression", type=int, default=1, choices=range(10),
                        metavar="0-9", help="zlib level of the PNGs (pixels identical at "
                                            "every level): 1 writes a 256x256 photo ~3x "
                                            "faster than 6, files ~4%% larger (default: 1)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.io_threads < 0:
        raise UserError(f"--io_threads must be >= 0, got {args.io_threads}")
    return args


def main(argv=None):
    args = parse(argv)
    device = devices.choose_device(args.device)
    files, layout, skipped = list_inputs(args.input_dir, args.input_layout)
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"{output_dir}: exists and is not a folder (--output_dir)")
    translator, line = load_translator(args.model_path, device, args.precision,
                                       args.channels_last, args.compile, args.native,
                                       args.paper_test_mode, fold=args.fold_batch_norm)
    print(line)
    refuse_input_folder(args.input_dir, output_dir)
    make_folder(output_dir, "output_dir")  # fail before translating, not at the first write
    targets = output_paths(files, output_dir)  # collisions refused before the first image
    pairs, label_side, evidence = find_side_by_side(files, args.input_layout, layout,
                                                    args.label_side)
    if pairs:
        print(f"{args.input_dir}: {len(pairs)} side-by-side pair(s), {evidence}")
    for path in skipped:
        print(f"skipped {path}: a NAME_target photo (its NAME_input label map is translated)")
    pairs = set(pairs)

    def load(path):
        if path in pairs:
            return input_half(read_rgb(path, "side-by-side pair"), label_side,
                              translator.input_is_label, path)
        role = "label map" if translator.input_is_label else "image"
        return read_rgb(path, role, args.label_format)

    failures = unwritten = 0
    window = 2 * args.batch_size  # images decoded ahead, and PNGs waiting to be written
    # Decoding and writing run in threads while the generator runs (--io_threads).
    threads = ThreadPoolExecutor(args.io_threads) if args.io_threads else contextlib.nullcontext()
    # Closed on an error too, so that the error line does not land on the bar's line.
    with threads as pool, tqdm(total=len(files), desc="translating", unit="img") as bar:
        loads, writes = ahead(pool, load, files, window), collections.deque()
        for start in range(0, len(files), args.batch_size):
            batch, names = [], []
            for target, loading in zip(targets[start:start + args.batch_size], loads):
                try:
                    batch.append(loading.result())
                except UserError as e:
                    # On a line of its own, not the progress bar's.
                    tqdm.write(f"error: {one_line(e)}", file=sys.stderr)
                    failures += 1
                    continue
                names.append(target)
            for array, target in zip(translator.translate(batch) if batch else [], names):
                writes.append(run_in(pool, write_png, target, array, args.png_compression))
            while len(writes) > window:
                unwritten += not wrote(writes.popleft())
            bar.update(min(args.batch_size, len(files) - start))
        while writes:
            unwritten += not wrote(writes.popleft())
    written = len(files) - failures - unwritten
    print(f"wrote {written} image(s) to {output_dir}" +
          (f"; {failures} could not be read" if failures else "") +
          (f"; {unwritten} could not be written" if unwritten else ""))
    if failures or unwritten:
        sys.exit(1)


def wrote(writing):
    """Whether a PNG write succeeded; a failed one is reported on a line of its own and the
    others go on, except on a full disk, which stops the run (no other write would succeed)."""
    try:
        writing.result()
    except WriteError as e:
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise
        tqdm.write(f"error: {one_line(e)}", file=sys.stderr)
        return False
    return True


if __name__ == "__main__":
    run_cli(main)
