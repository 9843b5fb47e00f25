"""Non-finite values never reach a checkpoint: a NaN loss, a finite loss whose update writes NaN
into the weights, a non-finite validation figure and a diverging learning rate each stop the
run naming the step (or epoch), and the last good checkpoint is kept."""

import re
from pathlib import Path

import pytest

import train
from checkpoints import load_checkpoint
from training_log import RunLog
from utils import UserError

from conftest import cli_flags, logged_steps, run_in_process, temp_files, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def poison_generator_loss(monkeypatch, at_step, how, at_poison):
    """From `at_step` on, the generator loss turns NaN ("loss"), or stays finite while its
    gradient is NaN ("gradient"), so that the update itself writes NaN into the weights."""
    real = train.generator_loss
    calls = []

    def generator_loss(fake_logits, fake, target, lambda_l1, kind="bce", **layout):
        calls.append(1)
        loss, adversarial, l1 = real(fake_logits, fake, target, lambda_l1, kind, **layout)
        if len(calls) >= at_step:
            at_poison()
            if how == "loss":
                return loss * float("nan"), adversarial * float("nan"), l1
            # sqrt's derivative at 0 is infinite: a value of 0 with a NaN gradient.
            return loss + (fake * 0).sqrt().sum(), adversarial, l1
        return loss, adversarial, l1

    monkeypatch.setattr(train, "generator_loss", generator_loss)


@pytest.mark.parametrize("how, message", [
    ("loss", "step 3: non-finite loss"),
    ("gradient", "step 3: the generator weights are not finite")])
def test_non_finite_values_stop_and_keep_the_last_good_checkpoint(tmp_path, demo_set,
                                                                  monkeypatch, how, message):
    config = tiny_config(tmp_path, demo_set, epochs=2, checkpoint_every_steps=1)
    poisoned = []
    poison_generator_loss(monkeypatch, 3, how, lambda: poisoned.append(True))
    with pytest.raises(UserError, match=message) as error:
        train.train(config)
    assert "last good checkpoint is kept" in str(error.value) and poisoned
    for name in ("latest.pth", "generator.pth"):
        checkpoint = load_checkpoint(Path(config.checkpoint_dir) / name)
        assert checkpoint["step"] == 2
        assert all(v.isfinite().all() for v in checkpoint["generator"].values()
                   if v.is_floating_point())
    assert logged_steps(config.log_file)[-1] <= 3
    assert temp_files(config.checkpoint_dir) == []


def test_non_finite_validation_stops_naming_the_epoch(tmp_path, demo_set):
    log = RunLog(tiny_config(tmp_path, demo_set), is_main=True)
    with pytest.raises(UserError, match=r"epoch 3 \(step 12\): non-finite val_l1"):
        log.add_epoch(2, 12, {"val_l1": float("nan"), "val_psnr": 20.0}, seconds=1.0)
    assert not Path(log.path).exists()  # nothing written (JSON has no NaN)


def test_a_diverging_learning_rate_stops_at_once_naming_the_step(tmp_path, demo_set, capsys,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path, demo_set, epochs=1, checkpoint_every_steps=1, lr=1e30)
    status, _, stderr = run_in_process(train.main, cli_flags(config), capsys)
    assert status == 2
    [line] = [line for line in re.split(r"[\r\n]+", stderr) if line.startswith("error:")]
    assert re.search(r"step \d+: non-finite loss", line), stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "checkpoints" / "latest.pth").exists()  # no NaN weights written
