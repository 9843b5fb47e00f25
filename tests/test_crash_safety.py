"""Crash safety: checkpoints and the log are written atomically (faults injected at named points
of a save, real SIGKILLs of a training process), SIGINT/SIGTERM stop with a resumable
checkpoint, a resume at any step reproduces the uninterrupted run, and a full disk during
training keeps the last checkpoint. (NaN and Inf: test_non_finite.py.)"""

import contextlib
import errno
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import checkpoints
import inference
import run_folder
import train
import utils
from checkpoints import load_checkpoint, save_checkpoint
from utils import UserError, save_json

from conftest import (FailingFile, cli_flags, finish, logged_steps, output_flags, run_in_process,
                      start_script, temp_files, tiny_config)

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS_PER_EPOCH = 4  # 8 training pairs, batch size 2
TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp")  # utils.atomic_write's


# --- Faults injected at named points of a save ----------------------------------------------


class Crash(BaseException):
    """A simulated crash: not an Exception, so nothing on the way mistakes it for an error."""


class PatchedOs:
    """What utils sees as `os` during a test: the real module, some functions replaced."""

    def __init__(self, **replaced):
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(os, name)


def inject_fault(monkeypatch, point, error, at_failure):
    """Make the next atomic_write fail at a named point; `at_failure()` runs at that moment."""
    def fail(*args, **kwargs):
        at_failure()
        raise error

    if point in ("mid-write", "full disk"):
        def fdopen(fd, mode):
            return FailingFile(os.fdopen(fd, mode), 100, error, at_failure)
        monkeypatch.setattr(utils, "os", PatchedOs(fdopen=fdopen))
    elif point == "before fsync":
        monkeypatch.setattr(utils, "os", PatchedOs(fsync=fail))
    elif point == "before rename":
        monkeypatch.setattr(utils, "os", PatchedOs(replace=fail))
    else:
        raise ValueError(point)


def checkpoint_file(folder, tiny_checkpoint):
    """(path, save the next version, load) for latest.pth."""
    path = Path(folder) / "latest.pth"
    good = torch.load(tiny_checkpoint(latest=True), weights_only=True)
    save_checkpoint(good, path)
    return path, lambda: save_checkpoint({**good, "step": 7}, path), load_checkpoint


def log_file(folder, tiny_checkpoint):
    """(path, save the next version, load) for the JSON log."""
    path = Path(folder) / "log.json"
    steps = [{"step": k, "g_l1": 0.5} for k in range(1, 40)]
    save_json({"format": "pix2pix-log", "steps": steps}, path)
    return (path, lambda: save_json({"format": "pix2pix-log", "steps": steps * 2}, path),
            lambda p: json.loads(Path(p).read_text()))


FAULTS = {"mid-write": Crash(), "before fsync": Crash(), "before rename": Crash(),
          "full disk": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))}


@pytest.mark.parametrize("make_file", [checkpoint_file, log_file], ids=["checkpoint", "log"])
@pytest.mark.parametrize("point", list(FAULTS))
def test_a_failed_save_leaves_the_previous_file(tmp_path, tiny_checkpoint, monkeypatch,
                                                point, make_file):
    path, save_next, load = make_file(tmp_path, tiny_checkpoint)
    before = path.read_bytes()
    at_crash = {}

    def at_failure():  # what a crash at this very moment would leave on disk
        at_crash["final"] = path.read_bytes()
        at_crash["temps"] = temp_files(tmp_path)

    inject_fault(monkeypatch, point, FAULTS[point], at_failure)
    expected = UserError if isinstance(FAULTS[point], OSError) else Crash
    with pytest.raises(expected) as error:
        save_next()
    assert at_crash["final"] == before
    [temp] = at_crash["temps"]  # hidden, named after the file and the writing process
    assert TEMP_NAME.fullmatch(temp)["name"] == path.name
    assert TEMP_NAME.fullmatch(temp)["pid"] == str(os.getpid())
    if expected is UserError:
        message = str(error.value)
        assert str(path) in message and "No space left on device" in message
        assert "previous file" in message and "\n" not in message
    # Afterwards: the previous file, intact and loadable; the temporary file removed.
    assert path.read_bytes() == before
    load(path)
    assert temp_files(tmp_path) == []
    # The next save, without the fault, goes through.
    monkeypatch.undo()
    save_next()
    assert path.read_bytes() != before
    load(path)


