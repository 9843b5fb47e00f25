"""What a training run leaves on disk besides its checkpoints (checkpoints.py owns their
format, writing and reading): the JSON loss log, sample grids, the generator's moving
average; and the rule that a new run never replaces an old one.
"""

import copy
import dataclasses
import json
import math
import os
import re
import shlex
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid, save_image

from checkpoints import is_project_checkpoint
from config import OUTPUT_FIELDS
from utils import UserError, _process_exists, atomic_write, save_json

try:
    import fcntl
except ImportError:  # Windows: the lock file's process id decides
    fcntl = None

LOSS_NAMES = ("g_adv", "g_l1", "d_real", "d_fake")


EMA_CALIBRATION_PAIRS = 64  # training label maps that give the averaged generator its statistics


def calibration_indices(num_pairs, count=EMA_CALIBRATION_PAIRS):
    """Which training pairs give the averaged generator its batch-norm statistics: `count`
    spread evenly over the whole set (all of them if it has fewer). Not the first `count`: a
    real set's files in name order are consecutive frames of one drive (CamVid, Cityscapes),
    and statistics from one street gave L1 0.38 on CamVid where spread ones gave 0.18."""
    if num_pairs <= count:
        return list(range(num_pairs))
    return [round(i * (num_pairs - 1) / (count - 1)) for i in range(count)]


