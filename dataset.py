"""Finding (label map, photo) pairs on disk, loading them, and the paired augmentation.

Two layouts, detected by themselves (or forced):
  paired        NAME_input.jpg (label map) next to NAME_target.jpg (photo); .png etc. too.
  side_by_side  one image per pair, photo and label map side by side (the public Cityscapes
                pix2pix set: photo left, label right). Which half is the label is decided once
                per dataset from a sample of files (labelmaps.detect_label_side).

Label maps are colour images, or single-channel Cityscapes id maps (labelIds, trainIds), which
are turned into the Cityscapes colours as they are read.

Run `python dataset.py --check ./dataset` to see what the loader makes of a folder.
"""

import argparse
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from cityscapes import MAX_COLOR_DISTANCE, nearest_colors
from labelmaps import LABEL_FORMATS, colorize_ids, detect_label_side, split_halves
from utils import UserError, one_line, run_cli, to_unit_range

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
LAYOUTS = ("auto", "paired", "side_by_side")
LABEL_SIDES = ("auto", "left", "right")
DIRECTIONS = ("label2photo", "photo2label")
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # single channel, over 8 bits
PAIR_NAME = re.compile(r"^(?P<stem>.+)_(?P<role>input|target)$")


@dataclass(frozen=True)
class PairFiles:
    """Where one pair lives: two files (paired) or one file split in halves (side_by_side)."""

    label: Path
    photo: Path  # the same file as `label` in the side-by-side layout
    label_side: str = ""  # "left" or "right" in the side-by-side layout


# --- Reading images -------------------------------------------------------------------------

def decode(image):
    """An opened PIL image, decoded and turned as its EXIF orientation says (as viewers show
    it): the one decoding step of inference, training and the page."""
    image.load()
    return ImageOps.exif_transpose(image)


def read_rgb(path, role="image", label_format="auto"):
    """Decode an image file to a (H, W, 3) uint8 array; `role` names it in error messages.

    RGBA and palette images are converted (alpha dropped), 16-bit images scaled to 8 bits,
    EXIF rotation applied. A single-channel label map is read as Cityscapes class ids and
    coloured (labelmaps.colorize_ids; `label_format` says which ids, "auto" decides).
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image = decode(image)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except UnidentifiedImageError:
        what = "empty file (0 bytes)" if path.stat().st_size == 0 else "not an image file"
        raise UserError(f"{path}: cannot read the {role}: {what}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: cannot read the {role}: corrupt or truncated image "
                        f"({one_line(e)})") from None
    single = image.mode in ("L", "1", "LA") + WIDE_MODES
    if role == "label map" and label_format not in ("auto", "color") and not single:
        raise UserError(f"{path}: --label_format {label_format} expects a single-channel id "
                        f"map, the file is {image.mode}")
    if role == "label map" and single:
        if label_format == "color":
            raise UserError(f"{path}: the label map is single-channel (grayscale); "
                            "--label_format color expects a colour label map")
        ids = np.asarray(image.convert("L") if image.mode in ("1", "LA") else image)
        if ids.max(initial=0) > 255 or ids.min(initial=0) < 0 or not np.all(ids == ids.round()):
            raise UserError(f"{path}: the single-channel label map holds values outside "
                            "0..255; Cityscapes label ids or train ids are expected")
        return colorize_ids(ids.astype(np.uint8), path, label_format)
    if image.mode in WIDE_MODES:
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.round(array * (255.0 / peak)).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return np.array(image.convert("RGB"))


# --- Finding pairs --------------------------------------------------------------------------

def scan_folder(folder, what="data folder"):
    """(image files sorted naturally (2.jpg before 10.jpg), the other entries sorted) of a
    folder; hidden entries (.DS_Store, macOS's ._ files) are ignored. A missing folder, or one
    without images, is a UserError naming it as `what`. The one folder scanner: inference.py's
    inputs are found with it too."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: {what} not found")
    images, others = [], []
    for p in folder.iterdir():
        if p.name.startswith("."):
            continue
        (images if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES else others).append(p)
    if not images:
        raise UserError(f"{folder}: no images found (expected .jpg or .png files)")
    return sorted(images, key=_natural_key), sorted(others)


def list_images(folder):
    """Image files of a data folder, sorted naturally; other entries warned of, in one line."""
    images, others = scan_folder(folder)
    if others:
        names = ", ".join(p.name for p in others[:5])
        warnings.warn(f"{folder}: skipping {len(others)} non-image entries ({names})",
                      stacklevel=2)
    return images


def _natural_key(path):
    # ASCII digits only: "²" is a digit to str.isdigit and to \d, not to int().
    return [int(t) if t.isascii() and t.isdigit() else t
            for t in re.split(r"([0-9]+)", path.name)]


