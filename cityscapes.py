"""Cityscapes label colours and train IDs (from the official label table), decoding colour
label maps to train IDs, and converting the official download to the pix2pix layout.

The one place the palette lives: the demo-data generator draws with it, evaluation decodes
colour label maps back to train IDs with it.

    python cityscapes.py --convert --cityscapes_dir ~/cityscapes --output_dir ./dataset --size 256

reads leftImg8bit/{train,val}/CITY/*_leftImg8bit.png and the matching
gtFine/{train,val}/CITY/*_gtFine_color.png and writes SPLIT/1.jpg, 2.jpg, ... (sorted file-name
order, as in the public set): photo on the left, label map on the right, each size x size.
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from utils import UserError, atomic_write, run_cli

IGNORE_ID = 255

# name, trainId, (R, G, B). Classes that share a colour (the void ones, pole/polegroup) appear
# once. trainId 255 is ignored in evaluation.
LABELS = [
    ("unlabeled", IGNORE_ID, (0, 0, 0)),
    ("dynamic", IGNORE_ID, (111, 74, 0)),
    ("ground", IGNORE_ID, (81, 0, 81)),
    ("road", 0, (128, 64, 128)),
    ("sidewalk", 1, (244, 35, 232)),
    ("parking", IGNORE_ID, (250, 170, 160)),
    ("rail track", IGNORE_ID, (230, 150, 140)),
    ("building", 2, (70, 70, 70)),
    ("wall", 3, (102, 102, 156)),
    ("fence", 4, (190, 153, 153)),
    ("guard rail", IGNORE_ID, (180, 165, 180)),
    ("bridge", IGNORE_ID, (150, 100, 100)),
    ("tunnel", IGNORE_ID, (150, 120, 90)),
    ("pole", 5, (153, 153, 153)),
    ("traffic light", 6, (250, 170, 30)),
    ("traffic sign", 7, (220, 220, 0)),
    ("vegetation", 8, (107, 142, 35)),
    ("terrain", 9, (152, 251, 152)),
    ("sky", 10, (70, 130, 180)),
    ("person", 11, (220, 20, 60)),
    ("rider", 12, (255, 0, 0)),
    ("car", 13, (0, 0, 142)),
    ("truck", 14, (0, 0, 70)),
    ("bus", 15, (0, 60, 100)),
    ("caravan", IGNORE_ID, (0, 0, 90)),
    ("trailer", IGNORE_ID, (0, 0, 110)),
    ("train", 16, (0, 80, 100)),
    ("motorcycle", 17, (0, 0, 230)),
    ("bicycle", 18, (119, 11, 32)),
]

# The official label ids (as in *_gtFine_labelIds.png) of each entry of LABELS.
LABEL_IDS = {"unlabeled": range(0, 5), "dynamic": [5], "ground": [6], "road": [7],
             "sidewalk": [8], "parking": [9], "rail track": [10], "building": [11], "wall": [12],
             "fence": [13], "guard rail": [14], "bridge": [15], "tunnel": [16], "pole": [17, 18],
             "traffic light": [19], "traffic sign": [20], "vegetation": [21], "terrain": [22],
             "sky": [23], "person": [24], "rider": [25], "car": [26], "truck": [27], "bus": [28],
             "caravan": [29], "trailer": [30], "train": [31], "motorcycle": [32],
             "bicycle": [33]}

COLORS = {name: color for name, _, color in LABELS}
PALETTE = np.array([color for _, _, color in LABELS], dtype=np.uint8)  # (K, 3), LABELS' order
NUM_TRAIN_IDS = 19

MAX_COLOR_DISTANCE = 25.0  # farther than this from every palette colour: JPEG edge blur, ignored

SPLITS = ("train", "val")


# --- Decoding colour label maps -------------------------------------------------------------

NEAREST_CHUNK = 1 << 16  # distinct colours per distance matrix: ~10 MB whatever the image


def nearest_colors(image, chunk=NEAREST_CHUNK, between_chunks=None):
    """(H, W, 3) uint8 colours -> (index into LABELS of the nearest palette colour, squared
    Euclidean RGB distance to it), both (H, W).

    The one nearest-colour rule of the project. Distances are computed per distinct colour
    rather than per pixel: a label map has a few thousand after JPEG, a photo tens of thousands;
    a hostile image may have one per pixel, so they are taken `chunk` distinct colours at a
    time (memory bounded by the chunk, time by the pixel count), with `between_chunks()` called
    before each (the page's request deadline).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    codes = (image[..., 0].astype(np.int32) << 16) | (image[..., 1].astype(np.int32) << 8) \
        | image[..., 2]
    unique, inverse = np.unique(codes, return_inverse=True)
    nearest = np.empty(len(unique), np.intp)
    distance = np.empty(len(unique), np.int32)
    palette = PALETTE.astype(np.int32)
    for start in range(0, len(unique), chunk):
        if between_chunks is not None:
            between_chunks()
        part = unique[start:start + chunk]
        colors = np.stack([part >> 16, (part >> 8) & 255, part & 255], axis=1)
        squared = ((colors[:, None, :] - palette[None, :, :]) ** 2).sum(axis=2)
        best = squared.argmin(axis=1)  # ties: the first palette colour
        nearest[start:start + chunk] = best
        distance[start:start + chunk] = squared[np.arange(len(part)), best]
    inverse = inverse.reshape(codes.shape)
    return nearest[inverse], distance[inverse]


def decode_train_ids(label, max_distance=MAX_COLOR_DISTANCE):
    """(H, W, 3) uint8 colour label map -> (H, W) uint8 train IDs (255: ignored).

    Each pixel takes the train ID of its nearest palette colour; pixels farther than
    `max_distance` (Euclidean RGB) from every palette colour are ignored, and so are the void
    classes, whose train ID is 255 anyway.
    """
    nearest, squared = nearest_colors(label)  # refuses anything but (H, W, 3) uint8
    train_ids = np.array([train_id for _, train_id, _ in LABELS], dtype=np.uint8)
    return np.where(squared <= max_distance ** 2, train_ids[nearest], IGNORE_ID).astype(np.uint8)


# --- Converting the official download to the pix2pix layout --------------------------------

def official_pairs(cityscapes_dir, split):
    """(photo, colour label map) paths of one split, in sorted photo file-name order."""
    root = Path(cityscapes_dir)
    photo_dir = root / "leftImg8bit" / split
    if not photo_dir.is_dir():
        raise UserError(f"{photo_dir}: not found; --cityscapes_dir must hold the official "
                        "leftImg8bit/ and gtFine/ folders")
    photos = sorted(photo_dir.glob("*/*_leftImg8bit.png"), key=lambda p: p.name)
    if not photos:
        raise UserError(f"{photo_dir}: no CITY/*_leftImg8bit.png photos found")
    pairs = []
    for photo in photos:
        stem = photo.name[:-len("_leftImg8bit.png")]
        label = root / "gtFine" / split / photo.parent.name / f"{stem}_gtFine_color.png"
        if not label.is_file():
            raise UserError(f"{photo}: no colour label map; expected {label}")
        pairs.append((photo, label))
    return pairs


def side_by_side_pair(photo_path, label_path, size):
    """One (size, 2 * size, 3) uint8 array: photo left (bicubic), label map right (nearest).

    Like the public set, the 2:1 frame is squeezed to a square. Nearest neighbour keeps the
    label colours exact; PIL's bicubic resize is antialiased when it shrinks.
    """
    halves = []
    for path, resample in ((photo_path, Image.BICUBIC), (label_path, Image.NEAREST)):
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")  # the label maps are RGBA
        except (OSError, SyntaxError, ValueError) as e:
            raise UserError(f"{path}: cannot read the image ({e})") from None
        halves.append(np.asarray(image.resize((size, size), resample)))
    return np.concatenate(halves, axis=1)


def convert_official(cityscapes_dir, output_dir, size=256, splits=SPLITS, jpeg_quality=95):
    """Write output_dir/SPLIT/1.jpg, 2.jpg, ... from the official download; returns counts."""
    counts = {}
    for split in splits:
        pairs = official_pairs(cityscapes_dir, split)
        folder = Path(output_dir) / split
        if folder.is_dir() and any(folder.iterdir()):
            raise UserError(f"{folder}: already holds files; choose an empty --output_dir so "
                            "that no stale pair stays mixed with the new ones")
        for number, (photo, label) in enumerate(tqdm(pairs, desc=split, unit="pair"), 1):
            array = side_by_side_pair(photo, label, size)
            # 4:4:4 chroma keeps the label colours' edges crisp; 4:2:0 smears them.
            atomic_write(folder / f"{number}.jpg", lambda f, a=array: Image.fromarray(a).save(
                f, format="JPEG", quality=jpeg_quality, subsampling=0))
        counts[split] = len(pairs)
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Convert the official Cityscapes download to the pix2pix side-by-side "
                    "layout (photo left, colour label map right).")
    parser.add_argument("--convert", action="store_true", help="run the conversion")
    parser.add_argument("--cityscapes_dir", help="folder holding leftImg8bit/ and gtFine/")
    parser.add_argument("--output_dir", default="./dataset", help="where SPLIT/N.jpg go")
    parser.add_argument("--size", type=int, default=256, help="side of each half, in pixels")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    parser.add_argument("--jpeg_quality", type=int, default=95)
    args = parser.parse_args(argv)
    if not args.convert:
        raise UserError("nothing to do: pass --convert (see --help)")
    if not args.cityscapes_dir:
        raise UserError("--cityscapes_dir is required with --convert")
    if args.size < 1:
        raise UserError(f"--size must be >= 1, got {args.size}")
    if not 1 <= args.jpeg_quality <= 100:
        raise UserError(f"--jpeg_quality must be in 1..100, got {args.jpeg_quality}")
    counts = convert_official(args.cityscapes_dir, args.output_dir, args.size, args.splits,
                              args.jpeg_quality)
    for split, count in counts.items():
        print(f"{Path(args.output_dir) / split}: {count} pairs of {args.size}x{args.size}")
    return counts


if __name__ == "__main__":
    run_cli(main)
