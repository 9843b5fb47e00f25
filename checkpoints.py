"""The checkpoint format, in one place: what a checkpoint file holds, its format marker and
version, how it is written (atomically, in the background while training goes on) and read
(safely: tensors and plain values only, never code), validating the saved configuration on
load, loading the training state for --resume, and old formats. Also the marker of exported
generators (EXPORT_FORMAT, written by export.py, checked by inference.py).

A checkpoint is a plain dict; it loads with torch.load(weights_only=True):
  format, version, config (TrainConfig as a dict, with "model"), step, epoch, samples_done
  (of this epoch, over all processes), generator (state dict); latest.pth adds discriminator,
  both optimisers, the grad scaler, RNG states, the loss log's running sums and the elapsed
  seconds. With --ema_decay, "generator" holds the averaged weights (what inference and
  validation use) and latest.pth adds "generator_train", the weights being trained.

Old formats: the learning rate is a function of the epoch (train.lr_factor), so no scheduler
state is kept; older checkpoints' scheduler entries are ignored. A configuration saved before
a flag existed gets the flag's old value (config.LEGACY_DEFAULTS); one that used a removed
setting is refused in one line where the use needs it (config.REMOVED). A version newer than
CHECKPOINT_VERSION is refused.
"""

import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from config import TrainConfig, check_model_values, refuse_removed
from config import saved as saved_config
from utils import UserError, atomic_write, one_line

CHECKPOINT_FORMAT = "pix2pix-checkpoint"
CHECKPOINT_VERSION = 1
EXPORT_FORMAT = "pix2pix-generator"  # the marker in an exported file's metadata (export.py)


@dataclass
class Progress:
    """The loop's counters: saved in every checkpoint, restored on resume."""
    step: int = 0
    epoch: int = 0
    samples_done: int = 0  # of this epoch, over all processes
    elapsed: float = 0.0


# --- Writing --------------------------------------------------------------------------------

def save_checkpoint(checkpoint, path):
    atomic_write(path, lambda f: torch.save(checkpoint, f), clean_leftovers=True)


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


# --- Reading --------------------------------------------------------------------------------

def run_file(path, name):
    """`path` itself, or where a folder keeps `name`: a run folder (runs/NAME: its
    checkpoints/`name`) or a checkpoint folder (its `name`)."""
    path = Path(path)
    if not path.is_dir():
        return path
    for candidate in (path / "checkpoints" / name, path / name):
        if candidate.is_file():
            return candidate
    raise UserError(f"{path}: is a folder without checkpoints/{name} or {name}; pass a run "
                    "folder (runs/NAME) or a checkpoint file")


def load_checkpoint(path, map_location="cpu"):
    """Load a pix2pix checkpoint safely: tensors and plain containers only, never code."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a checkpoint file")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # a well-formed pickle of Python objects
            raise UserError(f"{path}: refused: the file holds pickled Python objects, which "
                            "could run code; a pix2pix checkpoint holds only tensors and "
                            "plain values") from None
        raise UserError(f"{path}: not a readable checkpoint (not a PyTorch file, or "
                        "corrupt)") from None
    except Exception as e:  # noqa: BLE001 (other bytes fail in the unpickler in many ways)
        if not path.stat().st_size:
            reason = "empty file"
        elif isinstance(e, (RuntimeError, OSError, ValueError)):
            reason = f"truncated or corrupt: {one_line(e)[:120]}"
        else:
            reason = "not a PyTorch file, or corrupt"
        raise UserError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a pix2pix checkpoint of this project "
                        "(no 'format' marker); was it written by another implementation?")
    if checkpoint.get("version", 0) > CHECKPOINT_VERSION:
        raise UserError(f"{path}: checkpoint version {checkpoint['version']} is newer than "
                        f"this code understands ({CHECKPOINT_VERSION})")
    return checkpoint


def is_project_checkpoint(path):
    """Whether `path` is a checkpoint with this project's format marker (memory-mapped: the
    weights are not read)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 (anything unreadable is not one)
        return False
    return isinstance(checkpoint, dict) and checkpoint.get("format") == CHECKPOINT_FORMAT


def load_state(module, state_dict, path, what):
    """load_state_dict with a one-line message instead of a dump of mismatched keys; names and
    shapes are compared before any weight is copied."""
    problem = _mismatch(module, state_dict)
    if problem is None:
        try:
            module.load_state_dict(state_dict)
            return
        except (RuntimeError, TypeError, AttributeError, ValueError) as e:
            problem = one_line(e)[:160]
    raise UserError(f"{path}: the {what} weights do not fit the architecture in the "
                    f"checkpoint's configuration ({problem})")


def _mismatch(module, state_dict):
    """What differs between `state_dict` and `module`, in a few words; None if nothing."""
    if not isinstance(state_dict, dict):
        return f"a {type(state_dict).__name__} instead of a state dict"
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        return (f"{len(missing)} weights missing, {len(unexpected)} unexpected, e.g. "
                f"{str((missing or unexpected)[0])[:80]}; is it another model's state dict?")
    for key, value in expected.items():
        if not isinstance(state_dict[key], torch.Tensor):
            return f"{key} is a {type(state_dict[key]).__name__}, not a tensor"
        shape = list(state_dict[key].shape)
        if shape != list(value.shape):
            return (f"{key} has shape {shape} in the file, {list(value.shape)} in the model; "
                    "was it saved with other channel settings?")
    return None


def get_rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what get_rng_state saved. CUDA generators are restored for the GPUs both
    machines have: a run saved on 8 GPUs resumes on 1 (or on the CPU) with the first ones."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


# --- Resuming -------------------------------------------------------------------------------

def load_resume_state(path):
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint.get("config"), dict):
        raise UserError(f"{path}: the checkpoint's configuration is missing or unreadable")
    refuse_removed(path, checkpoint["config"], resume=True)
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
