"""The discriminator levers of issue 15: pix2pixHD's feature matching on D's intermediate
features (--feature_matching) and its multi-scale discriminator (--discriminator_scales)."""

from pathlib import Path

import pytest
import torch
from torch import nn

import losses
import train
from checkpoints import load_checkpoint
from config import PRESETS, TrainConfig, apply_preset
from conftest import output_flags, patch_logits, tiny_config, tiny_model
from models import (ModelConfig, MultiScaleDiscriminator, PatchDiscriminator,
                    build_discriminator, count_parameters)
from utils import UserError


def test_features_are_each_leaky_relus_output_and_leave_the_logits_unchanged():
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(base_channels=8, num_layers=3).eval()
    label, photo = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        [(logits, features)] = discriminator(label, photo)
        assert torch.equal(logits, discriminator.layers(torch.cat([label, photo], dim=1)))
    # conv1..conv4 each followed by a LeakyReLU: 32, 16, 8 (stride 2), then 7 (stride 1).
    assert [tuple(f.shape[1:]) for f in features] == [(8, 32, 32), (16, 16, 16), (32, 8, 8),
                                                      (64, 7, 7)]
    with torch.no_grad():  # the last one is what the head judges
        assert torch.equal(discriminator.layers.head(features[-1]), logits)


def test_feature_matching_is_zero_for_equal_features_and_the_hand_computed_l1():
    real = [[torch.zeros(1, 2, 2, 2), torch.ones(1, 1, 3, 3)]]
    assert losses.feature_matching_loss(real, real).item() == 0.0
    fake = [[torch.full((1, 2, 2, 2), 0.5), torch.tensor([[[[1.0, 1, 1], [1, 1, 1], [1, 1, 4]]]])]]
    # Layer 1: |0.5 - 0| everywhere = 0.5; layer 2: one pixel of nine off by 3 = 1/3; summed.
    assert losses.feature_matching_loss(real, fake).item() == pytest.approx(0.5 + 1 / 3)
    # Two scales: their mean.
    two = losses.feature_matching_loss(real + real, fake + real)
    assert two.item() == pytest.approx((0.5 + 1 / 3) / 2)


def test_feature_matching_sends_no_gradient_into_the_real_features():
    real = [[torch.zeros(1, 1, 2, 2, requires_grad=True)]]
    fake = [[torch.ones(1, 1, 2, 2, requires_grad=True)]]
    losses.feature_matching_loss(real, fake).backward()
    assert real[0][0].grad is None
    assert torch.allclose(fake[0][0].grad, torch.full((1, 1, 2, 2), 0.25))


def test_feature_matching_through_a_stub_discriminator_is_zero_when_real_equals_fake():
    torch.manual_seed(0)
    discriminator = build_discriminator(tiny_model(image_size=64, discriminator_scales=2))
    label, photo = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    real, same, other = ([j.features for j in discriminator(label, p)]
                         for p in (photo, photo.clone(), -photo))
    assert train.feature_matching_loss(real, same).item() == pytest.approx(0.0, abs=1e-6)
    assert train.feature_matching_loss(real, other).item() > 0.01


def test_the_multi_scale_discriminator_judges_the_pooled_pair_at_half_resolution():
    torch.manual_seed(0)
    single = build_discriminator(tiny_model(image_size=64))
    torch.manual_seed(0)
    multi = build_discriminator(tiny_model(image_size=64, discriminator_scales=2))
    assert isinstance(single, PatchDiscriminator) and isinstance(multi, MultiScaleDiscriminator)
    assert count_parameters(multi) == 2 * count_parameters(single)
    assert {k.split(".", 1)[0] for k in multi.state_dict()} == {"scale1", "scale2"}
    assert set(single.state_dict()) == {k.split(".", 1)[1] for k in multi.state_dict()}
    label, photo = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    single.eval(), multi.eval()
    with torch.no_grad():
        full, half = (judgement.logits for judgement in multi(label, photo))
        assert full.shape == (2, 1, 6, 6) and half.shape == (2, 1, 2, 2)
        # The first scale: the same weights.
        assert torch.equal(full, patch_logits(single, label, photo))
        pooled = nn.functional.avg_pool2d
        assert torch.equal(half, patch_logits(multi.scale2, pooled(label, 2), pooled(photo, 2)))