def detect_layout(images):
    roles = [PAIR_NAME.match(p.stem) is not None for p in images]
    if all(roles):
        return "paired"
    if not any(roles):
        return "side_by_side"
    odd = next(p for p, r in zip(images, roles) if not r)
    raise UserError(f"{odd}: the folder mixes NAME_input/NAME_target pairs with other images; "
                    "keep one layout per folder")


def paired_files(images):
    """Match NAME_input.* with NAME_target.*; an orphan is an error naming the file."""
    by_stem = {}
    for p in images:
        m = PAIR_NAME.match(p.stem)
        if m is None:
            raise UserError(f"{p}: not named NAME_input.* or NAME_target.*")
        slot = by_stem.setdefault(m["stem"], {})
        if m["role"] in slot:
            raise UserError(f"{p}: two {m['role']} files for '{m['stem']}' "
                            f"({slot[m['role']].name} and {p.name})")
        slot[m["role"]] = p
    pairs = []
    for stem, slot in by_stem.items():
        for role, other in (("input", "target"), ("target", "input")):
            if role in slot and other not in slot:
                raise UserError(f"{slot[role]}: has no matching {stem}_{other} file")
        pairs.append(PairFiles(label=slot["input"], photo=slot["target"]))
    return sorted(pairs, key=lambda pair: _natural_key(pair.label))


def find_pairs(folder, layout="auto", label_side="auto"):
    """All pairs of one split folder, the layout and label side used, and the evidence for the
    side (a line to print; "" in the paired layout)."""
    if layout not in LAYOUTS:
        raise UserError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if label_side not in LABEL_SIDES:
        raise UserError(f"--label_side {label_side!r}: choose one of {', '.join(LABEL_SIDES)}")
    images = list_images(folder)
    if layout == "auto":
        layout = detect_layout(images)
    if layout == "paired":
        return paired_files(images), layout, "", ""
    if label_side == "auto":
        found = detect_label_side(images, lambda p: read_rgb(p, "side-by-side pair"))
        label_side, evidence = found.side, str(found)
    else:
        evidence = f"label map: {label_side} half (--label_side)"
    return [PairFiles(p, p, label_side) for p in images], layout, label_side, evidence


def load_pair(pair, label_format="auto"):
    """Decode one pair to two (H, W, 3) uint8 arrays: (label map, photo)."""
    if not pair.label_side:
        label = read_rgb(pair.label, "label map", label_format)
        photo = read_rgb(pair.photo, "photo")
        if label.shape != photo.shape:
            raise UserError(f"{pair.label}: size {label.shape[1]}x{label.shape[0]} differs "
                            f"from its photo {pair.photo.name} "
                            f"({photo.shape[1]}x{photo.shape[0]})")
        return label, photo
    left, right = split_halves(read_rgb(pair.label, "side-by-side pair"), pair.label)
    return (left, right) if pair.label_side == "left" else (right, left)


# --- The dataset ----------------------------------------------------------------------------

