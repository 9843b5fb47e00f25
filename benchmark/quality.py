"""Photo quality for the same compute: train each named configuration for the same budget and
score its validation photos.

    python -m benchmark.quality                          # every configuration, 2 seeds, 64x64
    python -m benchmark.quality --configs paper,ema --seeds 0,1,2
    python -m benchmark.quality --configs paper,ema+resize+hinge --image_size 256 --channels 64
    python -m benchmark.quality --data_dir ../shared/camvid --configs default,paper,oasis \
        --image_size 64 --channels 16 --steps 200 --score_points 2   # real photos (docs/quality.md)

Every configuration trains with train.py's own loop (train.train) on the same data, the same
batch size, step count and seed set, and is scored on the same validation pairs, with the
generator loaded from its generator.pth as inference.py loads it. The data: with --data_dir, a
real side-by-side set (photo left, label map right; e.g. ../shared/camvid, real street photos:
every quality decision is made there); without it, synthetic scenes with the real public set's
profile (demo.data, profile "real"; ../shared/CITYSCAPES.md), for tests and quick looks. Scores:
  - FID and KID with the real Inception weights (metrics.py), all validation photos;
  - segmentation consistency (benchmark/segmenter.py): a small segmentation network trained
    once on the real training photos (cached), applied to the generated photos against the
    input label maps: pixel accuracy and mean IoU over the classes the training labels hold
    (CamVid: its 11); its score on the real validation photos is the ceiling;
  - artefacts (artefacts()): per-channel mean and spread against the real photos (a colour
    cast), the column profile of |generated - real| (edge stripes), the spectrum's power on
    the 2- and 4-pixel grid frequencies against the real photos' (a grid);
  - L1 and PSNR against the real photos;
  - wall seconds of training. With --score_points K each run is also scored at K-1 earlier
    points (the run continued with train.py's resume, the same run): the time-to-quality view,
    and the comparison at equal wall time (every configuration at its last point within the
    shortest run's time).
A configuration is the paper's settings (config.PRESETS["paper"]) with its flags over them;
"paper@batchstats" scores the paper's checkpoints again in the paper's test mode (batch
statistics of each image, dropout on) instead of eval-mode batch norm. Results go to a JSON file
and a table: per configuration the mean over seeds and the spread (min..max).
"""

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import metrics
from benchmark import segmenter as seg
from benchmark.artefacts import artefacts
from benchmark.quality_report import print_tables, report
from config import TrainConfig, apply_preset
from dataset import PairDataset
from demo.data import write_demo_dataset
from demo.run import apply_color_lookup, fit_color_lookup
from inference import load_generator
from utils import psnr, to_uint8, to_unit_range

