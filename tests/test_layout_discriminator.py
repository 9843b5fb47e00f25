"""The layout-aware discriminator (--gan_loss oasis, after OASIS, Schoenfeld et al. 2021): D
segments the photo alone into "fake" and the label classes, class-balanced; G asks for its
photo to be segmented as its label map says."""

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import losses
import train
from cityscapes import COLORS, IGNORE_ID, NUM_TRAIN_IDS, decode_train_ids
from config import TrainConfig
from conftest import tiny_config
from demo.data import real_profile_pair, save_real_profile_jpeg
from models import ModelConfig, build_discriminator
from checkpoints import load_checkpoint


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