def sample_seed(seed, epoch, index):
    """One augmentation seed per (run seed, epoch, sample): independent of worker count."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class PairDataset(Dataset):
    """(source, target) tensors in [-1, 1], label maps always resized with nearest neighbour.

    Items are indexed by `index` or by `(epoch, index)`: training draws its random crop and
    flip from a generator seeded by (seed, epoch, index), so a run is reproducible whatever the
    number of loader workers and can be resumed mid-epoch.
    """

    def __init__(self, folder, *, image_size=256, load_size=286, train=True, crop=True,
                 flip=True, direction="label2photo", layout="auto", label_side="auto",
                 label_format="auto", seed=0):
        if direction not in DIRECTIONS:
            raise UserError(f"--direction {direction!r}: choose one of {', '.join(DIRECTIONS)}")
        if train and crop and load_size < image_size:
            raise UserError(f"--load_size {load_size} must be >= --image_size {image_size}")
        self.folder = Path(folder)
        self.pairs, self.layout, self.label_side, self.evidence = find_pairs(folder, layout,
                                                                             label_side)
        self.label_format = label_format
        self.direction = direction
        self.seed = seed
        # torchvision (its import pulls in torch's compiler, ~1 s) only where pairs are loaded:
        # inference and the page, which read single images, start without it.
        from torchvision.transforms import v2
        first_size = (load_size, load_size) if train and crop else (image_size, image_size)
        # The deterministic first stage; its result is what `cache` keeps in memory.
        self.resize = v2.Resize(first_size, interpolation=v2.InterpolationMode.BICUBIC,
                                antialias=True)
        random_stages = []
        if train and crop:
            random_stages.append(v2.RandomCrop(image_size))
        if train and flip:
            random_stages.append(v2.RandomHorizontalFlip())
        self.augment = v2.Compose(random_stages) if random_stages else None
        self.cache = None

    def fill_cache(self):
        """Decode and resize every pair once; afterwards an item costs only the random crop
        and flip. Loader workers forked later share this memory."""
        self.cache = [self._load_resized(i) for i in range(len(self.pairs))]

    def __len__(self):
        return len(self.pairs)

    def _load_resized(self, index):
        from torchvision import tv_tensors
        label, photo = load_pair(self.pairs[index], self.label_format)
        # A Mask is resized with nearest neighbour by torchvision, so label colours stay exact;
        # giving both images in one call applies one random draw to both.
        label = tv_tensors.Mask(torch.from_numpy(label).permute(2, 0, 1).contiguous())
        photo = tv_tensors.Image(torch.from_numpy(photo).permute(2, 0, 1).contiguous())
        return self.resize(label, photo)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        label, photo = self.cache[index] if self.cache is not None else self._load_resized(index)
        if self.augment is not None:
            # Only the CPU generator, which fork_rng restores: torch.manual_seed would also
            # reseed every CUDA generator (dropout's) and leave them so.
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
                label, photo = self.augment(label, photo)
        label = to_unit_range(label.as_subclass(torch.Tensor))
        photo = to_unit_range(photo.as_subclass(torch.Tensor))
        if self.direction == "label2photo":
            return {"source": label, "target": photo}
        return {"source": photo, "target": label}


# --- The dataset check ----------------------------------------------------------------------

# `--check` warns when more of a split's label-map pixels than this are off the palette. Real
# Cityscapes label halves have 6-19 % (JPEG rings and blended borders), their photos 44-87 %.
OFF_PALETTE_WARNING = 0.3


def off_palette_pixels(label, max_distance=MAX_COLOR_DISTANCE):
    """How many pixels of an (H, W, 3) uint8 label map lie farther than `max_distance`
    (Euclidean RGB) from every Cityscapes colour."""
    _, squared = nearest_colors(label)
    return int((squared > max_distance ** 2).sum())


def check_split(folder, layout="auto", label_side="auto", label_format="auto"):
    """Decode every image of a split; returns (report lines, problem lines).

    Label maps in other colours than Cityscapes' train as well (pix2pix learns any colours),
    so a split whose label maps are mostly off the palette gets a warning, not a problem.
    """
    report, problems = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pairs, layout, label_side, evidence = find_pairs(folder, layout, label_side)
        except UserError as e:
            return report, [str(e)]
    problems += [str(w.message) for w in caught]
    sizes = {}
    off_palette = pixels = 0
    for pair in pairs:
        try:
            label, _ = load_pair(pair, label_format)
        except UserError as e:
            problems.append(str(e))
            continue
        key = f"{label.shape[1]}x{label.shape[0]}"
        sizes[key] = sizes.get(key, 0) + 1
        off_palette += off_palette_pixels(label)
        pixels += label.shape[0] * label.shape[1]
    report.append(f"{folder}: {len(pairs)} pairs, layout {layout}")
    if evidence:
        report.append(f"  {evidence}")
    report.append("  label map sizes: " + ", ".join(f"{k} ({n})" for k, n in sizes.items()))
    share = off_palette / max(pixels, 1)
    report.append(f"  label map pixels off the Cityscapes palette: {share:.1%}")
    if share > OFF_PALETTE_WARNING:
        report.append(f"warning: {folder}: {share:.0%} of the label-map pixels are farther than "
                      f"{MAX_COLOR_DISTANCE:g} RGB from every Cityscapes colour (real Cityscapes "
                      "label maps: 6-19 %); training works with any colours, but the Cityscapes "
                      "evaluation decodes only those (is the label half right? see --label_side)")
    return report, problems


def main(argv=None):
    parser = argparse.ArgumentParser(description="Check a pix2pix data folder.")
    parser.add_argument("--check", required=True, metavar="DATA_DIR",
                        help="data folder with train/ and val/ (or a single split folder)")
    parser.add_argument("--layout", default="auto", choices=LAYOUTS)
    parser.add_argument("--label_side", default="auto", choices=LABEL_SIDES)
    parser.add_argument("--label_format", default="auto", choices=LABEL_FORMATS,
                        help="paired layout: colour label maps or single-channel id maps")
    args = parser.parse_args(argv)
    root = Path(args.check)
    if not root.is_dir():
        raise UserError(f"{root}: data folder not found")
    splits = [root / s for s in ("train", "val") if (root / s).is_dir()] or [root]
    all_problems = []
    for split in splits:
        report, problems = check_split(split, args.layout, args.label_side, args.label_format)
        print("\n".join(report))
        all_problems += problems
    for problem in all_problems:
        print(f"problem: {problem}")
    print(f"{len(all_problems)} problem(s) found")
    if all_problems:
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