# Each lever alone over the paper's configuration, then combinations.
CONFIGS = {
    "paper": {},
    # Today's defaults (config.TrainConfig): on CamVid's Cityscapes-coloured label maps
    # `--gan_loss auto` trains OASIS's discriminator, so "default" is "oasis" there.
    "default": {"preset": "default"},
    "oasis": {"preset": "default", "gan_loss": "oasis"},
    "oasis+labelmix": {"preset": "default", "gan_loss": "oasis", "labelmix": 10.0},
    # A frozen segmenter of real photos as G's extra loss (segmentation.py); with it in a
    # benchmark, the judge and that segmenter are trained on different video sequences.
    "oasis+segmenter": {"preset": "default", "gan_loss": "oasis", "segmenter_loss": 1.0},
    "default+hinge": {"preset": "default", "gan_loss": "hinge"},  # the default until 2026-12-03
    "default+shallow": {"preset": "default", "padding": "shallow"},  # no frame at the border
    "ema": {"ema_decay": 0.999},
    "resize": {"upsample": "resize"},
    "hinge": {"gan_loss": "hinge"},
    "ema+resize+hinge": {"ema_decay": 0.999, "upsample": "resize", "gan_loss": "hinge"},
}
# Scored again, on the final checkpoints of these configurations: the paper's test mode, and
# batch-norm statistics recomputed for the weights that are scored (generate()).
TEST_MODES = {"batchstats": ("paper",), "precisebn": ("default", "oasis")}


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated, of: {', '.join(CONFIGS)}")
    parser.add_argument("--seeds", default="0,1", help="training seeds, comma-separated")
    parser.add_argument("--data_dir", default=None,
                        help="a real side-by-side set with train/ and val/ (photo left, label map "
                             "right), e.g. ../shared/camvid; default: synthetic scenes")
    parser.add_argument("--baseline", default="paper",
                        help="the configuration others must beat beyond the spread")
    parser.add_argument("--score_points", type=int, default=1,
                        help="score each run at this many evenly spaced steps (time to quality)")
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
    parser.add_argument("--score_only", action="store_true",
                        help="train nothing: score the final checkpoints of the runs already in "
                             "WORK_DIR for these settings")
    parser.add_argument("--report", default=None, metavar="JSON[,JSON]",
                        help="train nothing: print the tables of saved results, runs of "
                             "several files together (same settings)")
    args = parser.parse_args(argv)
    args.configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; choose of "
                     f"{', '.join(CONFIGS)}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.score_points < 1 or args.score_points > args.steps:
        parser.error("--score_points must be between 1 and --steps")
    if args.data_dir and not (Path(args.data_dir) / "train").is_dir():
        parser.error(f"--data_dir {args.data_dir}: no train/ folder there")
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
    if args.data_dir:  # real photos, as they are
        data_dir = Path(args.data_dir).resolve()
        name = f"{data_dir.name}_{args.image_size}"
    else:
        data_dir = work / f"data_{args.image_size}_{args.num_train}_{args.num_val}"
        name = data_dir.name
        if not (data_dir / "val" / f"{args.num_val}.jpg").is_file():
            write_demo_dataset(data_dir, args.num_train, args.num_val, size=args.image_size,
                               seed=0, profile="real")
    train_labels, train_photos = load_split(data_dir / "train", args.image_size)
    val_labels, val_photos = load_split(data_dir / "val", args.image_size)
    train_ids, val_ids = seg.train_ids_of(train_labels), seg.train_ids_of(val_labels)
    classes = seg.classes_present(train_ids)
    judged, split = range(len(train_photos)), {}
    if any(CONFIGS[c].get("segmenter_loss") for c in args.configs):
        if args.data_dir:  # real photos: consecutive frames of drives
            judged, trained = seg.sequence_split(train_photos, val_photos)
        else:  # synthetic scenes are independent: halves
            half = len(train_photos) // 2
            judged, trained = range(half, len(train_photos)), range(0, half)
        split = {"judge_photos": len(judged), "segmenter_photos": len(trained),
                 "sequences": [len(s) for s in seg.video_sequences(train_photos)]}
        key = f"{name}:{trained.start}-{trained.stop}:{args.segmenter_steps}"
        split["segmenter_path"] = seg.layout_segmenter(
            work / f"layout_segmenter_{name}.pth", key, train_photos[trained],
            train_ids[trained], args.segmenter_steps, log)
        name += "_split"
    key = f"{name}:{len(judged)}:{args.segmenter_steps}"
    judge, seconds = seg.cached_segmenter(work / f"segmenter_{name}.pth", key,
                                          train_photos[judged], train_ids[judged],
                                          args.segmenter_steps, log)
    shared = {"data_dir": data_dir, "val_labels": val_labels, "val_photos": val_photos,
              "train_labels": train_labels,
              "val_ids": val_ids, "judge": judge, "classes": classes,
              "upper_bound": seg.consistency(judge, val_photos, val_ids, classes),
              "judge_probes": judge_probes(judge, val_photos, val_ids, classes,
                                           lookup_table_photos(val_labels, train_labels,
                                                               train_photos)),
              "segmenter_seconds": round(seconds, 1), "split": split,
              "data": (f"real photos from {args.data_dir}" if args.data_dir else
                       "synthetic scenes with the real set's profile (demo.data profile=real)")
              + f", {len(train_photos)} train / {len(val_photos)} val at "
                f"{args.image_size}x{args.image_size}, {len(classes)} classes scored"
              + (f"; judge trained on {len(judged)} train photos, G's segmenter on the other "
                 f"{len(train_photos) - len(judged)} "
                 f"({'other video sequences' if args.data_dir else 'other scenes'})"
                 if split else "")}
    if not args.no_fid:
        shared["inception"] = metrics.load_inception("cpu")
        shared["real_features"] = metrics.inception_features(shared["inception"],
                                                             to_uint8(val_photos), "cpu")
    return shared


