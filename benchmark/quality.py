"""Photo quality for the same compute: train each named configuration for the same budget and
score its validation photos.

    python -m benchmark.quality                          # every configuration, 2 seeds, 64x64
    python -m benchmark.quality --configs paper,ema --seeds 0,1,2
    python -m benchmark.quality --configs paper,ema+resize+hinge --image_size 256 --channels 64

Every configuration trains with train.py's own loop (train.train) on the same synthetic data
with the real public set's profile (demo.data, profile "real": dark grey photos, JPEG-ringed
label maps with blended borders; ../shared/CITYSCAPES.md), the same batch size, step count and
seed set, and is scored on the same validation pairs, with the generator loaded from its
generator.pth as inference.py loads it:
  - FID and KID with the real Inception weights (metrics.py), all validation photos;
  - segmentation consistency (benchmark/segmenter.py): a small segmentation network trained
    once on the real training photos (cached), applied to the generated photos against the
    input label maps: pixel accuracy and mean IoU; its score on the real validation photos is
    the upper bound;
  - L1 and PSNR against the real photos;
  - wall seconds of training.
A configuration is the paper's settings (config.PRESETS["paper"]) with its flags over them;
"paper@batchstats" scores the paper's checkpoints again in the paper's test mode (batch
statistics of each image, dropout on) instead of eval-mode batch norm. Results go to a JSON file
and a table: per configuration the mean over seeds and the spread (min..max).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import metrics
from benchmark import segmenter as seg
from config import TrainConfig, apply_preset
from dataset import PairDataset
from demo.data import write_demo_dataset
from inference import load_generator
from utils import psnr, to_uint8

# Each lever alone over the paper's configuration, then combinations.
CONFIGS = {
    "paper": {},
    "ema": {"ema_decay": 0.999},
    "resize": {"upsample": "resize"},
    "hinge": {"gan_loss": "hinge"},
    "ttur": {"lr_d": 4e-4},
    "sn": {"spectral_norm": True},
    "fm": {"feature_matching": 10.0},
    "msd": {"discriminator_scales": 2},
    "ema+resize+hinge": {"ema_decay": 0.999, "upsample": "resize", "gan_loss": "hinge"},
    "onehot": {"label_input": "onehot"},
    "ema+resize+hinge+onehot": {"ema_decay": 0.999, "upsample": "resize", "gan_loss": "hinge",
                                "label_input": "onehot"},
    "ema+resize+hinge+fm": {"ema_decay": 0.999, "upsample": "resize", "gan_loss": "hinge",
                            "feature_matching": 10.0},
    "ema+resize+hinge+msd": {"ema_decay": 0.999, "upsample": "resize", "gan_loss": "hinge",
                             "discriminator_scales": 2},
}
TEST_MODES = {"batchstats": "paper"}  # scored again on the checkpoints of this configuration
METRICS = ("fid", "kid", "pixel_accuracy", "mean_iou", "l1", "psnr", "train_seconds")
LOWER_IS_BETTER = {"fid", "kid", "l1", "train_seconds"}


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated, of: {', '.join(CONFIGS)}")
    parser.add_argument("--seeds", default="0,1", help="training seeds, comma-separated")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--channels", type=int, default=16,
                        help="width of both networks' first layer (the paper: 64)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per run")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_train", type=int, default=400)
    parser.add_argument("--num_val", type=int, default=100, help="scored validation pairs")
    parser.add_argument("--segmenter_steps", type=int, default=400)
    parser.add_argument("--work_dir", default="./quality_runs",
                        help="data, runs and the cached segmenter go here")
    parser.add_argument("--out", default=None, help="JSON results (default: WORK_DIR/quality.json)")
    parser.add_argument("--no_fid", action="store_true", help="skip FID/KID (no Inception)")
    args = parser.parse_args(argv)
    args.configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; choose of "
                     f"{', '.join(CONFIGS)}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    return args


# --- Data, judge and real statistics (once per benchmark) ---------------------------------------

def load_split(folder, image_size):
    """(labels, photos): (N, 3, H, W) tensors in [-1, 1] of a split, as validation reads it."""
    data = PairDataset(folder, image_size=image_size, train=False, label_side="right")
    items = [data[i] for i in range(len(data))]
    return (torch.stack([item["source"] for item in items]),
            torch.stack([item["target"] for item in items]))


def prepare(args, log=print):
    work = Path(args.work_dir)
    data_dir = work / f"data_{args.image_size}_{args.num_train}_{args.num_val}"
    if not (data_dir / "val" / f"{args.num_val}.jpg").is_file():
        write_demo_dataset(data_dir, args.num_train, args.num_val, size=args.image_size,
                           seed=0, profile="real")
    train_labels, train_photos = load_split(data_dir / "train", args.image_size)
    val_labels, val_photos = load_split(data_dir / "val", args.image_size)
    val_ids = seg.train_ids_of(val_labels)
    key = f"{data_dir.name}:{args.segmenter_steps}"
    judge, seconds = seg.cached_segmenter(work / f"segmenter_{data_dir.name}.pth", key,
                                          train_photos, seg.train_ids_of(train_labels),
                                          args.segmenter_steps, log)
    shared = {"data_dir": data_dir, "val_labels": val_labels, "val_photos": val_photos,
              "val_ids": val_ids, "judge": judge,
              "upper_bound": seg.consistency(judge, val_photos, val_ids),
              "segmenter_seconds": round(seconds, 1)}
    if not args.no_fid:
        shared["inception"] = metrics.load_inception("cpu")
        shared["real_features"] = metrics.inception_features(shared["inception"],
                                                             to_uint8(val_photos), "cpu")
    return shared


# --- One run: train, then score -------------------------------------------------------------

def run_config(name, seed, args, shared, log=print):
    """Train configuration `name` with `seed`; returns its checkpoint path and wall seconds."""
    run_dir = Path(args.work_dir) / "runs" / f"{args.image_size}_{name}_seed{seed}"
    epochs = -(-args.steps * args.batch_size // args.num_train)
    flags = dict(preset="paper", data_dir=str(shared["data_dir"]), label_side="right",
                 image_size=args.image_size, generator_channels=args.channels,
                 discriminator_channels=args.channels, batch_size=args.batch_size,
                 epochs=epochs, max_steps=args.steps, seed=seed, num_workers=0,
                 val_every_epochs=epochs, checkpoint_every_steps=0, sample_every_steps=0,
                 log_every_steps=50, checkpoint_dir=str(run_dir / "checkpoints"),
                 log_file=str(run_dir / "training_log.json"), sample_dir=str(run_dir / "samples"))
    config = TrainConfig(**apply_preset({**flags, **CONFIGS[name]}))
    import train  # after the arguments are checked: it pulls in the whole training stack
    start = time.time()
    train.train(config, overwrite=True)
    seconds = time.time() - start
    log(f"{name} seed {seed}: trained {args.steps} steps in {seconds:.0f} s")
    return run_dir / "checkpoints" / "generator.pth", seconds


@torch.no_grad()
def generate(generator, labels, batch_statistics=False, batch_size=32):
    """Generated photos for `labels`: eval-mode batch norm, or (`batch_statistics`) the paper's
    test mode, one image at a time in train mode (its own statistics, dropout on)."""
    generator.train(batch_statistics)
    step = 1 if batch_statistics else batch_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same dropout draws for every configuration
        fakes = [generator(labels[i:i + step]).float() for i in range(0, len(labels), step)]
    generator.eval()
    return torch.cat(fakes).clamp(-1, 1)


def score(fake, shared):
    real = shared["val_photos"]
    # As saved photos would be: rounded to uint8 first.
    fake = to_uint8(fake).float().div(127.5).sub(1)
    values = {"l1": metrics.mean_l1(fake, real).mean().item(),
              "psnr": psnr(fake, real).mean().item()}
    values.update(seg.consistency(shared["judge"], fake, shared["val_ids"]))
    if "inception" in shared:
        features = metrics.inception_features(shared["inception"], to_uint8(fake), "cpu")
        kid, _ = metrics.kernel_inception_distance(features, shared["real_features"],
                                                   subset_size=min(1000, len(features)))
        values.update(fid=metrics.fid_from_features(features, shared["real_features"]),
                      kid=kid)
    return values


# --- Summary --------------------------------------------------------------------------------

def summarise(runs):
    """Per configuration and metric: mean, min, max over seeds."""
    table = {}
    for run in runs:
        table.setdefault(run["config"], []).append(run)
    summary = {}
    for name, rows in table.items():
        summary[name] = {"seeds": [r["seed"] for r in rows]}
        for metric in METRICS:
            values = [r[metric] for r in rows if r.get(metric) is not None]
            if values:
                summary[name][metric] = {"mean": statistics.fmean(values), "min": min(values),
                                         "max": max(values)}
    return summary


def beyond_spread(summary, name, baseline="paper"):
    """Metrics on which `name` beats `baseline` with no overlap of their seeds' ranges (none
    with fewer than two seeds: the spread is unknown)."""
    wins = []
    if min(len(summary[name]["seeds"]), len(summary.get(baseline, {}).get("seeds", []))) < 2:
        return wins
    for metric in METRICS:
        a, b = summary[name].get(metric), summary.get(baseline, {}).get(metric)
        if a is None or b is None or metric == "train_seconds":
            continue
        better = a["max"] < b["min"] if metric in LOWER_IS_BETTER else a["min"] > b["max"]
        if better:
            wins.append(metric)
    return wins


def format_table(summary, upper_bound=None):
    header = ("configuration", "FID", "KID x1000", "pixel acc", "mean IoU", "L1", "PSNR",
              "train s", "beats paper beyond spread")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    scale = {"kid": 1000}
    for name, row in summary.items():
        cells = [name]
        for metric in METRICS:
            if metric not in row:
                cells.append("-")
                continue
            k = scale.get(metric, 1)
            digits = 1 if metric in ("fid", "train_seconds", "kid") else 3
            digits = 2 if metric == "psnr" else digits
            m, lo, hi = (row[metric][x] * k for x in ("mean", "min", "max"))
            cells.append(f"{m:.{digits}f} [{lo:.{digits}f}–{hi:.{digits}f}]")
        cells.append(", ".join(beyond_spread(summary, name)) if name != "paper" else "")
        lines.append("| " + " | ".join(cells) + " |")
    if upper_bound:
        lines.append(f"| real photos (judge's upper bound) | | | "
                     f"{upper_bound['pixel_accuracy']:.3f} | {upper_bound['mean_iou']:.3f} | "
                     "| | | |")
    return "\n".join(lines)


def main(argv=None):
    args = parse(argv)
    torch.set_num_threads(torch.get_num_threads())
    shared = prepare(args, log=lambda m: print(m, file=sys.stderr))
    print(f"judge on real val photos: {shared['upper_bound']}", file=sys.stderr)
    runs = []
    for seed in args.seeds:  # configurations take turns, so a changing load hits all alike
        for name in args.configs:
            path, seconds = run_config(name, seed, args, shared,
                                       log=lambda m: print(m, file=sys.stderr))
            generator, _ = load_generator(path)
            modes = [(name, False)] + [(f"{name}@{mode}", True)
                                       for mode, of in TEST_MODES.items() if of == name]
            for label, batch_statistics in modes:
                values = score(generate(generator, shared["val_labels"], batch_statistics),
                               shared)
                runs.append({"config": label, "seed": seed, "train_seconds": seconds, **values})
                print(json.dumps(runs[-1]), file=sys.stderr)
    summary = summarise(runs)
    settings = {k: v for k, v in vars(args).items()}
    result = {"settings": settings, "data": "synthetic scenes with the real set's profile "
              f"(demo.data profile=real), {args.num_train} train / {args.num_val} val at "
              f"{args.image_size}x{args.image_size}", "configs": {c: CONFIGS[c] for c in
                                                                   args.configs},
              "judge_upper_bound": shared["upper_bound"],
              "segmenter_seconds": shared["segmenter_seconds"], "runs": runs,
              "summary": summary, "torch_threads": torch.get_num_threads()}
    out = Path(args.out or Path(args.work_dir) / "quality.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(format_table(summary, shared["upper_bound"]))
    print(f"results: {out}")
    return result


if __name__ == "__main__":
    main()
