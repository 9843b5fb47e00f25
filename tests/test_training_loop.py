"""The training loop's guarantees: no run replaces another, the losses are read only at the
maintenance points, one GAN step does what the paper says, settings changed on resume apply at
once, the writer saves in the background, and precision `auto` decides by the hardware."""

import json
import math
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import app
import checkpoints
import devices
import distributed
import inference
import loaders
import run_folder
import train
import training_log
from checkpoints import CheckpointWriter, Progress, load_checkpoint, restore_training_state
from config import TrainConfig, build_parser
from training_log import LossMeter
from utils import UserError

from conftest import (TINY_MODEL, cli_flags, output_flags, run_in_process, tiny_config,
                      tiny_model,
                      write_checkpoint)

pytestmark = pytest.mark.usefixtures("one_thread")


def run_files(config):
    """{path: bytes} of every file a run wrote."""
    folders = [Path(config.checkpoint_dir), Path(config.sample_dir)]
    files = [p for folder in folders for p in folder.iterdir()] + [Path(config.log_file)]
    return {p: p.read_bytes() for p in files}


# --- No run replaces another ----------------------------------------------------------------

def test_a_second_identical_command_leaves_the_first_run_untouched(tmp_path, demo_set, capsys,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path, demo_set, epochs=1, sample_every_steps=2)
    flags = cli_flags(config)
    assert run_in_process(train.main, flags, capsys)[0] == 0
    first = run_files(config)
    assert any(p.suffix == ".png" for p in first) and len(first) >= 4

    status, _, err = run_in_process(train.main, flags, capsys)
    assert status == 2 and "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert "another run's files are there" in line and "--resume" in line
    assert "--overwrite" in line and "latest.pth" in line
    assert run_files(config) == first  # byte for byte

    # --resume continues it (one more epoch) ...
    latest = Path(config.checkpoint_dir) / "latest.pth"
    assert run_in_process(train.main, ["--resume", latest, "--epochs", "2", *output_flags(config)],
                          capsys)[0] == 0
    assert load_checkpoint(latest)["step"] == 8

    # ... and --overwrite replaces it, stale grids of the old run included.
    stale = Path(config.sample_dir) / "step_0000999.png"
    stale.write_bytes(b"old")
    status, out, _ = run_in_process(train.main, [*flags, "--overwrite", "--max_steps", "2"],
                                    capsys)
    assert status == 0 and "--overwrite: removed" in out
    assert load_checkpoint(latest)["step"] == 2 and not stale.exists()
    assert [e["step"] for e in json.loads(Path(config.log_file).read_text())["steps"]] == [1, 2]


def test_a_resume_into_another_runs_folder_is_refused(tmp_path, demo_set):
    one, two = (tiny_config(tmp_path / n, demo_set, epochs=1, max_steps=2) for n in "ab")
    train.train(one)
    train.train(two)
    latest_one = Path(one.checkpoint_dir) / "latest.pth"
    with pytest.raises(UserError, match="another run's files"):
        train.main(["--resume", str(latest_one), *output_flags(two)])


# --- The losses stay on the device between maintenance points --------------------------------

def test_losses_are_read_only_when_logging_saving_or_validating(tmp_path, demo_set,
                                                                monkeypatch):
    """sum_over_ranks is where the loop reads numbers off the device (and sums them over the
    processes): once per maintenance point, never per step."""
    # A read costs a GPU sync and changes no result: only a spy can count them.
    reads, real = [], distributed.sum_over_ranks
    monkeypatch.setattr(distributed, "sum_over_ranks", lambda values, runtime: reads.append(
        len(values)) or real(values, runtime))
    config = tiny_config(tmp_path, demo_set, epochs=2, log_every_steps=3)
    train.train(config)
    # 8 steps: the losses are read at steps 3, 4 (epoch end), 6 and 8 (epoch end); the other
    # reads are validation's (3 numbers) at both epoch ends.
    assert reads.count(len(training_log.LOSS_NAMES) + 2) == 4 and reads.count(3) == 2
    steps = [e["step"] for e in json.loads(Path(config.log_file).read_text())["steps"]]
    assert steps == [3, 4, 6, 8]