def test_gan_loss_of_a_multi_scale_discriminator_is_the_mean_over_scales():
    full, half = torch.full((1, 1, 3, 3), 2.0), torch.full((1, 1, 2, 2), -1.0)
    for kind in ("bce", "lsgan", "hinge"):
        expected = (losses.gan_loss(full, True, kind) + losses.gan_loss(half, True, kind)) / 2
        assert losses.gan_loss([full, half], True, kind).item() == pytest.approx(expected.item())
    loss, _, _ = losses.generator_loss([full], torch.zeros(1), torch.zeros(1), 100.0)
    assert loss.item() == pytest.approx(losses.gan_loss(full, True, for_generator=True).item())


def test_too_small_images_for_the_coarsest_scale_are_refused():
    with pytest.raises(ValueError, match="too small for 2 discriminator scales"):
        ModelConfig(image_size=32, discriminator_layers=3, discriminator_scales=2)
    ModelConfig(image_size=32, discriminator_layers=2, discriminator_scales=2)
    with pytest.raises(UserError, match="discriminator_scales"):
        TrainConfig(discriminator_scales=0)
    with pytest.raises(UserError, match="feature_matching"):
        TrainConfig(feature_matching=-1.0)


def test_configurations_saved_before_the_levers_load_single_scale_without_matching():
    old = {k: v for k, v in ModelConfig().to_dict().items() if k != "discriminator_scales"}
    assert ModelConfig.from_dict(old).discriminator_scales == 1
    saved = TrainConfig().to_dict()
    saved.pop("discriminator_scales"), saved.pop("feature_matching")
    restored = TrainConfig.from_dict(saved)
    assert (restored.discriminator_scales, restored.feature_matching) == (1, 0.0)
    assert isinstance(build_discriminator(restored.model_config()), PatchDiscriminator)
    paper = TrainConfig(**apply_preset({"preset": "paper", "discriminator_layers": 3}))
    assert (paper.discriminator_scales, paper.feature_matching) == (1, 0.0)
    assert {"discriminator_scales", "feature_matching"} <= set(PRESETS["paper"])


def test_a_run_with_both_levers_saves_them_and_resumes(tmp_path, demo_set):
    config = tiny_config(tmp_path, demo_set, epochs=2, max_steps=3, discriminator_layers=2,
                         discriminator_scales=2, feature_matching=10.0, gan_loss="hinge")
    train.train(config)
    folder = Path(config.checkpoint_dir)
    latest = load_checkpoint(folder / "latest.pth")
    assert latest["config"]["model"]["discriminator_scales"] == 2
    assert latest["config"]["feature_matching"] == 10.0
    assert any(k.startswith("scale2.") for k in latest["discriminator"])
    summary = train.main(["--resume", str(folder / "latest.pth"), "--max_steps", "5",
                          *output_flags(config)])
    assert summary["step"] == 5
    with pytest.raises(UserError, match="--feature_matching"):
        train.main(["--resume", str(folder / "latest.pth"), "--feature_matching", "1.0"])


def test_feature_matching_changes_the_generators_update(tmp_path, demo_set):
    weights = []
    for weight in (0.0, 10.0):
        config = tiny_config(tmp_path / str(weight), demo_set, epochs=1, max_steps=2,
                             feature_matching=weight, discriminator_layers=2, ema_decay=0.0)
        train.train(config)
        weights.append(load_checkpoint(Path(config.checkpoint_dir) / "latest.pth")["generator"])
    assert any(not torch.equal(a, weights[1][k]) for k, a in weights[0].items()
               if a.is_floating_point())
