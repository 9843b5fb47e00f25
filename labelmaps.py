"""What a label map looks like, measured: the cues that tell a label map from a photo, the one
label-half detector for side-by-side pairs (training, `dataset.py --check` and inference all use
it), and single-channel id maps turned into Cityscapes colours.

The cues were chosen against the measured statistics of the real public set
(`../shared/CITYSCAPES.md`), not against our own scenes. There, a label half has *more*
distinct colours than its photo (JPEG rings around its saturated colours, and its borders were
blended when it was downscaled), so counting colours picks the photo. What does separate them:

  palette share  the share of pixels within 25 (Euclidean RGB) of a Cityscapes colour:
                 0.81-0.94 on real label halves, 0.13-0.56 on real photo halves.
  flat share     the share of pixels whose 3x3 neighbourhood varies by at most 3 in every
                 channel: a label map is piecewise constant, JPEG leaves most of each region's
                 interior untouched; a photo has texture and noise nearly everywhere. It needs no
                 palette, so it decides for label maps in other colours.
"""

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cityscapes import IGNORE_ID, LABEL_IDS, LABELS, MAX_COLOR_DISTANCE, nearest_colors
from utils import UserError

LABEL_FORMATS = ("auto", "color", "label_ids", "train_ids")

# Decision margins of the label-half detector (see decide_half and detect_label_side).
PALETTE_ON = 0.6  # a label half in Cityscapes colours has at least this palette share ...
PALETTE_GAP = 0.2  # ... and this much more than the photo half
FLAT_GAP = 0.15  # without the palette: this much more flat share than the other half
FLAT_TOLERANCE = 3  # a 3x3 neighbourhood is flat when it varies by at most this
BLANK = 0.97  # a half flatter than this is nearly one colour: no evidence either way
SAMPLE_FILES = 16  # files looked at per dataset
MIN_DECIDED = 0.75  # share of the sampled files that must decide ...
MIN_AGREEMENT = 0.9  # ... and share of those that must agree


# --- Cues -----------------------------------------------------------------------------------

def palette_share(image, max_distance=MAX_COLOR_DISTANCE):
    """Share of the pixels of an (H, W, 3) uint8 image within `max_distance` of a Cityscapes
    colour."""
    _, squared = nearest_colors(image)
    return float((squared <= max_distance ** 2).mean())


def flat_share(image, tolerance=FLAT_TOLERANCE):
    """Share of the interior pixels of an (H, W, 3) uint8 image whose 3x3 neighbourhood varies by
    at most `tolerance` in every channel."""
    image = np.asarray(image, dtype=np.int16)
    height, width = image.shape[:2]
    if height < 3 or width < 3:
        return 0.0
    shifts = [image[dy:height - 2 + dy, dx:width - 2 + dx] for dy in range(3) for dx in range(3)]
    spread = (np.maximum.reduce(shifts) - np.minimum.reduce(shifts)).max(axis=-1)
    return float((spread <= tolerance).mean())


def distinct_colors(image, bits=4):
    """Distinct colours of an (H, W, 3) uint8 image after keeping `bits` bits per channel."""
    q = (np.asarray(image) >> (8 - bits)).astype(np.int32)
    return len(np.unique((q[..., 0] << (2 * bits)) | (q[..., 1] << bits) | q[..., 2]))


def profile(image):
    """The statistics of `../shared/CITYSCAPES.md`'s table of the real set, for one half."""
    image = np.asarray(image)
    pixels = image.astype(np.float64)
    pairs = np.abs(np.diff(image.astype(np.int16), axis=1)).max(axis=-1)
    peak = pixels.max(axis=-1)
    saturation = np.where(peak > 0, (peak - pixels.min(axis=-1)) / np.maximum(peak, 1), 0)
    return {"distinct_colors": distinct_colors(image), "palette_share": palette_share(image),
            "smooth_pairs": float((pairs < 8).mean()), "saturation": float(saturation.mean()),
            "intensity": float(pixels.mean())}


def in_cityscapes_colours(label_maps, minimum=PALETTE_ON):
    """Whether (H, W, 3) uint8 label maps are drawn in the Cityscapes palette: the median of
    their palette shares is at least `minimum`. The real set's JPEG label halves have 0.81-0.94
    (its photo halves 0.13-0.56); label maps in colours of their own have little."""
    shares = [palette_share(label) for label in label_maps]
    return bool(shares) and float(np.median(shares)) >= minimum


def split_halves(array, path=""):
    """(left, right) halves of a side-by-side (H, 2W, 3) array: the one rule for splitting (an
    odd last column belongs to neither)."""
    half = array.shape[1] // 2
    if half < 1:
        raise UserError(f"{path}: too narrow to hold two halves")
    return np.ascontiguousarray(array[:, :half]), np.ascontiguousarray(array[:, half:2 * half])


@dataclass(frozen=True)
class HalfEvidence:
    """The cues of both halves of one side-by-side file, and the side they point to."""

    palette: tuple  # (left, right) palette shares
    flat: tuple  # (left, right) flat shares
    side: str | None  # "left", "right", or None when the halves look alike
    cue: str  # "palette", "flat" or "" (undecided)


