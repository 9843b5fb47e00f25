"""How long a checkpoint save holds up training: written in the loop (as before the background
writer) against the background writer's copy, side by side, for the default model.

    python -m benchmark.saving                  # CPU; --device cuda on a GPU
    python -m benchmark.saving --repeats 5 --folder /fast/disk

Both write generator.pth and latest.pth (the full training state after one Adam step) with the
same atomic, fsynced writes; "in the loop" is the seconds the loop waited for that, "stall" the
seconds `CheckpointWriter.save` took before the loop could go on (the tensor copies).
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import train
from checkpoints import CheckpointWriter, Progress, generator_only, make_checkpoint, save_checkpoint
from config import TrainConfig
from models import build_discriminator, build_generator
from training_log import LossMeter


def training_state(device):
    config = TrainConfig()
    generator = build_generator(config.model_config()).to(device)
    discriminator = build_discriminator(config.model_config()).to(device)
    optimizers = [train.build_adam(m, config, device) for m in (generator, discriminator)]
    for module, optimizer in zip((generator, discriminator), optimizers):
        for p in module.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()  # Adam's moments exist, as in any checkpoint after the first step
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    return config, generator, discriminator, optimizers, scaler


def files(folder, config, generator, discriminator, optimizers, scaler, device):
    latest = make_checkpoint(config, generator, Progress(step=1), discriminator, optimizers,
                             scaler, LossMeter(device).running_state())
    return {folder / "generator.pth": generator_only(latest), folder / "latest.pth": latest}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    state = training_state(device)
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        folder = Path(tmp)
        in_loop, stall, background = [], [], []
        writer = CheckpointWriter()
        for _ in range(args.repeats):  # taking turns, so that a changing load hits both
            start = time.perf_counter()
            for path, checkpoint in files(folder, *state, device).items():
                save_checkpoint(checkpoint, path)
            in_loop.append(time.perf_counter() - start)
            start = time.perf_counter()
            writer.save(files(folder, *state, device))
            stall.append(time.perf_counter() - start)
            writer.wait()
            background.append(time.perf_counter() - start)
        writer.close()
        size = sum(p.stat().st_size for p in folder.glob("*.pth")) / 2 ** 20
    median = statistics.median
    print(f"{device}: generator.pth + latest.pth, {size:.0f} MiB, median of {args.repeats}")
    print(f"  written in the loop:         {median(in_loop):6.2f} s the loop waits")
    print(f"  background writer:           {median(stall):6.2f} s the loop waits "
          f"({median(stall) / median(in_loop):.0%}); the write finishes "
          f"{median(background):.2f} s after the save")


if __name__ == "__main__":
    main()
