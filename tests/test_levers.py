"""The quality levers of issue 15, each behind a flag: the paper preset, resize-convolution
upsampling, the hinge loss, the generator's EMA; and the checkpoints of the levers removed after
the real-photo measurement (config.REMOVED)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import inference
import losses
import train
from checkpoints import load_checkpoint, save_checkpoint
from config import PRESETS, TrainConfig, apply_preset
from conftest import (draw_label_map, output_flags, run_in_process, save_image, tiny_config,
                      tiny_model)
from ema import GeneratorEMA
from inference import load_generator
from models import (ModelConfig, ResizeConv2d, build_discriminator, build_generator,
                    count_parameters)
from utils import UserError


def test_the_paper_preset_gives_the_paper_networks():
    config = TrainConfig(**apply_preset({"preset": "paper"}))
    torch.manual_seed(0)
    assert count_parameters(build_generator(config.model_config())) == 54_413_955
    assert count_parameters(build_discriminator(config.model_config())) == 2_768_705
    assert (config.upsample, config.gan_loss, config.ema_decay, config.lr) == (
        "transposed", "bce", 0.0, 2e-4)


def test_flags_given_with_a_preset_win_and_unknown_presets_are_refused():
    assert apply_preset({"preset": "paper", "upsample": "resize"})["upsample"] == "resize"
    assert apply_preset({"lr": 1e-3}) == {"lr": 1e-3}  # no preset: the defaults
    with pytest.raises(UserError, match="choose one of default, paper"):
        apply_preset({"preset": "best-ever"})
    assert set(PRESETS["paper"]) <= {f for f in TrainConfig.__dataclass_fields__}


def test_checkpoints_without_the_new_keys_get_the_paper_networks():
    old = {k: v for k, v in ModelConfig().to_dict().items() if k != "upsample"}
    assert ModelConfig.from_dict(old) == ModelConfig(upsample="transposed")
    saved = TrainConfig().to_dict()
    for key in ("upsample", "ema_decay"):
        saved.pop(key)
    restored = TrainConfig.from_dict(saved)
    assert (restored.upsample, restored.ema_decay) == ("transposed", 0.0)


def test_resize_upsampling_has_no_transposed_convolution():
    torch.manual_seed(0)
    generator = build_generator(tiny_model(upsample="resize"))
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in generator.modules())
    resize_convs = [m for m in generator.modules() if isinstance(m, ResizeConv2d)]
    assert len(resize_convs) == generator.depth  # each holds a 3x3 kernel, whatever it runs
    assert all(m.conv.weight.shape[-2:] == (3, 3) for m in resize_convs)
    with torch.no_grad():
        assert generator(torch.randn(2, 3, 32, 32)).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="upsample"):
        ModelConfig(upsample="pixelshuffle")


def test_hinge_loss_on_hand_made_logits():
    logits = torch.tensor([2.0, 0.5, -1.0])
    assert losses.gan_loss(logits, True, "hinge").item() == pytest.approx((0 + 0.5 + 2) / 3)
    assert losses.gan_loss(logits, False, "hinge").item() == pytest.approx((3 + 1.5 + 0) / 3)
    assert losses.gan_loss(logits, True, "hinge", for_generator=True).item() == \
        pytest.approx(-0.5)
    total, real, fake = losses.discriminator_loss(logits, -logits, "hinge")
    assert total.item() == pytest.approx(0.5 * (real + fake).item())


def test_ema_is_the_hand_computed_average_with_the_live_batch_norm_statistics():
    live = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = GeneratorEMA(live, decay=0.5)
    before = [p.detach().clone() for p in live.parameters()]
    with torch.no_grad():
        for p in live.parameters():
            p.add_(1.0)
    live.train()(torch.randn(8, 2))  # moves the running statistics
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(100) == 0.5
    ema.update(live, step=100)
    for averaged, old, new in zip(ema.module.parameters(), before, live.parameters()):
        assert torch.allclose(averaged, 0.5 * old + 0.5 * new)
        assert not torch.equal(averaged, new)
    assert torch.equal(ema.module[1].running_mean, live[1].running_mean)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())


def test_generator_pth_holds_the_averaged_weights_and_a_resume_continues_both(tmp_path,
                                                                              demo_set):
    config = tiny_config(tmp_path, demo_set, epochs=2, max_steps=3, ema_decay=0.9,
                         gan_loss="hinge", upsample="resize")
    train.train(config)
    folder = Path(config.checkpoint_dir)
    latest, shown = load_checkpoint(folder / "latest.pth"), load_checkpoint(
        folder / "generator.pth")
    assert "generator_train" not in shown
    for key, value in shown["generator"].items():
        assert torch.equal(value, latest["generator"][key])
    differs = [k for k, v in latest["generator"].items() if v.is_floating_point() and
               not torch.equal(v, latest["generator_train"][k])]
    assert differs  # the average trails the trained weights
    generator, saved = load_generator(folder / "generator.pth")  # the checkpoint alone
    assert saved["model"]["upsample"] == "resize"
    with torch.no_grad():
        assert generator(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    summary = train.main(["--resume", str(folder / "latest.pth"), "--max_steps", "5",
                          *output_flags(config)])
    assert summary["step"] == 5




# --- Checkpoints of the levers removed after the real-photo measurement ----------------------

# What every checkpoint written before the removal saved for them: the levers off.
LEVERS_OFF = {"label_input": "rgb", "feature_matching": 0.0, "discriminator_scales": 1,
              "spectral_norm": False, "lr_d": 0.0}
IN_MODEL = ("label_input", "discriminator_scales", "spectral_norm")  # also in config["model"]


def as_saved_before(path, out, **levers):
    """A copy of the checkpoint `path` whose configuration holds `levers` as the version before
    the removal saved them."""
    checkpoint = load_checkpoint(path)
    for name, value in levers.items():
        checkpoint["config"][name] = value
        if name in IN_MODEL:
            checkpoint["config"]["model"][name] = value
    save_checkpoint(checkpoint, out)
    return out


def test_checkpoints_saved_with_the_removed_levers_off_load_and_resume(tmp_path,
                                                                        tiny_checkpoint):
    from checkpoints import load_resume_state, restore_training_state
    from config import merge_for_resume
    path = as_saved_before(tiny_checkpoint(latest=True), tmp_path / "old.pth", **LEVERS_OFF)
    generator, _ = load_generator(path)
    assert generator(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    checkpoint = load_resume_state(path)
    config = merge_for_resume(checkpoint["config"], {})
    nets = [build(config.model_config()) for build in (build_generator, build_discriminator)]
    optimizers = [train.build_adam(net, config, torch.device("cpu")) for net in nets]
    progress, _ = restore_training_state(checkpoint, path, *nets, optimizers,
                                         torch.amp.GradScaler("cpu", enabled=False))
    assert progress.step == 0


@pytest.mark.parametrize("flag, levers", [
    ("--feature_matching 10.0", {"feature_matching": 10.0}),
    ("--discriminator_scales 2", {"discriminator_scales": 2}),
    ("--spectral_norm", {"spectral_norm": True}),
    ("--lr_d 0.0004", {"lr_d": 4e-4}),
    ("--label_input onehot", {"label_input": "onehot"})])
def test_resuming_a_run_of_a_removed_lever_is_refused_in_one_line(tmp_path, tiny_checkpoint,
                                                                  capsys, flag, levers):
    path = as_saved_before(tiny_checkpoint(latest=True), tmp_path / "latest.pth", **levers)
    status, _, err = run_in_process(train.main, ["--resume", path, "--checkpoint_dir",
                                                 tmp_path / "run"], capsys)
    assert status == 2 and err.splitlines() == [
        f"error: {path}: trained with {flag}, which this version removed (docs/quality.md); "
        "resume it with the version that wrote it (git log) or start a new run"]
    assert not (tmp_path / "run").exists()


def test_a_generator_trained_with_the_removed_discriminator_levers_translates(
        tmp_path, tiny_checkpoint, capsys):
    """They changed the discriminator alone: generator.pth is a generator of today's."""
    path = as_saved_before(tiny_checkpoint(), tmp_path / "g.pth", feature_matching=10.0,
                           discriminator_scales=2, spectral_norm=True, lr_d=4e-4)
    save_image(draw_label_map(40, 48, np.random.default_rng(0)), tmp_path / "in" / "a.png")
    for name, model in (("old", path), ("same", tiny_checkpoint())):
        status, _, err = run_in_process(inference.main, [
            "--input_dir", tmp_path / "in", "--output_dir", tmp_path / name, "--model_path",
            model, "--precision", "fp32"], capsys)
        assert status == 0, err
    assert (tmp_path / "old" / "a.png").read_bytes() == (tmp_path / "same" / "a.png").read_bytes()


def test_a_one_hot_generator_is_refused_in_one_line(tmp_path, tiny_checkpoint, capsys):
    path = as_saved_before(tiny_checkpoint(), tmp_path / "g.pth", label_input="onehot")
    checkpoint = load_checkpoint(path)  # its first layer read one channel per palette colour
    checkpoint["generator"]["encoder.down1.conv.weight"] = torch.zeros(8, 34, 4, 4)
    save_checkpoint(checkpoint, path)
    save_image(draw_label_map(32, 32, np.random.default_rng(0)), tmp_path / "in" / "a.png")
    status, _, err = run_in_process(inference.main, [
        "--input_dir", tmp_path / "in", "--output_dir", tmp_path / "out", "--model_path", path],
        capsys)
    assert status == 2 and err.splitlines() == [
        f"error: {path}: trained with --label_input onehot, which this version removed "
        "(docs/quality.md); use it with the version that wrote it (git log)"]