def test_the_data_is_durable_before_the_rename(tmp_path, monkeypatch):
    events = []

    class Recording(FailingFile):
        def write(self, data):
            events.append("write")
            return self.file.write(data)

        def flush(self):
            events.append("flush")
            return self.file.flush()

    def fsync(fd):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        return os.fsync(fd)

    def replace(source, target):
        events.append("rename")
        return os.replace(source, target)

    monkeypatch.setattr(utils, "os", PatchedOs(
        fdopen=lambda fd, mode: Recording(os.fdopen(fd, mode), 0, None, None),
        fsync=fsync, replace=replace))
    save_json({"steps": []}, tmp_path / "log.json")
    assert events[-4:] == ["flush", "fsync file", "rename", "fsync folder"]
    assert set(events[:-4]) == {"write"}


def test_files_get_the_permissions_of_a_plain_open(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    save_json({"steps": []}, tmp_path / "log.json")
    # Not mkstemp's 0600: a checkpoint is often shared with other users.
    assert stat.S_IMODE((tmp_path / "log.json").stat().st_mode) == 0o666 & ~umask


def test_leftovers_of_killed_saves_are_removed_at_the_next_save(tmp_path, tiny_checkpoint):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {"dead": f".latest.pth.{dead.pid}.a1b2c3d4.tmp",  # killed mid-save
             "alive": f".latest.pth.{os.getpid()}.zz99yy88.tmp",  # a save in progress
             "other file": f".generator.pth.{dead.pid}.a1b2c3d4.tmp",
             "not ours": ".latest.pth.notes.tmp"}
    for name in names.values():
        (tmp_path / name).write_bytes(b"half a checkpoint")
    save_checkpoint(torch.load(tiny_checkpoint(), weights_only=True), tmp_path / "latest.pth")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert names["dead"] not in left
    assert {names["alive"], names["other file"], names["not ours"], "latest.pth"} == set(left)


# --- Real SIGKILLs of a training process ----------------------------------------------------


def wait_for(condition, process, timeout=60.0, interval=0.002):
    """Poll `condition()` until true; False if the process ended or time ran out first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        if process.poll() is not None:
            pytest.fail(f"train.py ended early ({process.returncode}):\n"
                        f"{finish(process).stderr[-3000:]}")
        time.sleep(interval)
    return False


@contextlib.contextmanager
def ended(*processes):
    """Kill the processes if the test fails before they end: none trains on in the background."""
    try:
        yield
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()


def mtime(path):
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def assert_all_files_load(out):
    """Every file at its final name loads; besides those, only hidden temporary files."""
    checkpoint_dir = out / "checkpoints"
    latest = load_checkpoint(checkpoint_dir / "latest.pth")
    if (checkpoint_dir / "generator.pth").exists():
        inference.load_generator(checkpoint_dir / "generator.pth")
    steps = logged_steps(out / "log.json")
    assert steps == list(range(1, len(steps) + 1))  # no gaps, no repeats
    for sample in (out / "samples").glob("*.png") if (out / "samples").exists() else []:
        Image.open(sample).verify()
    for folder in (checkpoint_dir, out, out / "samples"):
        for path in folder.iterdir() if folder.exists() else []:
            assert path.is_dir() or path.suffix in (".pth", ".json", ".png") or \
                TEMP_NAME.fullmatch(path.name) or path.name == run_folder.RunLock.NAME, path
    return latest["step"]


def test_sigkill_at_any_moment_leaves_loadable_files(tmp_path, demo_set):
    out = tmp_path / "run"
    config = tiny_config(out, demo_set, epochs=100, checkpoint_every_steps=1)
    checkpoint_dir = out / "checkpoints"

    def saving(path):  # the running process is writing `path` (its temporary file exists)
        def condition():
            names = [TEMP_NAME.fullmatch(name) for name in temp_files(path.parent)]
            return any(m and m["name"] == path.name and m["pid"] == str(process.pid)
                       for m in names)
        return condition

    def later():
        time.sleep(0.2)
        return True

    moments = {"while latest.pth is written": saving(checkpoint_dir / "latest.pth"),
               "while the log is written": saving(out / "log.json"),
               "between saves": later}
    command = cli_flags(config)
    last_save, kills = None, []
    for moment, condition in moments.items():
        process = start_script("train.py", *command, cwd=tmp_path)
        with ended(process):
            # Wait for a new latest.pth from this process, then for the moment, then kill -9.
            assert wait_for(lambda seen=last_save: mtime(checkpoint_dir / "latest.pth") not in (
                None, seen), process)
            caught = wait_for(condition, process, timeout=10.0)
            process.send_signal(signal.SIGKILL)
            process.wait()
        assert process.returncode == -signal.SIGKILL
        step = assert_all_files_load(out)
        kills.append((moment, step, caught, temp_files(checkpoint_dir) + temp_files(out)))
        last_save = mtime(checkpoint_dir / "latest.pth")
        command = ["--resume", checkpoint_dir / "latest.pth", *output_flags(config)]

    # Resuming after the last kill continues one log and removes the killed saves' leftovers.
    step = kills[-1][1]
    summary = train.main(["--resume", str(checkpoint_dir / "latest.pth"), "--max_steps",
                          str(step + 2), *output_flags(config)])
    assert summary["step"] == step + 2
    assert logged_steps(out / "log.json") == list(range(1, step + 3)), kills
    assert temp_files(checkpoint_dir) == [] and temp_files(out) == [], kills
    assert kills[0][1] < kills[1][1] < kills[2][1], kills  # each resumed run made progress


# --- SIGINT and SIGTERM ---------------------------------------------------------------------

SIGNALS = {"SIGINT": (signal.SIGINT, 130), "SIGTERM": (signal.SIGTERM, 143)}


@pytest.fixture(scope="module")
def signalled_runs(tmp_path_factory, demo_set):
    """Two training processes, one stopped with SIGINT and one with SIGTERM once training is
    under way (side by side: start-up dominates): {name: (folder, CompletedProcess)}."""
    root = tmp_path_factory.mktemp("signals")
    runs = {}
    for name in SIGNALS:
        config = tiny_config(root / name, demo_set, epochs=100, checkpoint_every_steps=10)
        runs[name] = (root / name, start_script("train.py", *cli_flags(config), cwd=root))
    with ended(*(process for _, process in runs.values())):
        for name, (folder, process) in runs.items():
            log = folder / "log.json"
            assert wait_for(log.exists, process)  # the training loop is running
            process.send_signal(SIGNALS[name][0])
        return {name: (folder, finish(process, timeout=60))
                for name, (folder, process) in runs.items()}


@pytest.mark.parametrize("name", list(SIGNALS))
def test_signal_saves_a_resumable_checkpoint(signalled_runs, name):
    folder, result = signalled_runs[name]
    assert result.returncode == SIGNALS[name][1], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    latest = folder / "checkpoints" / "latest.pth"
    match = re.search(r"interrupted at step (\d+); resume with: python train.py --resume (\S+)"
                      r"(.*)", result.stderr)
    assert match, result.stderr[-3000:]
    step = int(match[1])
    assert Path(match[2]) == latest and load_checkpoint(latest)["step"] == step
    assert logged_steps(folder / "log.json") == list(range(1, step + 1))
    # Resume as told: one log, no step repeated or missing.
    summary = train.main(["--resume", match[2], *shlex.split(match[3]), "--max_steps",
                          str(step + 3)])
    assert summary["step"] == step + 3 and not summary["interrupted"]
    assert logged_steps(folder / "log.json") == list(range(1, step + 4))
    assert temp_files(folder / "checkpoints") == []


# --- Resume at any step reproduces the uninterrupted run -----------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, demo_set):
    config = tiny_config(tmp_path_factory.mktemp("whole"), demo_set, epochs=2)
    train.train(config)
    return (load_checkpoint(Path(config.checkpoint_dir) / "latest.pth"),
            json.loads(Path(config.log_file).read_text()))


@pytest.mark.parametrize("stops", [(1,), (STEPS_PER_EPOCH,), (7,), (2, 6)],
                         ids=["first step", "epoch boundary", "last step but one", "twice"])
def test_resume_at_any_step_reproduces_the_run(tmp_path, demo_set, uninterrupted, stops):
    config = tiny_config(tmp_path, demo_set, epochs=2, max_steps=stops[0])
    assert train.train(config)["step"] == stops[0]
    latest = Path(config.checkpoint_dir) / "latest.pth"
    for stop in (*stops[1:], 0):
        assert load_checkpoint(latest)["step"] < (stop or 8)
        train.main(["--resume", str(latest), "--max_steps", str(stop), *output_flags(config)])

    whole, whole_log = uninterrupted
    resumed = load_checkpoint(latest)
    assert (resumed["step"], resumed["epoch"]) == (whole["step"], whole["epoch"]) == (8, 2)
    for net in ("generator", "discriminator"):
        for key, value in whole[net].items():
            assert torch.allclose(value.float(), resumed[net][key].float(), atol=1e-6), key
    log = json.loads(Path(config.log_file).read_text())
    assert [e["step"] for e in log["steps"]] == list(range(1, 9))
    for a, b in zip(whole_log["steps"], log["steps"]):
        assert (a["epoch"], a["lr"]) == (b["epoch"], b["lr"])
        assert a["g_l1"] == pytest.approx(b["g_l1"], rel=1e-5)
    assert [e["epoch"] for e in log["epochs"]] == [0, 1]
    assert log["epochs"][-1]["val_l1"] == pytest.approx(whole_log["epochs"][-1]["val_l1"],
                                                        rel=1e-5)


def test_a_full_disk_during_training_stops_and_keeps_the_last_checkpoint(tmp_path, demo_set,
                                                                         monkeypatch):
    config = tiny_config(tmp_path, demo_set, epochs=2, checkpoint_every_steps=1)
    latest = Path(config.checkpoint_dir) / "latest.pth"
    real_save = checkpoints.save_checkpoint

    def save_checkpoint_on_a_filling_disk(checkpoint, path):
        if checkpoint["step"] == 3 and Path(path).name == "latest.pth":
            inject_fault(monkeypatch, "full disk", FAULTS["full disk"], lambda: None)
        return real_save(checkpoint, path)

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_checkpoint_on_a_filling_disk)
    with pytest.raises(UserError, match="No space left on device") as error:
        train.train(config)
    assert str(latest) in str(error.value)
    assert load_checkpoint(latest)["step"] == 2
    assert temp_files(config.checkpoint_dir) == []


# --- A file met mid-epoch that cannot be read; loader workers and signals --------------------


def test_an_unreadable_file_mid_epoch_saves_then_stops_naming_it(tmp_path, demo_set, capsys,
                                                                monkeypatch):
    import dataset
    config = tiny_config(tmp_path, demo_set, epochs=2, cache="off", checkpoint_every_steps=0)
    real, reads = dataset.read_rgb, []

    def read_rgb(path, *args, **kwargs):  # corrupt: the first file read after step 1
        if Path(path).parent.name == "train" and Path(config.log_file).exists():
            reads.append(path)
            raise utils.UserError(f"{path}: cannot read the pair: corrupt or truncated")
        return real(path, *args, **kwargs)
    monkeypatch.setattr(dataset, "read_rgb", read_rgb)
    status, _, err = run_in_process(train.main, cli_flags(config), capsys)
    assert status == 2 and "Traceback" not in err, err
    assert str(reads[0]) in err and "saving step 1" in err and "--resume" in err, err
    latest = Path(config.checkpoint_dir) / "latest.pth"
    assert load_checkpoint(latest)["step"] == 1  # the step trained is kept
    assert logged_steps(config.log_file) == [1]


SPAWNED_TRAIN = """
import multiprocessing, runpy, sys
multiprocessing.set_start_method(sys.argv[1])
sys.argv = ["train.py", *sys.argv[2:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_ctrl_c_with_spawned_loader_workers_saves(tmp_path, demo_set, method="spawn"):
    # spawn (macOS) and forkserver (Linux from Python 3.14) both start workers in a fresh
    # interpreter, with the default signal handlers: one of them proves the path.
    config = tiny_config(tmp_path, demo_set, epochs=100, num_workers=1, cache="off")
    process = subprocess.Popen(
        [sys.executable, "-c", SPAWNED_TRAIN, method, *cli_flags(config)],
        cwd=Path(train.__file__).parent, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    with ended(process):
        assert wait_for(Path(config.log_file).exists, process)  # workers are serving batches
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
        result = finish(process, timeout=60)
    assert result.returncode == 130, result.stderr[-3000:]
    assert "exited unexpectedly" not in result.stderr and "Traceback" not in result.stderr
    match = re.search(r"interrupted at step (\d+)", result.stderr)
    assert match and load_checkpoint(Path(config.checkpoint_dir) / "latest.pth")[
        "step"] == int(match[1])