def judge_probes(judge, photos, ids, classes, painted):
    """The judge's mean IoU on the real val photos as they are and with each of the two looks
    that generated photos have: blurred (2x down and up, bilinear) and carrying a 2-pixel
    checkerboard of amplitude 0.1 (about 13 levels); and on the val label maps painted with
    each class's mean colour in the training photos (`painted`: no texture at all, the colour
    lookup table). A judge that scores the checkerboard above the blur rewards texture over layout;
    one that scores the lookup table near the real photos reads class colours, not photos."""
    size = photos.shape[-2:]
    blurred = F.interpolate(F.avg_pool2d(photos, 2), size=size, mode="bilinear",
                            align_corners=False)
    rows, cols = torch.arange(size[0])[:, None], torch.arange(size[1])[None]
    checker = ((rows + cols) % 2 * 2 - 1) * 0.1
    return {name: seg.consistency(judge, images.clamp(-1, 1), ids, classes)["mean_iou"]
            for name, images in (("real", photos), ("blurred", blurred),
                                 ("checkerboard", photos + checker),
                                 ("lookup", painted))}


def lookup_table_photos(labels, train_labels, train_photos):
    """(N, 3, H, W) label maps in [-1, 1] -> the photos the demo's colour lookup table predicts
    for them (demo.run: each palette class's mean colour over the training pairs)."""
    def arrays(images):
        return to_uint8(images).permute(0, 2, 3, 1).numpy()

    table = fit_color_lookup(zip(arrays(train_labels), arrays(train_photos)))
    painted = np.stack([apply_color_lookup(table, label) for label in arrays(labels)])
    return to_unit_range(torch.from_numpy(painted).permute(0, 3, 1, 2))


# --- One run: train, then score -------------------------------------------------------------

