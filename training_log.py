"""What a run records of its progress besides checkpoints (checkpoints.py owns those): the step
losses, summed on the device and read only at log intervals (LossMeter); the JSON loss log, and
TensorBoard with --tensorboard (RunLog); the console's line per epoch; the sample grids.
"""

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid, save_image

from utils import UserError, atomic_write, save_json

LOSS_NAMES = ("g_adv", "g_l1", "d_real", "d_fake")
LOG_FORMAT = "pix2pix-log"


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
