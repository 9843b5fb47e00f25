"""What a training run leaves on disk: checkpoints (written in the background), the JSON loss
log, sample grids; and the rule that a new run never replaces an old one.

Checkpoint format (a plain dict; loads with torch.load(weights_only=True)):
  format, version, config (TrainConfig as a dict, with "model"), step, epoch, samples_done
  (of this epoch, over all processes), generator (state dict); latest.pth adds discriminator,
  both optimisers, the grad scaler, RNG states, the loss log's running sums and the elapsed
  seconds. With --ema_decay, "generator" holds the averaged weights (what inference and
  validation use) and latest.pth adds "generator_train", the weights being trained.
  The learning rate is a function of the epoch (train.lr_factor), so no scheduler
  state is kept; older checkpoints' scheduler entries are ignored.
"""

import copy
import dataclasses
import json
import math
import os
import re
import shlex
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid, save_image

from config import OUTPUT_FIELDS, TrainConfig, check_model_values
from config import saved as saved_config
from utils import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, UserError, _process_exists,
                   atomic_write, get_rng_state, is_project_checkpoint, load_checkpoint,
                   load_state, one_line, save_checkpoint, save_json, set_rng_state)

try:
    import fcntl
except ImportError:  # Windows: the lock file's process id decides
    fcntl = None

LOSS_NAMES = ("g_adv", "g_l1", "d_real", "d_fake")


@dataclass
class Progress:
    """The loop's counters: saved in every checkpoint, restored on resume."""
    step: int = 0
    epoch: int = 0
    samples_done: int = 0  # of this epoch, over all processes
    elapsed: float = 0.0


class GeneratorEMA:
    """An exponential moving average of the generator's weights (Karras et al. 2018; Yazici et
    al. 2019): validation, samples, generator.pth and inference use `module`.

    The decay ramps up as min(decay, (1 + step) / (10 + step)), so that the first steps'
    random weights are soon forgotten; it is a function of the step, so nothing but the
    averaged weights needs saving. NOTE: batch-norm running statistics are not averaged but
    copied from the live generator at every update (as StyleGAN2-ADA does): they follow the
    live weights, which the averaged ones trail by about 1 / (1 - decay) steps.
    """

    def __init__(self, generator, decay):
        self.decay = decay
        self.module = copy.deepcopy(generator).eval().requires_grad_(False)

    def decay_at(self, step):
        return min(self.decay, (1 + step) / (10 + step))

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


# --- Checkpoints ----------------------------------------------------------------------------

def make_checkpoint(config, generator, progress, discriminator=None, optimizers=None,
                    scaler=None, running=None, generator_train=None):
    """The checkpoint dict: generator.pth's, or latest.pth's when `discriminator` is given.
    `generator` is what inference uses (the averaged weights with --ema_decay, whose trained
    generator is `generator_train`). Its tensors are the live ones: CheckpointWriter copies
    them before training goes on."""
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": config.to_dict(),
        "step": progress.step,
        "epoch": progress.epoch,
        "samples_done": progress.samples_done,
        "generator": generator.state_dict(),
    }
    if discriminator is not None:
        checkpoint.update(
            discriminator=discriminator.state_dict(),
            generator_optimizer=optimizers[0].state_dict(),
            discriminator_optimizer=optimizers[1].state_dict(),
            scaler=scaler.state_dict(),
            rng=get_rng_state(),
            log_running=running,
            elapsed=progress.elapsed,
        )
        if generator_train is not None:
            checkpoint["generator_train"] = generator_train.state_dict()
    for what in ("generator", "discriminator", "generator_train"):
        if what in checkpoint:
            _refuse_non_finite(checkpoint[what], what, progress.step)
    return checkpoint


def _refuse_non_finite(state_dict, what, step):
    """NaN or Inf weights are never written: the run stops and the last good checkpoint stays
    (a finite loss can still be followed by an update that overflows)."""
    tensors = [t for t in state_dict.values() if t.is_floating_point()]
    if tensors and not torch.stack([t.isfinite().all() for t in tensors]).all():
        raise UserError(f"step {step}: the {what} weights are not finite (NaN or Inf); stopped "
                        "without saving, the last good checkpoint is kept (try a lower --lr "
                        "or fp32)")