class GeneratorEMA:
    """An exponential moving average of the generator's weights (Karras et al. 2018; Yazici et
    al. 2019): validation, samples, generator.pth and inference use `module`.

    The decay ramps up as min(decay, (1 + step) / (10 + step)), so that the first steps'
    random weights are soon forgotten; it is a function of the step, so nothing but the
    averaged weights needs saving. Batch-norm running statistics are copied from the live
    generator at every update (as StyleGAN2-ADA does), but those belong to the live weights,
    which the averaged ones trail by about 1 / (1 - decay) steps: on real photos that gave the
    photos a colour cast (docs/quality.md). So before the averaged generator is used (validation,
    samples, a checkpoint) `recalibrate` gives it the statistics of its own weights.
    """

    def __init__(self, generator, decay):
        self.decay = decay
        self.module = copy.deepcopy(generator).eval().requires_grad_(False)

    def decay_at(self, step):
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def recalibrate(self, label_batches):
        """Batch-norm running statistics of the averaged weights themselves: the plain average
        over `label_batches` (training label maps, each a batch of the training size) of the
        batch statistics those weights produce, dropout off."""
        norms = [m for m in self.module.modules()
                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        momenta = [norm.momentum for norm in norms]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average
            norm.train()
        try:
            for labels in label_batches:
                self.module(labels)
        finally:
            for norm, momentum in zip(norms, momenta):
                norm.momentum = momentum
                norm.eval()

    @torch.no_grad()
    def update(self, generator, step):
        averaged, live = list(self.module.parameters()), list(generator.parameters())
        torch._foreach_lerp_(averaged, [p.detach() for p in live], 1 - self.decay_at(step))
        for mine, theirs in zip(self.module.buffers(), generator.buffers()):
            mine.copy_(theirs)


# --- A new run never replaces an old one ----------------------------------------------------

SAMPLE_GRID = re.compile(r"step_[0-9]{7}\.png")
SNAPSHOT = re.compile(r"epoch_[0-9]{4,}\.pth")
LOG_FORMAT = "pix2pix-log"


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


# --- The loss log ---------------------------------------------------------------------------

class LossMeter:
    """The step losses, summed on the device: reading them would make the CPU wait for the
    GPU, so they are read only at log intervals and before anything is saved. Remembers the
    first step whose losses were not finite, with its values."""

    def __init__(self, device, running=None):
        self.sums = torch.zeros(len(LOSS_NAMES), device=device)
        self.count = 0
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_values = torch.zeros(len(LOSS_NAMES), device=device)
        if running:
            self.sums += torch.tensor(running["sums"], device=device)
            self.count = running["count"]

    def add(self, losses, step):
        losses = losses.detach().float()
        newly_bad = (self.first_bad_step < 0) & ~losses.isfinite().all()
        self.first_bad_step = torch.where(newly_bad, step, self.first_bad_step)
        self.bad_values = torch.where(newly_bad, losses, self.bad_values)
        self.sums += losses
        self.count += 1

    def totals(self):
        """(sums..., count, any bad step): one vector, to be summed over processes."""
        bad = (self.first_bad_step >= 0).double()[None]
        return torch.cat([self.sums.double(), torch.tensor([float(self.count)],
                          dtype=torch.float64, device=self.sums.device), bad])

    def raise_if_bad(self, any_bad):
        """`any_bad`: whether some process saw a non-finite loss (from the summed totals)."""
        if not any_bad:
            return
        step = int(self.first_bad_step)
        if step < 0:
            raise UserError("non-finite loss on another process; stopped without saving, the "
                            "last good checkpoint is kept (try a lower --lr or fp32)")
        values = ", ".join(f"{n}={v:.4g}" for n, v in zip(LOSS_NAMES, self.bad_values.tolist()))
        raise UserError(f"step {step}: non-finite loss ({values}); stopped without saving, "
                        "the last good checkpoint is kept (try a lower --lr or fp32)")

    def reset(self):
        self.sums.zero_()
        self.count = 0

    def running_state(self):
        return {"sums": self.sums.tolist(), "count": self.count}


def tensorboard_dir(config):
    return Path(config.log_file).parent / "tensorboard"


class RunLog:
    """The JSON loss log: per logging interval the mean losses, LR and seconds; per epoch the
    validation numbers. One JSON document, rewritten atomically (rank 0 only). It is handed
    numbers already averaged over processes. With --tensorboard the same numbers, and the
    sample grids, also go to TensorBoard event files (tensorboard/ beside the log)."""

    def __init__(self, config, is_main=True):
        self.path = Path(config.log_file)
        self.is_main = is_main
        self.document = {"format": LOG_FORMAT, "config": config.to_dict(),
                         "steps": [], "epochs": []}
        self.tensorboard_dir = tensorboard_dir(config) if config.tensorboard and is_main else None
        self.purge_step = None  # a resumed run drops the events logged after its checkpoint
        self._tensorboard = None
        if self.tensorboard_dir is not None:  # fail now, not at the first log line
            try:
                import tensorboard  # noqa: F401 (torch's SummaryWriter needs it)
            except ImportError:
                raise UserError("--tensorboard needs the tensorboard package: pip install "
                                "tensorboard (or leave --tensorboard off)") from None

    @property
    def tensorboard(self):
        if self.tensorboard_dir is not None and self._tensorboard is None:
            from torch.utils.tensorboard import SummaryWriter
            self._tensorboard = SummaryWriter(str(self.tensorboard_dir),
                                              purge_step=self.purge_step)
        return self._tensorboard

    def _scalars(self, group, values, step):
        if self.tensorboard is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"{group}/{name}", value, step)

    def add_steps(self, step, epoch, means, lr, seconds):
        self.document["steps"].append({"step": step, "epoch": epoch, **means, "lr": lr,
                                       "seconds": round(seconds, 3)})
        self._scalars("train", {**means, "lr": lr}, step)
        self.save()

    def add_epoch(self, epoch, step, values, seconds):
        bad = [k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise UserError(f"epoch {epoch + 1} (step {step}): non-finite {', '.join(bad)}; "
                            "stopped, the last good checkpoint is kept (try a lower --lr or "
                            "fp32)")
        self.document["epochs"].append({"epoch": epoch, "step": step, **values,
                                        "seconds": round(seconds, 3)})
        self._scalars("val", values, step)
        self.save()

    def add_sample_grid(self, path, step):
        """The grid save_sample_grid wrote, as a TensorBoard image (with --tensorboard)."""
        if self.tensorboard is not None:
            with Image.open(path) as grid:
                self.tensorboard.add_image("samples", np.asarray(grid.convert("RGB")), step,
                                           dataformats="HWC")
            self.tensorboard.flush()

    def save(self):
        if self.is_main:
            save_json(self.document, self.path)
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def resume(self, step):
        """Continue the log on disk, dropping entries written after the checkpoint's step."""
        self.purge_step = step + 1
        if not self.path.exists():
            return
        try:
            old = json.loads(self.path.read_text())
            self.document["steps"] = [e for e in old["steps"] if e["step"] <= step]
            self.document["epochs"] = [e for e in old["epochs"] if e["step"] <= step]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{self.path}: cannot continue this log ({type(e).__name__}: {e}); "
                            "pass another --log_file") from None


def describe_epoch(epoch, epochs, step, values):
    fid = f", FID {values['val_fid']:.2f}" if "val_fid" in values else ""
    return (f"epoch {epoch + 1}/{epochs}: step {step}, val L1 {values['val_l1']:.4f}, "
            f"val PSNR {values['val_psnr']:.2f} dB{fid}")


# --- Sample grids ---------------------------------------------------------------------------

@torch.no_grad()
def save_sample_grid(generator, batch, runtime, folder, step):
    """PNG grid, one row per validation pair: input | generated | target (generator in eval
    mode, then back in the mode it was in)."""
    was_training = generator.training
    generator.eval()
    try:
        with runtime.autocast():
            fake = generator(batch["source"]).float()
    finally:
        generator.train(was_training)
    rows = torch.stack([batch["source"].float(), fake, batch["target"].float()], dim=1)
    grid = make_grid(rows.flatten(0, 1).cpu(), nrow=3, padding=2, normalize=True,
                     value_range=(-1, 1))
    path = Path(folder) / f"step_{step:07d}.png"
    atomic_write(path, lambda f: save_image(grid, f, format="png"))
    return path
