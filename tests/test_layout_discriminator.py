"""The layout-aware discriminator (--gan_loss oasis, after OASIS, Schoenfeld et al. 2021): D
segments the photo alone into "fake" and the label classes, class-balanced; G asks for its
photo to be segmented as its label map says."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import losses
import train
from cityscapes import COLORS, IGNORE_ID, NUM_TRAIN_IDS, decode_train_ids
from config import TrainConfig
from conftest import tiny_config
from demo.data import real_profile_pair, save_real_profile_jpeg
from models import ModelConfig, PatchDiscriminator, build_discriminator
from checkpoints import load_checkpoint
from utils import UserError


def label_map(colours):
    """(H, W) grid of palette colour names -> (1, 3, H, W) label map in [-1, 1]."""
    rgb = torch.tensor([[COLORS[c] for c in row] for row in colours], dtype=torch.float32)
    return (rgb.permute(2, 0, 1)[None] / 127.5) - 1


def test_layout_classes_are_one_plus_the_train_id_and_void_or_blur_is_ignored():
    label = label_map([["road", "car", "unlabeled"], ["sky", "road", "road"]])
    label[0, :, 1, 2] = (torch.tensor([128, 64, 128]) + 40) / 127.5 - 1  # 69 from road: blur
    classes = losses.layout_classes(label)
    ignored = losses.IGNORED_CLASS
    assert classes.tolist() == [[[1, 14, ignored], [11, 1, ignored]]]  # road 0, car 13, sky 10


def test_layout_classes_follow_the_one_nearest_colour_rule_on_jpeg_label_maps(tmp_path):
    """On label maps with the real set's profile (JPEG rings, blended borders: thousands of
    distinct colours), the training targets are cityscapes.decode_train_ids's, pixel for pixel."""
    maps = []
    for k in range(3):
        label, _ = real_profile_pair(np.random.default_rng(k), 64)
        save_real_profile_jpeg(label, tmp_path / f"{k}.jpg")
        maps.append(np.asarray(Image.open(tmp_path / f"{k}.jpg").convert("RGB")))
    batch = torch.tensor(np.stack(maps)).permute(0, 3, 1, 2).float() / 127.5 - 1
    expected = np.stack([decode_train_ids(m).astype(np.int64) for m in maps])
    expected = np.where(expected == IGNORE_ID, losses.IGNORED_CLASS, expected + 1)
    classes = losses.layout_classes(batch).numpy()
    assert len(np.unique(np.stack(maps).reshape(-1, 3), axis=0)) > 500
    assert (classes == losses.IGNORED_CLASS).mean() > 0.01  # blurred borders are ignored
    assert np.array_equal(classes, expected)


def test_the_class_balanced_loss_makes_a_rare_class_weigh_as_much_as_a_common_one():
    classes = torch.ones(1, 10, 10, dtype=torch.long)  # road everywhere...
    classes[0, :, 0] = 14  # ...but one column of car: 10 % of the pixels
    logits = torch.zeros(1, NUM_TRAIN_IDS + 1, 10, 10)
    logits[:, 1] = 10.0  # D says "road" everywhere: right on 90 %, wrong on the car
    wrong = F.cross_entropy(logits[:, :, 0, 0], torch.tensor([14])).item()
    balanced = losses.oasis_loss(logits, classes, to_classes=True).item()
    # Plain CE would be about 0.1 * wrong; balanced, the car is half of the loss.
    assert math.isclose(balanced, 0.5 * wrong, rel_tol=0.01)
    # Against "fake" the same logits are all wrong; ignored pixels count in neither.
    classes[0, 5:] = losses.IGNORED_CLASS
    fake = losses.oasis_loss(logits, classes, to_classes=False).item()
    assert math.isclose(fake, F.cross_entropy(logits[:, :, 0, 0], torch.tensor([0])).item(),
                        rel_tol=1e-4)
    # A D that segments right scores a lower loss than one that does not.
    good = torch.zeros_like(logits).scatter_(1, classes.clamp_min(0)[:, None], 10.0)
    assert losses.oasis_loss(good, classes, True) < 0.01 < losses.oasis_loss(logits, classes, True)


@pytest.mark.parametrize("shape, size", [((2, 20, 30, 30), (256, 256)), ((1, 3, 7, 13), (64, 40)),
                                         ((1, 2, 1, 1), (5, 3))])
def test_logits_reach_the_label_size_as_bilinear_interpolation_does(shape, size):
    """to_label_size computes F.interpolate's bilinear upsampling as matrix products: the same
    values and gradients, in fp32 even under bf16 autocast."""
    logits = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(shape[:2] + size, dtype=torch.float64)
    expected = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    got = losses.to_label_size(logits, size)
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)  # fp32 rounding
    expected_grad, = torch.autograd.grad((expected * weights).sum(), logits)
    got_grad, = torch.autograd.grad((got * weights).sum(), logits)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = losses.to_label_size(logits.float(), size)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, got, rtol=0, atol=1e-5)


