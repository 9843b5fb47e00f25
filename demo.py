"""`python train.py --demo`: make the synthetic street-scene set, train on it, and compare the
result with what a per-class colour lookup table achieves.

The paper's networks (widths unchanged, U-Net depth 7 for 128x128) on 2 CPU cores in a few
minutes. Every default below can be overridden with the usual train.py flags.
"""

from pathlib import Path


import train
from config import TrainConfig
from dataset import PairDataset
from demo_data import fit_color_lookup, lookup_l1, write_demo_dataset
from utils import to_uint8

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


def lookup_baseline(config):
    """Validation L1 of painting each class with its mean training colour."""
    root = Path(config.data_dir)
    splits = {}
    for split in ("train", "val"):
        splits[split] = as_arrays(PairDataset(root / split, image_size=config.image_size,
                                              train=False, layout=config.layout,
                                              label_side=config.label_side))
    table = fit_color_lookup(splits["train"])
    return lookup_l1(table, splits["val"])


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
    summary["lookup_l1"] = lookup_baseline(config)
    print(f"validation L1 (pixels in [-1, 1]): model {summary['val_l1']:.4f}, "
          f"per-class colour lookup {summary['lookup_l1']:.4f}")
    print(f"checkpoint: {Path(config.checkpoint_dir) / 'generator.pth'}; log: "
          f"{config.log_file}; samples: {config.sample_dir}/")
    return summary


