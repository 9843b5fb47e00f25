"""A run's output folders: a new run never replaces an old one's files (claim_outputs, or
--overwrite, which removes only files a run wrote), never writes inside --data_dir, and never
shares its checkpoint folder with a run going on (RunLock); and the command that continues a
run (resume_command).
"""

import dataclasses
import json
import os
import re
import shlex
from pathlib import Path

from checkpoints import is_project_checkpoint
from config import OUTPUT_FIELDS
from training_log import LOG_FORMAT, tensorboard_dir
from utils import UserError, _process_exists

try:
    import fcntl
except ImportError:  # Windows: the lock file's process id decides
    fcntl = None

SAMPLE_GRID = re.compile(r"step_[0-9]{7}\.png")
SNAPSHOT = re.compile(r"epoch_[0-9]{4,}\.pth")


def run_files(config):
    """The files a run in these output folders writes that exist now."""
    checkpoints, samples = Path(config.checkpoint_dir), Path(config.sample_dir)
    found = [checkpoints / name for name in ("latest.pth", "generator.pth")]
    found += sorted(p for p in checkpoints.glob("epoch_*.pth") if SNAPSHOT.fullmatch(p.name)) \
        if checkpoints.is_dir() else []
    found += sorted(p for p in samples.glob("step_*.png") if SAMPLE_GRID.fullmatch(p.name)) \
        if samples.is_dir() else []
    found.append(Path(config.log_file))
    events = tensorboard_dir(config)
    found += sorted(events.glob("events.out.tfevents.*")) if events.is_dir() else []
    return [path for path in found if path.is_file()]


def is_run_file(path):
    """Whether `path` is, by its content, a file this project's runs write: a checkpoint with
    the format marker, a log in its own format, a sample grid by its name."""
    path = Path(path)
    if SAMPLE_GRID.fullmatch(path.name) and path.parent.is_dir():
        return True
    if path.suffix == ".pth":
        return is_project_checkpoint(path)
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == LOG_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def outputs_in_data(config):
    """Refuse output folders inside --data_dir: a later start would read them as data."""
    data = Path(config.data_dir).resolve()
    for flag, folder in (("checkpoint_dir", config.checkpoint_dir),
                         ("sample_dir", config.sample_dir),
                         ("log_file", Path(config.log_file).parent)):
        if Path(folder).resolve().is_relative_to(data):
            raise UserError(f"--{flag} {getattr(config, flag)}: is inside --data_dir "
                            f"{config.data_dir}, where a later start would read the run's files "
                            "as data; pass a folder outside it")


def claim_outputs(config, overwrite=False, resume_path=None, is_main=True):
    """Refuse to start where another run's files are, unless `overwrite` (which removes them,
    on the main process, if each is by its content a file of this project's runs). A resumed
    run owns its folders' files if their latest.pth is the one it resumes from; a resume
    into other folders is checked as a new run is."""
    outputs_in_data(config)
    found = run_files(config)
    if resume_path is not None:
        latest = Path(config.checkpoint_dir) / "latest.pth"
        if latest.exists() and latest.resolve() == Path(resume_path).resolve():
            return
    if not found or (overwrite and not is_main):
        return
    if not overwrite:
        names = ", ".join(str(p) for p in found[:3]) + (f" and {len(found) - 3} more"
                                                         if len(found) > 3 else "")
        raise UserError(f"{names}: another run's files are there; continue it with "
                        f"{resume_command(config)}, replace it with "
                        "--overwrite, or give the new run a --name (or other "
                        "--checkpoint_dir/--log_file/--sample_dir)")
    foreign = [p for p in found if not is_run_file(p)]
    if foreign:
        names = ", ".join(str(p) for p in foreign[:3]) + (f" and {len(foreign) - 3} more"
                                                           if len(foreign) > 3 else "")
        raise UserError(f"{names}: --overwrite removes only a run's own files, and these are "
                        "not (no pix2pix checkpoint, log or sample grid); nothing was removed; "
                        "move them or pass other --checkpoint_dir/--log_file/--sample_dir")
    for path in found:
        path.unlink(missing_ok=True)
    names = ", ".join(str(p) for p in found[:5]) + (f" and {len(found) - 5} more"
                                                     if len(found) > 5 else "")
    print(f"--overwrite: removed {len(found)} file(s) of the previous run: {names}")


def resume_command(config, launcher="python train.py"):
    """The command that continues a run: its latest.pth, and the output flags it was given
    (a resume writes where its own command line says, never where the file says)."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    flags = "".join(f" --{flag} {shlex.quote(str(getattr(config, flag)))}"
                    for flag in OUTPUT_FIELDS if getattr(config, flag) != defaults[flag])
    latest = shlex.quote(str(Path(config.checkpoint_dir) / "latest.pth"))
    return f"{launcher} --resume {latest}{flags}"


class RunLock:
    """A lock file in the checkpoint folder, held for the life of a run: a second run there is
    refused naming the process. The lock is an flock on the file, which the system releases
    however the process ends (kill -9 included): a lock file left by a killed run is stale
    and taken over. The file holds the holder's process id, for the message."""

    NAME = ".pix2pix-run.lock"

    def __init__(self, folder):
        self.path = Path(folder) / self.NAME
        self.fd = None

    def acquire(self):
        """Take the lock; returns the process id of a stale lock taken over, else None."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"{self.path}: cannot create the run's lock file "
                                f"({e.strerror})") from None
            holder = self._read_pid(fd)
            if not self._lock(fd, holder):
                os.close(fd)
                who = f"process {holder}" if holder else "another process"
                raise UserError(f"{self.path.parent}: a run is going on there ({who}, lock "
                                f"file {self.path}); wait for it to end or stop it, or pass "
                                "another --checkpoint_dir")
            try:  # the file locked may have been removed by its last holder meanwhile
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return holder if holder and holder != os.getpid() else None

    def _lock(self, fd, holder):
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError:
                return False
        return not holder or not _process_exists(holder)  # no flock: the process id decides

    @staticmethod
    def _read_pid(fd):
        try:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except (OSError, AttributeError):
            return None
        return int(text) if text.isascii() and text.isdigit() else None

    def release(self):
        if self.fd is None:
            return
        try:
            if os.path.samestat(os.fstat(self.fd), os.stat(self.path)):
                self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)  # releases the flock
        self.fd = None

    def __enter__(self):
        stale = self.acquire()
        if stale:
            print(f"{self.path}: took over the lock of process {stale}, which is no longer "
                  "running")
        return self

    def __exit__(self, *exc):
        self.release()

