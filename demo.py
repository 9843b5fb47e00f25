"""`python train.py --demo`: make the synthetic street-scene set, train on it, and compare the
result with what a per-class colour lookup table achieves.

The paper's networks (widths unchanged, U-Net depth 7 for 128x128) on 2 CPU cores in a few
minutes. Every default below can be overridden with the usual train.py flags.
"""

from pathlib import Path

import numpy as np
import torch

import train
from config import TrainConfig
from dataset import PairDataset
from demo_data import (apply_color_lookup, fit_color_lookup, nearest_palette_index,
                       write_demo_dataset)
from inference import load_generator
from scenes import CLASS_INDEX
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
    errors = {"model": np.abs(to_uint8(fake).permute(0, 2, 3, 1).numpy() - photos),
              "lookup": np.abs(np.stack([apply_color_lookup(table, label) for label in labels])
                               - photos)}
    classes = nearest_palette_index(labels)
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


def run(given):
    settings = {**DEMO_SETTINGS, "data_dir": DEMO_DATA_DIR, **given}
    settings.setdefault("decay_epochs", settings["epochs"] // 3)  # the last third decays
    root = Path(settings["data_dir"])
    if not (root / "train").is_dir():
        print(f"writing the synthetic demo set to {root} ...")
        write_demo_dataset(root, num_train=DEMO_TRAIN_PAIRS, num_val=DEMO_VAL_PAIRS,
                           size=settings["image_size"], seed=0)
    config = TrainConfig(**settings)
    summary = train.train(config)
    if "val_l1" not in summary:
        return summary
    if config.direction == "label2photo":
        rows = compare_with_lookup(config)
        print_comparison(rows)
        summary["lookup_l1"] = rows["all"]["lookup"]
    print(f"checkpoint: {Path(config.checkpoint_dir) / 'generator.pth'}; log: "
          f"{config.log_file}; samples: {config.sample_dir}/")
    return summary


