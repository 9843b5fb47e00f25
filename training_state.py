"""What a training run leaves on disk: checkpoints, the JSON loss log, sample grids.

Checkpoint format (a plain dict; loads with torch.load(weights_only=True)):
  format, version, config (TrainConfig as a dict, with "model"), step, epoch, samples_done
  (of this epoch, over all processes), generator (state dict); latest.pth adds discriminator,
  both optimisers, both LR schedulers, the grad scaler, RNG states, the log's running sums and
  the elapsed seconds.
"""

import json
import math
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

import runtime as rt
from utils import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, UserError, atomic_write,
                   get_rng_state, load_checkpoint, load_state, one_line, save_checkpoint,
                   save_json, set_rng_state)

LOSS_NAMES = ("g_adv", "g_l1", "d_real", "d_fake")


def make_checkpoint(config, generator, state, discriminator=None, optimizers=None,
                    schedulers=None, scaler=None, log=None):
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": config.to_dict(),
        "step": state["step"],
        "epoch": state["epoch"],
        "samples_done": state["samples_done"],
        "generator": generator.state_dict(),
    }
    if discriminator is not None:
        checkpoint.update(
            discriminator=discriminator.state_dict(),
            generator_optimizer=optimizers[0].state_dict(),
            discriminator_optimizer=optimizers[1].state_dict(),
            generator_scheduler=schedulers[0].state_dict(),
            discriminator_scheduler=schedulers[1].state_dict(),
            scaler=scaler.state_dict(),
            rng=get_rng_state(),
            log_running=log.running_state(),
            elapsed=state["elapsed"],
        )
    for what in ("generator", "discriminator"):
        if what in checkpoint:
            _refuse_non_finite(checkpoint[what], what, state["step"])
    return checkpoint


def _refuse_non_finite(state_dict, what, step):
    """NaN or Inf weights are never written: the run stops and the last good checkpoint stays
    (a finite loss can still be followed by an update that overflows)."""
    tensors = [t for t in state_dict.values() if t.is_floating_point()]
    if tensors and not torch.stack([t.isfinite().all() for t in tensors]).all():
        raise UserError(f"step {step}: the {what} weights are not finite (NaN or Inf); stopped "
                        "without saving, the last good checkpoint is kept (try a lower --lr "
                        "or fp32)")


def load_resume_state(path):
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint.get("config"), dict):
        raise UserError(f"{path}: the checkpoint's configuration is missing or unreadable")
    if "discriminator" not in checkpoint:
        raise UserError(f"{path}: holds only the generator; resume from latest.pth, which "
                        "holds the full training state")
    return checkpoint


def restore_training_state(checkpoint, path, generator, discriminator, optimizers, schedulers,
                           scaler, log):
    """Load everything a resumed run needs; returns the loop's counters."""
    load_state(generator, checkpoint["generator"], path, "generator")
    load_state(discriminator, checkpoint["discriminator"], path, "discriminator")
    try:
        optimizers[0].load_state_dict(checkpoint["generator_optimizer"])
        optimizers[1].load_state_dict(checkpoint["discriminator_optimizer"])
        schedulers[0].load_state_dict(checkpoint["generator_scheduler"])
        schedulers[1].load_state_dict(checkpoint["discriminator_scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"])
        log.resume(checkpoint["step"], checkpoint["log_running"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: the training state is incomplete or does not fit this run "
                        f"({type(e).__name__}: {one_line(e)[:120]})") from None
    return {"step": checkpoint["step"], "epoch": checkpoint["epoch"],
            "samples_done": checkpoint["samples_done"], "elapsed": checkpoint["elapsed"]}


class RunLog:
    """The JSON loss log: per logging interval the mean losses, LR and seconds; per epoch the
    validation numbers. One JSON document, rewritten atomically (rank 0 only)."""

    def __init__(self, config, is_main=True):
        self.path = Path(config.log_file)
        self.is_main = is_main
        self.document = {"format": "pix2pix-log", "config": config.to_dict(),
                         "steps": [], "epochs": []}
        self.sums = [0.0] * len(LOSS_NAMES)
        self.count = 0

    def add_step(self, losses, step):
        if not all(math.isfinite(v) for v in losses):
            values = ", ".join(f"{n}={v:.4g}" for n, v in zip(LOSS_NAMES, losses))
            raise UserError(f"step {step}: non-finite loss ({values}); stopped without saving, "
                            "the last good checkpoint is kept (try a lower --lr or fp32)")
        self.sums = [s + v for s, v in zip(self.sums, losses)]
        self.count += 1

    def flush_steps(self, step, epoch, lr, seconds, runtime):
        """Append the interval's means (averaged over processes) and rewrite the file."""
        *sums, count = rt.sum_over_ranks([*self.sums, float(self.count)], runtime)
        means = {name: s / max(count, 1) for name, s in zip(LOSS_NAMES, sums)}
        self.document["steps"].append({"step": step, "epoch": epoch, **means, "lr": lr,
                                       "seconds": round(seconds, 3)})
        self.sums, self.count = [0.0] * len(LOSS_NAMES), 0
        self.save()

    def add_epoch(self, epoch, step, values, seconds):
        bad = [k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise UserError(f"epoch {epoch + 1} (step {step}): non-finite {', '.join(bad)}; "
                            "stopped, the last good checkpoint is kept (try a lower --lr or "
                            "fp32)")
        self.document["epochs"].append({"epoch": epoch, "step": step, **values,
                                        "seconds": round(seconds, 3)})
        self.save()

    def save(self):
        if self.is_main:
            save_json(self.document, self.path)

    def running_state(self):
        return {"sums": list(self.sums), "count": self.count}

    def resume(self, step, running):
        """Continue the log on disk, dropping entries written after the checkpoint's step."""
        self.sums, self.count = list(running["sums"]), running["count"]
        if not self.path.exists():
            return
        try:
            old = json.loads(self.path.read_text())
            self.document["steps"] = [e for e in old["steps"] if e["step"] <= step]
            self.document["epochs"] = [e for e in old["epochs"] if e["step"] <= step]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{self.path}: cannot continue this log ({type(e).__name__}: {e}); "
                            "pass another --log_file") from None


@torch.no_grad()
def save_sample_grid(generator, batch, runtime, folder, step):
    """PNG grid, one row per validation pair: input | generated | target (generator in eval)."""
    was_training = generator.training
    generator.eval()
    with runtime.autocast():
        fake = generator(batch["source"]).float()
    generator.train(was_training)
    rows = torch.stack([batch["source"].float(), fake, batch["target"].float()], dim=1)
    grid = make_grid(rows.flatten(0, 1).cpu(), nrow=3, padding=2, normalize=True,
                     value_range=(-1, 1))
    path = Path(folder) / f"step_{step:07d}.png"
    atomic_write(path, lambda f: save_image(grid, f, format="png"))
    return path


def save_snapshot(config, generator, state, folder):
    """A generator-only checkpoint kept per epoch (loads in inference.py)."""
    path = Path(folder) / f"epoch_{state['epoch']:04d}.pth"
    save_checkpoint(make_checkpoint(config, generator, state), path)
    return path