def decide_half(array):
    """Which half of one (H, 2W, 3) side-by-side array is the label map, with the evidence.

    The palette decides when one half is mostly on it and clearly more than the other; label
    maps in other colours fall back on flatness, which must differ by a clear margin and by a
    factor of two (two label halves, as in a wide label map, differ in flatness too, but not so),
    and not because one half is blank.
    """
    left, right = split_halves(array)
    palette = (palette_share(left), palette_share(right))
    flat = (flat_share(left), flat_share(right))
    for cue, (a, b), decides in (
            ("palette", palette, max(palette) >= PALETTE_ON and abs(palette[0] - palette[1])
             >= PALETTE_GAP),
            ("flat", flat, abs(flat[0] - flat[1]) >= FLAT_GAP and max(flat) >= 2 * min(flat)
             and max(flat) <= BLANK)):
        if decides:
            return HalfEvidence(palette, flat, "left" if a > b else "right", cue)
    return HalfEvidence(palette, flat, None, "")


@dataclass(frozen=True)
class LabelSide:
    """The label half decided for a whole dataset, and the evidence to print with it."""

    side: str
    evidence: str

    def __str__(self):
        return f"label map: {self.side} half ({self.evidence})"


def _summary(side, votes):
    """'89 % of its pixels on the Cityscapes palette, 30 % of the left half's' (medians)."""
    other = "left" if side == "right" else "right"
    mine, theirs = (0, 1) if side == "left" else (1, 0)
    cue = max(("palette", "flat"), key=lambda c: sum(v.cue == c for v in votes))
    chosen = [v for v in votes if v.cue == cue]
    values = [v.palette if cue == "palette" else v.flat for v in chosen]
    a = np.median([v[mine] for v in values]) * 100
    b = np.median([v[theirs] for v in values]) * 100
    what = "on the Cityscapes palette" if cue == "palette" else "in flat 3x3 neighbourhoods"
    return (f"{a:.0f} % of its pixels {what}, {b:.0f} % of the {other} half's; "
            f"{sum(v.side == side for v in votes)} of {len(votes)} sampled files agree")


def detect_label_side(paths, read, sample=SAMPLE_FILES, what="side-by-side pairs",
                      alike_is_none=False):
    """The label half of a dataset of side-by-side files, decided once over a sample.

    `read(path)` decodes a file to (H, W, 3) uint8 (raising UserError if it cannot; such files
    are left to be reported where they are loaded). Returns a LabelSide. Raises UserError with a
    request for --label_side when too few files decide or the files disagree; with
    `alike_is_none`, returns None instead when no file's halves differ at all (wide label maps,
    not pairs: what inference needs to know).
    """
    paths = list(paths)
    step = max(1, len(paths) // sample)
    votes = []
    for path in paths[::step][:sample]:
        try:
            votes.append(decide_half(read(path)))
        except UserError:
            continue
    folder = Path(paths[0]).parent if paths else Path(".")
    if not votes:
        raise UserError(f"{folder}: no readable {what} to tell the label half from; "
                        "pass --label_side left|right")
    counts = {s: sum(v.side == s for v in votes) for s in ("left", "right")}
    side = max(counts, key=counts.get)
    decided = counts["left"] + counts["right"]
    if alike_is_none and decided == 0:
        return None
    if decided < MIN_DECIDED * len(votes) or counts[side] < MIN_AGREEMENT * decided:
        hint = "; or --input_layout labels if they are plain label maps" if alike_is_none else ""
        raise UserError(
            f"{folder}: cannot tell which half is the label map ({counts['left']} of "
            f"{len(votes)} sampled files point left, {counts['right']} right, "
            f"{len(votes) - decided} undecided); pass --label_side left|right{hint}")
    return LabelSide(side, _summary(side, votes))


# --- Single-channel id maps -----------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _id_colors(kind):
    """(256, 3) uint8 lookup from an id to its colour, and the set of valid ids."""
    table = np.zeros((256, 3), np.uint8)
    valid = set()
    for name, train_id, color in LABELS:
        if kind == "train_ids" and train_id == IGNORE_ID:
            continue  # several void classes share 255; it turns black, as "unlabeled"
        for i in (LABEL_IDS[name] if kind == "label_ids" else [train_id]):
            table[i] = color
            valid.add(i)
    if kind == "train_ids":
        valid.add(IGNORE_ID)
    return table, valid


def colorize_ids(ids, path, label_format="auto"):
    """(H, W) uint8 class ids -> (H, W, 3) Cityscapes colours.

    `label_format` "label_ids" (the official *_gtFine_labelIds.png, 0-33) or "train_ids"
    (*_gtFine_trainIds.png, 0-18 and 255 ignored, which turns black); "auto" decides from the
    values when only one table fits them all. Other values are refused naming the file.
    """
    present = set(np.unique(ids).tolist())
    fits = [kind for kind in ("label_ids", "train_ids") if present <= _id_colors(kind)[1]]
    if label_format == "auto":
        if len(fits) == 1:
            label_format = fits[0]
        elif not fits:
            raise UserError(f"{path}: the label map is single-channel with values "
                            f"{_values(present)}, not Cityscapes label ids (0-33) or train ids "
                            "(0-18, 255); a colour label map or an id map is expected")
        else:
            raise UserError(f"{path}: the single-channel label map's values {_values(present)}"
                            " fit both Cityscapes label ids and train ids; pass --label_format "
                            "label_ids or train_ids")
    elif label_format not in fits:
        valid = "0-33" if label_format == "label_ids" else "0-18 and 255"
        raise UserError(f"{path}: --label_format {label_format}: the map holds values "
                        f"{_values(present - _id_colors(label_format)[1])} outside {valid}")
    return _id_colors(label_format)[0][ids]


def _values(values):
    values = sorted(values)
    return ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")
