"""Helpers shared by the scripts: user errors, atomic files (checkpoints, logs, images), image
tensors. The checkpoint format is checkpoints.py's; devices and precision are devices.py's."""

import functools
import glob
import json
import os
import re
import sys
import tempfile
import threading
from dataclasses import field, fields
from pathlib import Path

import torch

RUNS_DIR = "runs"  # train.py --name NAME writes under runs/NAME/


def option(default, help, choices=None, *, minimum=None, paper=None, legacy=None,
           resumable=False):
    """A configuration field, declared once: its default and --help text, its valid `choices`
    or `minimum`, its value in `--preset paper` (`paper`), the value a configuration saved
    before it existed gets (`legacy`: that run's behaviour), and whether --resume may change it
    (`resumable`). config.py derives the flags, checks and tables from these."""
    metadata = {"help": help, "choices": choices, "minimum": minimum, "paper": paper,
                "legacy": legacy, "resumable": resumable or None}
    return field(default=default, metadata=metadata)


def declared(cls, key):
    """{field name: value} of `key` (e.g. "paper") over the fields of the dataclass `cls`
    whose option declares one."""
    return {f.name: f.metadata[key] for f in fields(cls) if f.metadata.get(key) is not None}


class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit status 2, no traceback."""


def run_cli(main, argv=None):
    """Run a script's main(); a UserError becomes `error: ...` on stderr and exit status 2."""
    for stream in (sys.stdout, sys.stderr):  # file names that are not UTF-8 print escaped
        if hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):
                pass
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C outside train.py's graceful stop: no traceback
        print("interrupted; files written so far are complete", file=sys.stderr)
        sys.exit(130)


def one_line(error):
    # A UserError re-raised from a DataLoader worker carries the worker's traceback as text;
    # its last line is the original message.
    text = str(error).strip()
    if "Traceback (most recent call last)" not in text:  # a file name may hold a line break
        return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m[0])[1:-1], text) or \
            type(error).__name__
    text = text.splitlines()
    last = text[-1] if text else type(error).__name__
    prefix = f"{UserError.__module__}.{UserError.__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


# --- Atomic files ---------------------------------------------------------------------------

def atomic_write(path, write_fn, mode="wb", clean_leftovers=False):
    """Write a file so that a crash at any moment leaves either the old file or the new one.

    `write_fn(file)` writes the content into a temporary file `.NAME.PID.XXXXXXXX.tmp` in the
    same folder, which is flushed, fsynced and renamed over `path`. On an error the temporary
    file is removed and the previous `path` is untouched; a full disk or any other OSError
    becomes a UserError naming `path`. A process killed mid-save leaves its temporary file
    behind, hidden and never read; with `clean_leftovers` (checkpoints, the log) a later save
    of the same file deletes those of processes that are no longer running.
    """
    path = Path(path)
    make_folder(path.parent)
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a file path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{_tmp_stem(path)}.{os.getpid()}.", suffix=".tmp",
                                   dir=path.parent)
    except OSError as e:  # a read-only folder, no inodes left, ...
        raise WriteError(path, e) from None
    try:
        with os.fdopen(fd, mode) as f:
            _make_readable(tmp)
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        cause = _first_cause(e)
        if isinstance(cause, OSError):
            raise WriteError(path, cause) from None
        if cause is not e:
            raise cause from None
        raise
    _fsync_dir(path.parent)
    if clean_leftovers:
        _remove_leftovers(path)


class WriteError(UserError):
    """A file could not be written (`errno` says why: ENOSPC, EACCES, ...)."""

    def __init__(self, path, error):
        super().__init__(f"{path}: could not write ({error.strerror or error}); the previous "
                         "file, if any, is kept")
        self.errno = error.errno


# A temporary file's name adds ~20 characters to the file's own: a long, legal name (most file
# systems allow 255 bytes) is shortened in it so that its temporary file can exist too.
TMP_STEM_BYTES = 200


def _tmp_stem(path):
    name = path.name
    while len(name.encode("utf-8", "surrogateescape")) > TMP_STEM_BYTES:
        name = name[:-1]
    return name


def _first_cause(error):
    """The OSError or KeyboardInterrupt behind `error`, else `error` itself: torch.save
    reports a failed write (a full disk) or an interrupt as a RuntimeError of its own, raised
    while closing the archive, with the original as its context."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) or not isinstance(seen, Exception):
            return seen
        seen = seen.__cause__ or seen.__context__
    return error


def _make_readable(tmp):
    """The permissions a plain open() would give (mkstemp's 0600 hides the file from others)."""
    try:
        os.chmod(tmp, 0o666 & ~_umask())
    except OSError:  # some file systems have no permissions to set
        pass


_UMASK_LOCK = threading.Lock()


@functools.cache
def _umask():
    with _UMASK_LOCK:  # inference writes from threads: none may read the stand-in value
        mask = os.umask(0o077)  # reading the umask means setting it; put back at once
        os.umask(mask)
    return mask


def _remove_leftovers(path):
    """Delete the temporary files of `path` left by processes killed mid-save; returns them.

    A file whose process is still running (another save in progress) is kept.
    """
    path = Path(path)
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        return []
    stem = _tmp_stem(path)
    pattern = re.compile(re.escape(f".{stem}.") + r"([0-9]+)\.[^.]+\.tmp")
    removed = []
    for tmp in path.parent.glob(glob.escape(f".{stem}.") + "*.tmp"):
        match = pattern.fullmatch(tmp.name)
        if match and not _process_exists(int(match[1])):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def _process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def make_folder(folder, flag=None):
    """mkdir -p with a one-line error naming the folder (and the flag that set it)."""
    folder = Path(folder)
    where = f" (--{flag})" if flag else ""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{folder}: cannot create the folder{where}, a file is in the "
                        "way") from None
    except OSError as e:
        raise UserError(f"{folder}: cannot create the folder{where} ({e.strerror})") from None
    return folder


def _fsync_dir(folder):
    # Makes the rename itself durable; not every platform lets a folder be opened.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_json(obj, path):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, allow_nan=False)), mode="w",
                 clean_leftovers=True)


# --- Images ---------------------------------------------------------------------------------

def to_unit_range(image_uint8):
    """uint8 (..., 3, H, W) tensor -> float in [-1, 1]."""
    return image_uint8.float().div_(127.5).sub_(1.0)


def to_uint8(image):
    """Float tensor in [-1, 1] -> uint8 tensor, rounding to nearest."""
    return image.detach().float().add(1.0).mul(127.5).round_().clamp_(0, 255).to(torch.uint8)


def psnr(prediction, target):
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), per image; capped at 100 dB."""
    mse = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(4.0 / mse.clamp_min(4e-10))).clamp_max(100.0)