def run_config(name, seed, args, shared, log=print):
    """Train configuration `name` with `seed`, stopping at each score point; yields (step,
    generator.pth path, training seconds so far) at each."""
    run_dir = Path(args.work_dir) / "runs" / \
        f"{Path(str(shared['data_dir'])).name}_{args.image_size}_{name}_seed{seed}"
    num_train = len(PairDataset(shared["data_dir"] / "train", image_size=args.image_size,
                                train=False, label_side="right"))
    epochs = -(-args.steps * args.batch_size // num_train)
    flags = dict(preset="paper", data_dir=str(shared["data_dir"]), label_side="right",
                 image_size=args.image_size, generator_channels=args.channels,
                 discriminator_channels=args.channels, batch_size=args.batch_size,
                 epochs=epochs, max_steps=args.steps, seed=seed, num_workers=0,
                 val_every_epochs=epochs, checkpoint_every_steps=0, sample_every_steps=0,
                 log_every_steps=math.gcd(*score_steps(args.steps, args.score_points)),
                 checkpoint_dir=str(run_dir / "checkpoints"),
                 log_file=str(run_dir / "training_log.json"), sample_dir=str(run_dir / "samples"))
    if CONFIGS[name].get("segmenter_loss"):
        flags["segmenter"] = shared["split"]["segmenter_path"]
    import train  # after the arguments are checked: it pulls in the whole training stack
    from checkpoints import load_resume_state
    points = score_steps(args.steps, args.score_points)
    latest = run_dir / "checkpoints" / "latest.pth"
    if args.score_only:
        log_file = json.loads(Path(flags["log_file"]).read_text())
        yield log_file["steps"][-1]["step"], run_dir / "checkpoints" / "generator.pth", \
            log_file["steps"][-1]["seconds"]
        return
    for k, step in enumerate(points):
        config = TrainConfig(**apply_preset({**flags, **CONFIGS[name], "max_steps": step}))
        if k == 0:
            train.train(config, overwrite=True)
        else:  # the same run continued: its RNG, optimisers and EMA as they were
            train.train(config, resume_from=(load_resume_state(latest), latest))
        # The step reached and the training seconds as the run's log counts them (the scoring
        # in between left out); a run stopped early (SIGTERM) says so rather than pass.
        last = json.loads(Path(config.log_file).read_text())["steps"][-1]
        if last["step"] != step:
            raise SystemExit(f"{name} seed {seed}: stopped at step {last['step']} of {step}")
        log(f"{name} seed {seed}: {step} steps in {last['seconds']:.0f} s of training")
        yield step, run_dir / "checkpoints" / "generator.pth", last["seconds"]


def score_steps(steps, points):
    """`points` evenly spaced steps ending at `steps`."""
    return sorted({round(steps * (k + 1) / points) for k in range(points)})


@torch.no_grad()
def precise_batch_norm(generator, labels, batch_size=16):
    """A copy of `generator` whose batch-norm running statistics are the plain average over
    `labels` (training label maps) of the statistics its own weights produce (dropout off).
    The EMA generator's statistics are copied from the live one, whose weights it trails
    (ema.GeneratorEMA): this tells whether that mismatch costs quality."""
    generator = copy.deepcopy(generator).eval()
    norms = [m for m in generator.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average
        norm.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        order = torch.randperm(len(labels))
    for i in range(0, len(labels) - batch_size + 1, batch_size):
        generator(labels[order[i:i + batch_size]])
    return generator.eval()


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
    values.update(seg.consistency(shared["judge"], fake, shared["val_ids"], shared["classes"]))
    values.update(artefacts(fake, real))
    if "inception" in shared:
        features = metrics.inception_features(shared["inception"], to_uint8(fake), "cpu")
        kid, _ = metrics.kernel_inception_distance(features, shared["real_features"],
                                                   subset_size=min(1000, len(features)))
        values.update(fid=metrics.fid_from_features(features, shared["real_features"]),
                      kid=kid)
    return values


def main(argv=None):
    args = parse(argv)
    if args.report:
        return report(args.report.split(","), args.baseline)
    torch.set_num_threads(torch.get_num_threads())
    shared = prepare(args, log=lambda m: print(m, file=sys.stderr))
    print(f"judge on real val photos: {shared['upper_bound']}; mean IoU on val photos real, "
          f"blurred, checkerboarded and painted from the colour lookup table: "
          f"{shared['judge_probes']}", file=sys.stderr)
    runs = []
    for seed in args.seeds:  # configurations take turns, so a changing load hits all alike
        for name in args.configs:
            for step, path, seconds in run_config(name, seed, args, shared,
                                                  log=lambda m: print(m, file=sys.stderr)):
                generator, _ = load_generator(path)
                modes = [name] + [f"{name}@{mode}" for mode, of in TEST_MODES.items()
                                  if name in of and step == args.steps]
                for label in modes:
                    shown = precise_batch_norm(generator, shared["train_labels"]) \
                        if label.endswith("@precisebn") else generator
                    values = score(generate(shown, shared["val_labels"],
                                            label.endswith("@batchstats")), shared)
                    runs.append({"config": label, "seed": seed, "step": step,
                                 "train_seconds": seconds, **values})
                    print(json.dumps(runs[-1]), file=sys.stderr)
    summary, summary_time = print_tables(runs, args.steps, args.baseline,
                                         shared["upper_bound"], shared["data"],
                                         shared["judge_probes"])
    result = {"settings": vars(args), "data": shared["data"],
              "configs": {c: CONFIGS[c] for c in args.configs},
              "judge_upper_bound": shared["upper_bound"], "classes": shared["classes"],
              "judge_probes": shared["judge_probes"], "split": shared["split"],
              "segmenter_seconds": shared["segmenter_seconds"], "runs": runs,
              "summary": summary, "summary_equal_time": summary_time,
              "torch_threads": torch.get_num_threads()}
    out = Path(args.out or Path(args.work_dir) / "quality.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"results: {out}")
    return result


if __name__ == "__main__":
    main()