def test_the_meter_names_the_first_bad_step_without_reading_the_losses():
    meter = LossMeter("cpu")
    meter.add(torch.tensor([1.0, 2.0, 3.0, 4.0]), 1)
    meter.add(torch.tensor([float("nan"), 2.0, 3.0, 4.0]), 2)
    meter.add(torch.tensor([float("inf"), 2.0, 3.0, 4.0]), 3)
    *sums, count, bad = meter.totals().tolist()
    assert count == 3 and bad == 1
    with pytest.raises(UserError, match=r"step 2: non-finite loss \(g_adv=nan, g_l1=2"):
        meter.raise_if_bad(True)
    fine = LossMeter("cpu", running={"sums": [1.0, 1.0, 1.0, 1.0], "count": 1})
    fine.add(torch.tensor([1.0, 2.0, 3.0, 4.0]), 1)
    assert fine.totals().tolist() == [2.0, 3.0, 4.0, 5.0, 2.0, 0.0]
    fine.raise_if_bad(False)


def test_ddp_polls_the_stop_flag_every_few_steps_one_process_every_step():
    alone = distributed.StopFlag(distributed.Runtime(device=torch.device("cpu")))
    assert all(alone.due(step, False) for step in range(1, 30))
    ddp = distributed.StopFlag(distributed.Runtime(device=torch.device("cpu"), world_size=2))
    assert [s for s in range(1, 30) if ddp.due(s, False)] == [10, 20]
    assert ddp.due(7, epoch_end=True)


# --- One GAN step -------------------------------------------------------------------------------