GENERATOR_KEYS = ("format", "version", "config", "step", "epoch", "samples_done", "generator")


def generator_only(checkpoint):
    """generator.pth's checkpoint out of latest.pth's (the same objects, copied once)."""
    return {k: checkpoint[k] for k in GENERATOR_KEYS}


def cpu_copy(value):
    """`value` with every tensor in it copied to the CPU (dicts, lists and tuples walked)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cpu_copy(v) for v in value)
    return value


class CheckpointWriter:
    """Saves checkpoints in a background thread while training goes on.

    `save` copies the tensors (a memory copy, or one device-to-host transfer on a GPU), then
    returns; the thread writes each file atomically (temporary file, fsync, rename), so a crash
    at any moment leaves the previous complete file. One save is in flight at a time: the next
    `save` and `close` wait for it, and re-raise its error (a full disk, say) there.
    """

    def __init__(self, background=True):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint") if background else None
        self.pending = None

    def save(self, checkpoints):
        """`checkpoints`: {path: checkpoint dict}, written in that order."""
        self.wait()
        copies, seen = {}, {}
        for path, checkpoint in checkpoints.items():  # generator.pth shares latest.pth's copy
            copies[path] = {k: seen[id(v)] if id(v) in seen else seen.setdefault(id(v),
                                                                                 cpu_copy(v))
                            for k, v in checkpoint.items()}
        if self.pool is None:
            return _write_all(copies)
        self.pending = self.pool.submit(_write_all, copies)

    def wait(self):
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        try:
            self.wait()
        finally:
            if self.pool is not None:
                self.pool.shutdown()


def _write_all(copies):
    for path, checkpoint in copies.items():
        save_checkpoint(checkpoint, path)


def save_checkpoints(writer, config, nets, ema, optimizers, scaler, meter, progress, snapshot):
    """generator.pth, latest.pth and (`snapshot`) epoch_N.pth, written in the background;
    with `ema`, generator.pth and the snapshots hold the averaged weights."""
    latest = make_checkpoint(config, ema.module if ema else nets.generator, progress,
                             nets.discriminator, optimizers, scaler, meter.running_state(),
                             nets.generator if ema else None)
    folder = Path(config.checkpoint_dir)
    files = {folder / "generator.pth": generator_only(latest), folder / "latest.pth": latest}
    if snapshot:
        files[folder / f"epoch_{progress.epoch:04d}.pth"] = generator_only(latest)
    writer.save(files)


def load_resume_state(path):
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint.get("config"), dict):
        raise UserError(f"{path}: the checkpoint's configuration is missing or unreadable")
    saved_config(path, TrainConfig.from_dict, checkpoint["config"])  # data: checked first
    saved_config(path, check_model_values, checkpoint["config"].get("model", {}))
    if "discriminator" not in checkpoint:
        raise UserError(f"{path}: holds only the generator; resume from latest.pth, which "
                        "holds the full training state")
    return checkpoint


def restore_training_state(checkpoint, path, generator, discriminator, optimizers, scaler,
                           ema=None):
    """Load everything a resumed run needs; returns (Progress, the loss log's running sums).

    A scaler saved disabled (a run that was not fp16) has no state: an fp16 resume starts its
    scale afresh, as a new fp16 run would. With `ema` (a GeneratorEMA), "generator" holds the
    averaged weights and "generator_train" the trained ones."""
    load_state(generator, checkpoint.get("generator_train", checkpoint["generator"]), path,
               "generator")
    if ema is not None:
        load_state(ema.module, checkpoint["generator"], path, "generator")
    load_state(discriminator, checkpoint["discriminator"], path, "discriminator")
    try:
        optimizers[0].load_state_dict(checkpoint["generator_optimizer"])
        optimizers[1].load_state_dict(checkpoint["discriminator_optimizer"])
        if scaler.is_enabled() and checkpoint["scaler"]:
            scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"])
        progress = Progress(step=checkpoint["step"], epoch=checkpoint["epoch"],
                            samples_done=checkpoint["samples_done"],
                            elapsed=checkpoint["elapsed"])
        running = checkpoint["log_running"]
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: the training state is incomplete or does not fit this run "
                        f"({type(e).__name__}: {one_line(e)[:120]})") from None
    return progress, running


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