def test_the_oasis_loss_is_the_class_balanced_mean_of_per_pixel_cross_entropy():
    """Against a per-pixel reference: each class present weighs |labelled| / (|present| *
    its count); ignored pixels weigh nothing; a map with no labelled pixel costs 0."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, NUM_TRAIN_IDS + 1, 9, 11, generator=generator, requires_grad=True)
    classes = torch.randint(1, 6, (3, 40, 50), generator=generator)
    classes[0, :7] = losses.IGNORED_CLASS
    classes[1, :, :3] = 17
    upsampled = F.interpolate(logits, size=(40, 50), mode="bilinear", align_corners=False)
    per_pixel = F.cross_entropy(upsampled, classes, reduction="none")
    labelled = classes != losses.IGNORED_CLASS
    present, counts = torch.unique(classes[labelled], return_counts=True)
    weight = torch.zeros(NUM_TRAIN_IDS + 1)
    weight[present] = labelled.sum() / (len(present) * counts.float())
    expected = (per_pixel * weight[classes.clamp_min(0)] * labelled).sum() / labelled.sum()
    got = losses.oasis_loss(logits, classes, to_classes=True)
    torch.testing.assert_close(got, expected)
    expected_grad, = torch.autograd.grad(expected, logits)
    got_grad, = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got_grad, expected_grad)
    as_fake = F.cross_entropy(upsampled, torch.zeros_like(classes), reduction="none")
    torch.testing.assert_close(losses.oasis_loss(logits, classes, to_classes=False),
                               as_fake[labelled].mean())
    nothing = torch.full_like(classes, losses.IGNORED_CLASS)
    assert losses.oasis_loss(logits, nothing, True).item() == 0
    assert losses.oasis_loss(logits, nothing, False).item() == 0


def test_the_oasis_discriminator_sees_the_photo_alone_and_gives_a_logit_per_class():
    config = TrainConfig(gan_loss="oasis", discriminator_channels=8, image_size=64)
    assert config.model_config().discriminator_classes == NUM_TRAIN_IDS
    assert TrainConfig().model_config().discriminator_classes == 0
    torch.manual_seed(0)
    discriminator = build_discriminator(config.model_config()).eval()
    photo = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = discriminator(torch.randn(2, 3, 64, 64), photo)
        b = discriminator(torch.randn(2, 3, 64, 64), photo)
    assert a.shape[1] == NUM_TRAIN_IDS + 1 and torch.equal(a, b)
    assert discriminator.layers.conv1.in_channels == 3
    # Saved before the setting existed: one real/fake logit, as those runs had.
    assert ModelConfig.from_dict({"image_size": 64}).discriminator_classes == 0


def test_an_oasis_run_trains_saves_and_changes_the_generators_update(tmp_path, demo_set):
    weights = []
    for loss in ("hinge", "oasis"):
        config = tiny_config(tmp_path / loss, demo_set, epochs=1, max_steps=2, gan_loss=loss,
                             discriminator_layers=2, ema_decay=0.0)
        summary = train.train(config)
        assert summary["step"] == 2
        latest = load_checkpoint(Path(config.checkpoint_dir) / "latest.pth")
        weights.append(latest["generator"])
    assert latest["config"]["model"]["discriminator_classes"] == NUM_TRAIN_IDS
    assert latest["discriminator"]["layers.head.weight"].shape[0] == NUM_TRAIN_IDS + 1
    assert any(not torch.equal(a, weights[1][k]) for k, a in weights[0].items()
               if a.is_floating_point())


# --- LabelMix (--labelmix) --------------------------------------------------------------------

def test_labelmix_mask_keeps_each_class_whole_and_draws_both_sides():
    classes = torch.tensor([[1, 1, 14, 14, 11, 11, losses.IGNORED_CLASS, 3]] * 3)[None]
    classes = classes.repeat(16, 1, 1)
    mask = losses.labelmix_mask(classes, torch.Generator().manual_seed(0))
    assert mask.shape == (16, 1, 3, 8) and set(mask.unique().tolist()) == {0.0, 1.0}
    for image, mask_of in zip(classes, mask[:, 0]):
        for c in image.unique():
            assert mask_of[image == c].unique().numel() == 1  # a class is all real or all fake
    assert 0 < mask.mean() < 1 and len({tuple(m.flatten().tolist()) for m in mask}) > 1


def test_labelmix_loss_is_zero_for_a_consistent_discriminator_and_pulls_towards_it():
    torch.manual_seed(0)
    real, fake = torch.randn(2, 20, 8, 8), torch.randn(2, 20, 8, 8)
    ones, zeros = torch.ones(2, 1, 32, 32), torch.zeros(2, 1, 32, 32)
    assert losses.labelmix_loss(real, real, fake, ones) < 1e-12   # all real: D(mix) = D(real)
    assert losses.labelmix_loss(fake, real, fake, zeros) < 1e-12  # all fake: D(mix) = D(fake)
    mixed = torch.randn(2, 20, 8, 8, requires_grad=True)
    loss = losses.labelmix_loss(mixed, real, fake, ones)
    loss.backward()
    assert loss > 0.5 and (mixed.grad * (mixed - real)).sum() > 0  # descent moves towards D(real)


def test_labelmix_adds_a_third_discriminator_pass_and_is_refused_without_oasis(
        tmp_path, demo_set, monkeypatch):
    passes = []
    forward = PatchDiscriminator.forward

    def spy(self, label, photo, passes_=1, **kwargs):
        passes.append(kwargs.get("passes", passes_))
        return forward(self, label, photo, passes=kwargs.get("passes", passes_))
    monkeypatch.setattr(PatchDiscriminator, "forward", spy)
    seen = {}
    for loss, labelmix in (("oasis", 0.0), ("oasis", 10.0)):
        passes.clear()
        config = tiny_config(tmp_path / f"{labelmix}", demo_set, epochs=1, max_steps=1,
                             gan_loss=loss, labelmix=labelmix, discriminator_layers=2,
                             ema_decay=0.0)
        train.train(config)
        seen[labelmix] = max(passes)
        log = (tmp_path / f"{labelmix}" / "log.json").read_text()
        assert "NaN" not in log and "Infinity" not in log
    assert seen == {0.0: 2, 10.0: 3}
    with pytest.raises(UserError, match="--labelmix needs OASIS.*trains hinge"):
        tiny_config(tmp_path / "hinge", demo_set, gan_loss="hinge", labelmix=10.0)