class Scale(nn.Module):
    """logits = weight * mean of the photo channels (per pixel), label ignored."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(float(weight)))

    def forward(self, label, photo, passes=1):  # per pixel: stacked passes need no care
        return self.weight * photo.mean(1, keepdim=True)


class Constant(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(float(value)))

    def forward(self, source):
        return self.value * torch.ones_like(source)


def test_gan_step_scores_the_real_photo_as_real_and_the_fake_as_fake():
    """Hand-made networks: D's logits are 2 * the photo's value, the target is 1 and the fake
    -0.5. Swapping real and fake anywhere in the step changes one of these numbers."""
    generator, discriminator = Constant(-0.5), Scale(2.0)
    nets = train.Networks(generator, discriminator, generator, discriminator, discriminator)
    config = TrainConfig(lr=1e-3, fused_adam=False, gan_loss="bce")
    optimizers = [train.build_adam(m, config, torch.device("cpu"))
                  for m in (generator, discriminator)]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    runtime = distributed.Runtime(device=torch.device("cpu"))
    source, target = torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)
    g_adv, g_l1, d_real, d_fake = train.gan_step(nets, optimizers, scaler, source, target,
                                                 config, runtime, False).tolist()
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    assert d_real == pytest.approx(softplus(-2.0), rel=1e-5)  # -log sigmoid(2 * 1)
    assert d_fake == pytest.approx(softplus(-1.0), rel=1e-5)  # -log(1 - sigmoid(2 * -0.5))
    # G is scored by D after D's update, which made D surer of both (a larger weight), with
    # the target "real" for the fake.
    weight = discriminator.weight.item()
    assert weight > 2.0
    assert g_adv == pytest.approx(softplus(0.5 * weight), rel=1e-5)
    assert g_l1 == pytest.approx(1.5)
    assert generator.value.item() > -0.5  # moved towards the target


# --- Resume: what may change does, at once --------------------------------------------------

def test_an_fp16_resume_of_a_run_that_was_not_fp16_starts_a_fresh_scale(tmp_path):
    path = write_checkpoint(tmp_path / "latest.pth", latest=True)
    checkpoint = load_checkpoint(path)
    assert checkpoint["scaler"] == {}  # saved by a disabled scaler
    config = TrainConfig(**TINY_MODEL)
    from models import build_discriminator, build_generator
    generator, discriminator = (build(config.model_config())
                                for build in (build_generator, build_discriminator))
    optimizers = [torch.optim.Adam(m.parameters()) for m in (generator, discriminator)]
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    progress, _ = restore_training_state(checkpoint, path, generator, discriminator,
                                         optimizers, scaler)
    assert progress == Progress() and scaler.get_scale() == 2.0 ** 16


def test_no_fused_adam_on_resume_takes_effect(tmp_path, demo_set):
    config = tiny_config(tmp_path, demo_set, epochs=2, max_steps=2)  # fused: the default
    train.train(config)
    latest = Path(config.checkpoint_dir) / "latest.pth"

    def fused(checkpoint):  # each optimiser's kernel, as the run saved it
        return [checkpoint[f"{net}_optimizer"]["param_groups"][0]["fused"]
                for net in ("generator", "discriminator")]
    assert fused(load_checkpoint(latest)) == [True, True]
    summary = train.main(["--resume", str(latest), "--no_fused_adam", "--max_steps", "4",
                          *output_flags(config)])
    assert summary["step"] == 4 and fused(load_checkpoint(latest)) == [None, None]


def test_epochs_and_decay_changed_on_resume_apply_from_the_next_epoch(tmp_path, demo_set):
    config = tiny_config(tmp_path, demo_set, epochs=2, lr=1e-3)
    train.train(config)  # 2 epochs of 4 steps at the full LR
    latest = Path(config.checkpoint_dir) / "latest.pth"
    train.main(["--resume", str(latest), "--epochs", "4", "--decay_epochs", "3",
                *output_flags(config)])
    lrs = {e["epoch"]: e["lr"] for e in json.loads(Path(config.log_file).read_text())["steps"]}
    # Of 4 epochs the last 3 decay (factors 3/4, 2/4, 1/4): the resumed epochs 2 and 3 take
    # theirs at once (a scheduler stepped at epoch ends would still give epoch 2 the full LR).
    assert lrs == pytest.approx({0: 1e-3, 1: 1e-3, 2: 0.5e-3, 3: 0.25e-3})


def test_cuda_rng_states_are_restored_for_the_gpus_this_machine_has(monkeypatch):
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, index: restored.append(
        index))
    state = {"torch": torch.get_rng_state(), "cuda": [torch.zeros(8, dtype=torch.uint8)] * 8}
    checkpoints.set_rng_state(state)  # saved on 8 GPUs, resumed on 1
    assert restored == [0]


# --- Validation and samples leave the networks as they found them ---------------------------

@pytest.mark.parametrize("mode", ["train", "eval"])
def test_validation_and_sample_grids_restore_the_mode(tmp_path, demo_set, mode):
    config = tiny_config(tmp_path, demo_set)
    runtime = distributed.Runtime(device=torch.device("cpu"), batch_size=2)
    loader, _ = loaders.build_train_loader(config, runtime)
    val = loaders.build_val_dataset(config, runtime, loader.dataset)
    from models import build_generator
    generator = build_generator(config.model_config()).train(mode == "train")
    train.validate(generator, val, runtime)
    assert generator.training == (mode == "train")
    batch = loaders.fixed_batch(val, [0], runtime)
    training_log.save_sample_grid(generator, batch, runtime, tmp_path, 1)
    assert generator.training == (mode == "train")


# --- Checkpoints written in the background ------------------------------------------------

def test_the_writer_returns_before_the_file_is_written_and_close_waits(tmp_path, monkeypatch):
    release, written = threading.Event(), []

    def slow_save(checkpoint, path):
        release.wait(10)
        written.append((Path(path).name, checkpoint["weights"].tolist()))

    monkeypatch.setattr(checkpoints, "save_checkpoint", slow_save)
    weights = torch.zeros(3)
    writer = CheckpointWriter()
    started = time.perf_counter()
    writer.save({tmp_path / "latest.pth": {"weights": weights}})
    assert time.perf_counter() - started < 5 and written == []
    weights += 1  # training goes on: the saved copy keeps the values at the save
    release.set()
    writer.close()
    assert written == [("latest.pth", [0.0, 0.0, 0.0])]


def test_a_failed_background_write_is_raised_at_the_next_save(tmp_path, monkeypatch):
    def full_disk(checkpoint, path):
        raise UserError(f"{path}: No space left on device")

    monkeypatch.setattr(checkpoints, "save_checkpoint", full_disk)
    writer = CheckpointWriter()
    writer.save({tmp_path / "a.pth": {"x": torch.ones(1)}})
    with pytest.raises(UserError, match="a.pth: No space left"):
        writer.save({tmp_path / "b.pth": {"x": torch.ones(1)}})
    writer.close()


# --- Precision ------------------------------------------------------------------------------

@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_is_bf16_where_the_hardware_computes_it(monkeypatch, native, expected):
    monkeypatch.setattr(devices, "native_bf16", lambda device: native)
    assert devices.resolve_precision("auto", torch.device("cpu"))[0] == expected
    assert devices.resolve_precision("fp32", torch.device("cpu")) == ("fp32", "as asked")
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        devices.resolve_precision("fp16", torch.device("cpu"))


@pytest.mark.parametrize("native", [True, False])
def test_channels_last_auto_follows_the_precision(monkeypatch, tmp_path, demo_set, native):
    """Default `auto`: channels-last in bf16 or fp16, NCHW in fp32 and TF32, on any device; the
    flags alone, `--no_`, and old checkpoints' booleans say on/off; train and inference
    alike."""
    monkeypatch.setattr(devices, "native_bf16", lambda device: native)
    config = tiny_config(tmp_path, demo_set, precision="auto")
    assert config.channels_last == "auto"
    runtime = distributed.setup(config)
    assert (runtime.precision, runtime.channels_last) == (("bf16", True) if native
                                                          else ("fp32", False))
    assert distributed.setup(tiny_config(tmp_path, demo_set, channels_last="on")).channels_last
    for precision, expected in (("bf16", True), ("fp16", True), ("tf32", False), ("fp32", False)):
        assert devices.resolve_channels_last("auto", "cuda", precision) is expected
        assert devices.resolve_channels_last("auto", "cpu", precision) is expected
    assert not devices.resolve_channels_last("off", "cuda", "bf16")
    assert devices.resolve_channels_last("on", "cpu", "fp32")
    parser = build_parser("")
    assert vars(parser.parse_args(["--channels_last"]))["channels_last"] == "on"
    assert vars(parser.parse_args(["--no_channels_last"]))["channels_last"] == "off"
    assert vars(parser.parse_args(["--channels_last", "auto"]))["channels_last"] == "auto"
    saved = config.to_dict()
    for old, now in ((True, "on"), (False, "auto")):  # saved when it was an on/off flag
        assert TrainConfig.from_dict({**saved, "channels_last": old}).channels_last == now
    args = inference.parse(["--input_dir", "x", "--output_dir", "y"])
    assert args.channels_last == "auto"
    assert inference.parse(["--input_dir", "x", "--output_dir", "y",
                            "--channels_last"]).channels_last == "on"


@pytest.mark.parametrize("script", ["inference", "app"])
def test_inference_and_app_take_the_same_speed_flags(script):
    parse = {"inference": lambda argv: inference.parse(["--input_dir", "x", "--output_dir", "y",
                                                        *argv]),
             "app": app.parse}[script]
    speed = lambda args: (args.device, args.precision, args.channels_last, args.compile)
    assert speed(parse([])) == ("auto", "auto", "auto", False)
    assert speed(parse(["--device", "cpu", "--precision", "bf16", "--channels_last",
                        "--compile"])) == ("cpu", "bf16", "on", True)
    assert parse(["--no_channels_last"]).channels_last == "off"
    with pytest.raises(SystemExit):
        parse(["--precision", "fp8"])


def test_fp32_is_strict_on_cuda_in_training_and_inference_alike(monkeypatch):
    flags = (torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32")
    before = [getattr(owner, name) for owner, name in flags]
    try:
        devices.set_math_mode(torch.device("cuda"), "fp32")
        assert not any(getattr(owner, name) for owner, name in flags)
        devices.set_math_mode(torch.device("cuda"), "tf32")
        assert all(getattr(owner, name) for owner, name in flags)
    finally:
        for (owner, name), value in zip(flags, before):
            setattr(owner, name, value)
        torch.backends.cudnn.benchmark = False


def test_training_and_inference_print_their_precision(tmp_path, demo_set, tiny_checkpoint,
                                                      capsys):
    expected = "bf16" if devices.native_bf16("cpu") else "fp32"
    config = tiny_config(tmp_path, demo_set, epochs=1, max_steps=1, precision="auto")
    train.train(config)
    assert f"device cpu, precision {expected} (auto: " in capsys.readouterr().out
    (tmp_path / "in").mkdir()
    from PIL import Image
    Image.new("RGB", (32, 32), (128, 64, 128)).save(tmp_path / "in" / "a.png")
    inference.main(["--input_dir", str(tmp_path / "in"), "--output_dir",
                    str(tmp_path / "out"), "--model_path", str(tiny_checkpoint())])
    assert f"device cpu, precision {expected} (auto: " in capsys.readouterr().out


# --- --overwrite removes only a run's own files; one run at a time per folder -------------

def test_overwrite_never_removes_a_file_it_cannot_tell_is_a_runs(tmp_path, demo_set, capsys):
    config = tiny_config(tmp_path, demo_set, epochs=1, max_steps=1)
    flags = cli_flags(config)
    notes = Path(config.log_file)
    notes.write_text("my notes: do not lose")
    foreign = Path(config.checkpoint_dir) / "latest.pth"
    foreign.parent.mkdir()
    torch.save({"weights": torch.zeros(2)}, foreign)  # a file of another project
    status, _, err = run_in_process(train.main, [*flags, "--overwrite"], capsys)
    assert status == 2 and "Traceback" not in err and "--overwrite removes only" in err, err
    assert str(notes) in err and str(foreign) in err
    assert notes.read_text() == "my notes: do not lose" and foreign.exists()
    for path in (notes, foreign):
        path.rename(path.with_name("moved_" + path.name))
    # Its own files it removes, and says which.
    status, out, _ = run_in_process(train.main, flags, capsys)
    assert status == 0
    status, out, _ = run_in_process(train.main, [*flags, "--overwrite"], capsys)
    assert status == 0 and "--overwrite: removed" in out and str(notes) in out
    assert "latest.pth" in out and "generator.pth" in out


def hold_lock(folder):
    """A process holding the run lock of `folder`, as a running train.py would."""
    import subprocess
    import sys
    code = ("import sys, time; from run_folder import RunLock; "
            f"lock = RunLock({str(folder)!r}); lock.acquire(); print('held', flush=True); "
            "time.sleep(60)")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=Path(train.__file__).parent,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_run_in_the_same_folder_is_refused_naming_the_process(tmp_path, demo_set,
                                                                      capsys):
    config = tiny_config(tmp_path, demo_set, epochs=1, max_steps=1)
    Path(config.checkpoint_dir).mkdir()
    holder = hold_lock(config.checkpoint_dir)
    try:
        for extra in ([], ["--overwrite"]):
            status, _, err = run_in_process(train.main, [*cli_flags(config), *extra], capsys)
            assert status == 2 and "Traceback" not in err, err
            assert f"process {holder.pid}" in err and "a run is going on" in err, err
        assert not Path(config.log_file).exists()
    finally:
        holder.kill()
        holder.wait()
    # kill -9 leaves the lock file with a dead process id: stale, taken over.
    lock = Path(config.checkpoint_dir) / run_folder.RunLock.NAME
    assert lock.read_text().strip() == str(holder.pid)
    status, out, err = run_in_process(train.main, cli_flags(config), capsys)
    assert status == 0, err
    assert f"process {holder.pid}" in out and not lock.exists()  # released at the end


def test_the_lock_is_released_when_a_run_fails(tmp_path, demo_set):
    config = tiny_config(tmp_path, tmp_path / "missing", epochs=1)
    with pytest.raises(UserError, match="data folder not found"):
        train.train(config)
    assert not (Path(config.checkpoint_dir) / run_folder.RunLock.NAME).exists()
    with run_folder.RunLock(config.checkpoint_dir):  # free to take
        with pytest.raises(UserError, match=f"process {__import__('os').getpid()}"):
            run_folder.RunLock(config.checkpoint_dir).acquire()


def test_a_resume_writes_where_its_command_line_says(tmp_path, demo_set, capsys, monkeypatch):
    config = tiny_config(tmp_path / "theirs", demo_set, epochs=2, max_steps=2)
    train.train(config)
    downloaded = tmp_path / "downloaded" / "latest.pth"
    downloaded.parent.mkdir()
    downloaded.write_bytes((Path(config.checkpoint_dir) / "latest.pth").read_bytes())
    theirs = run_files(config)
    mine = tmp_path / "mine"
    mine.mkdir()
    monkeypatch.chdir(mine)
    status, _, err = run_in_process(train.main, ["--resume", downloaded, "--max_steps", "3"],
                                    capsys)
    assert status == 0, err
    assert run_files(config) == theirs  # the folders saved in the file are left alone
    assert load_checkpoint(mine / "checkpoints" / "latest.pth")["step"] == 3
    assert (mine / "training_log.json").exists()
    # ... and the full "no run replaces another" check applies to those folders.
    status, _, err = run_in_process(train.main, ["--resume", downloaded, "--max_steps", "4"],
                                    capsys)
    assert status == 2 and "another run's files are there" in err, err


@pytest.mark.parametrize("flag", ["sample_dir", "checkpoint_dir", "log_file"])
def test_output_folders_inside_the_data_folder_are_refused(tmp_path, demo_set, capsys, flag):
    inside = {"sample_dir": demo_set / "train", "checkpoint_dir": demo_set / "checkpoints",
              "log_file": demo_set / "val" / "log.json"}[flag]
    config = tiny_config(tmp_path, demo_set, epochs=1, max_steps=1)
    before = sorted(demo_set.rglob("*"))
    status, _, err = run_in_process(train.main, [*cli_flags(config), f"--{flag}", inside],
                                    capsys)
    assert status == 2 and "Traceback" not in err and f"--{flag}" in err, err
    assert "inside --data_dir" in err and sorted(demo_set.rglob("*")) == before


def test_the_averaged_generator_gets_the_statistics_of_its_own_weights():
    """Copied from the live generator, the averaged one's batch-norm statistics belong to other
    weights; after `recalibrate` they are the average of its own batch statistics over the
    label batches, and it is back in eval mode with its momentum."""
    from ema import GeneratorEMA
    from models import build_generator
    torch.manual_seed(0)
    live = build_generator(tiny_model(dropout=False))
    ema = GeneratorEMA(live, decay=0.9)
    with torch.no_grad():
        for p in live.parameters():  # the live weights move away from the average
            p.add_(torch.randn_like(p) * 0.5)
        live.train()
        batches = [torch.rand(4, 3, 32, 32) * 2 - 1 for _ in range(3)]
        for labels in batches:
            live(labels)
    ema.update(live, step=1000)  # copies the live statistics
    norm = ema.module.encoder["down2"].norm
    seen = []
    hook = ema.module.encoder["down2"].conv.register_forward_hook(
        lambda module, inputs, output: seen.append(output.detach()))
    ema.recalibrate(batches)
    hook.remove()
    expected = torch.stack([out.mean((0, 2, 3)) for out in seen]).mean(0)
    assert torch.allclose(norm.running_mean, expected, atol=1e-5)
    assert not torch.allclose(live.encoder["down2"].norm.running_mean, expected, atol=1e-3)
    assert not ema.module.training and not norm.training and norm.momentum == 0.1


def test_the_averaged_generators_statistics_come_from_maps_spread_over_the_training_set():
    """A real set's files in name order are consecutive frames of one drive: the calibration
    maps are spread over the whole set, first to last, not its first 64."""
    from ema import EMA_CALIBRATION_PAIRS, calibration_indices
    spread = calibration_indices(367)
    assert len(set(spread)) == len(spread) == EMA_CALIBRATION_PAIRS
    assert spread[0] == 0 and spread[-1] == 366 and spread == sorted(spread)
    gaps = {b - a for a, b in zip(spread, spread[1:])}
    assert gaps <= {5, 6}
    assert calibration_indices(10) == list(range(10))
