"""`python train.py --demo`: make the synthetic street-scene set, then (after train.py has
trained on it) compare the result with what a per-class colour lookup table achieves.

Today's default networks (widths unchanged, U-Net depth 7 for 128x128): 6-10 minutes on 2
CPU cores (5 min 48 s measured in fp32, 2026-12-02). Every default below can be overridden with
the usual train.py flags. The direction is one way: train.py calls `demo_config` and
`report`; nothing here imports train.py.
"""

from pathlib import Path

import numpy as np
import torch

from cityscapes import PALETTE, nearest_colors
from config import TrainConfig
from dataset import PairDataset
from demo.data import write_demo_dataset
from demo.scenes import CLASS_INDEX
from inference import load_generator
from utils import to_uint8, to_unit_range

DEMO_DATA_DIR = "./demo_dataset"
DEMO_TRAIN_PAIRS = 200
DEMO_VAL_PAIRS = 20
DEMO_SETTINGS = {
    "image_size": 128,
    "epochs": 12,
    "batch_size": 4,
    "log_every_steps": 10,
    "sample_every_steps": 100,
    "checkpoint_every_steps": 200,
    "num_workers": 0,
}
COMPARED_CLASSES = ("road", "sidewalk", "building", "sky", "vegetation", "car", "person")


# --- The lookup-table baseline ----------------------------------------------------------------

def palette_index(labels):
    """(..., H, W, 3) uint8 label maps -> (..., H, W) index into the palette (nearest colour)."""
    labels = np.asarray(labels, dtype=np.uint8)
    flat = labels.reshape(-1, labels.shape[-2], 3)
    return nearest_colors(flat)[0].reshape(labels.shape[:-1])


def _check_pair(label, photo):
    if label.shape != photo.shape or label.ndim != 3 or label.shape[-1] != 3:
        raise ValueError(f"label and photo must be (H, W, 3) alike: {label.shape}, {photo.shape}")


def fit_color_lookup(pairs) -> np.ndarray:
    """(K, 3) mean photo colour of each palette class over (label, photo) uint8 pairs; classes
    never seen get mid-grey."""
    sums, counts = np.zeros((len(PALETTE), 3)), np.zeros(len(PALETTE))
    for label, photo in pairs:
        _check_pair(label, photo)
        index = palette_index(label).ravel()
        counts += np.bincount(index, minlength=len(PALETTE))
        for c in range(3):
            sums[:, c] += np.bincount(index, weights=photo[..., c].ravel(), minlength=len(PALETTE))
    return np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], 128.0)


def apply_color_lookup(table, label):
    """Paint each pixel with its class's mean photo colour: what a lookup table predicts."""
    return np.clip(np.rint(table[palette_index(label)]), 0, 255).astype(np.uint8)


def lookup_l1(table, pairs) -> float:
    """Mean |painted - photo| over all pixels and channels, in the model's [-1, 1] units."""
    total, count = 0.0, 0
    for label, photo in pairs:
        _check_pair(label, photo)
        total += np.abs(table[palette_index(label)] - photo).sum()
        count += photo.size
    if count == 0:
        raise ValueError("lookup_l1 needs at least one (label, photo) pair")
    return total / count / 127.5


# --- The demo run -----------------------------------------------------------------------------

def as_arrays(dataset):
    """(label, photo) uint8 (H, W, 3) arrays of a non-augmented dataset, at its image size."""
    pairs = []
    for i in range(len(dataset)):
        item = dataset[i]
        label, photo = item["source"], item["target"]
        if dataset.direction == "photo2label":
            label, photo = photo, label
        pairs.append(tuple(to_uint8(x).permute(1, 2, 0).numpy() for x in (label, photo)))
    return pairs


def compare_with_lookup(config):
    """Validation L1, overall and per class, of the trained generator (eval mode, outputs
    rounded to 8 bits as saved) and of painting each class with its mean training colour."""
    root = Path(config.data_dir)
    pairs = {split: as_arrays(PairDataset(root / split, image_size=config.image_size,
                                          train=False, layout=config.layout,
                                          label_side=config.label_side))
             for split in ("train", "val")}
    table = fit_color_lookup(pairs["train"])
    labels = np.stack([label for label, _ in pairs["val"]])  # (N, H, W, 3) uint8
    photos = np.stack([photo for _, photo in pairs["val"]]).astype(np.float64)
    generator, _ = load_generator(Path(config.checkpoint_dir) / "generator.pth")
    with torch.no_grad():
        fake = generator(to_unit_range(torch.from_numpy(labels).permute(0, 3, 1, 2)))
    classes = palette_index(labels)
    errors = {"model": np.abs(to_uint8(fake).permute(0, 2, 3, 1).numpy() - photos),
              "lookup": np.abs(table[classes] - photos)}
    rows = {}
    for name in (*COMPARED_CLASSES, "all"):
        mask = np.ones(classes.shape, bool) if name == "all" else classes == CLASS_INDEX[name]
        if mask.any():
            rows[name] = {"share": mask.mean(),
                          **{k: e[mask].mean() / 127.5 for k, e in errors.items()}}
    return rows


def print_comparison(rows):
    print("validation L1 (pixels in [-1, 1]): the model vs a per-class colour lookup table")
    print(f"  {'class':<12}{'pixels':>7}{'model':>9}{'lookup':>9}")
    for name, row in rows.items():
        print(f"  {name:<12}{row['share']:>7.0%}{row['model']:>9.4f}{row['lookup']:>9.4f}")


def demo_config(given):
    """The demo's TrainConfig (the user's flags over the demo's), its data set written first."""
    settings = {**DEMO_SETTINGS, "data_dir": DEMO_DATA_DIR, **given}
    settings.setdefault("decay_epochs", settings["epochs"] // 3)  # the last third decays
    config = TrainConfig(**settings)
    root = Path(config.data_dir)
    if not (root / "train").is_dir():
        print(f"writing the synthetic demo set to {root} ...")
        write_demo_dataset(root, num_train=DEMO_TRAIN_PAIRS, num_val=DEMO_VAL_PAIRS,
                           size=config.image_size, seed=0)
    return config


def report(config, summary):
    """After training: the lookup-table comparison and where the outputs are."""
    if "val_l1" not in summary:
        return summary
    if config.direction == "label2photo":
        rows = compare_with_lookup(config)
        print_comparison(rows)
        summary["lookup_l1"] = rows["all"]["lookup"]
    print(f"checkpoint: {Path(config.checkpoint_dir) / 'generator.pth'}; log: "
          f"{config.log_file}; samples: {config.sample_dir}/")
    return summary
