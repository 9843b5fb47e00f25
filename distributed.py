"""The processes a training run runs in: one, or one per GPU under torchrun
(`torchrun --nproc_per_node=N train.py ...`). `setup` gives each process its Runtime (device,
decided precision and memory format, rank) and joins the process group; `prepare` and `wrap`
make the networks ready for DDP; `sum_over_ranks` is the one collective the loop reads
through; `StopFlag` lets every process stop at the same step on SIGINT/SIGTERM.

Runtime state lives here, apart from the configuration: the same TrainConfig trains in one
process or in many.
"""

import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from devices import autocast, choose_device, resolve_channels_last, resolve_precision, set_math_mode
from utils import UserError


@dataclass
class Runtime:
    device: torch.device
    precision: str = "fp32"  # decided: never "auto"
    channels_last: bool = False
    batch_size: int = 1
    checkpoint_dir: Path = Path("checkpoints")
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def ddp(self):
        return self.world_size > 1

    def autocast(self):
        return autocast(self.device, self.precision)

    def to_device(self, tensor):
        tensor = tensor.to(self.device, non_blocking=True)
        if self.channels_last:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor


def launched_by_torchrun():
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(config):
    """Pick the device and precision, set the math flags, and join the process group under
    torchrun. Flags are checked before joining, so that a mistake gives every process the same
    one-line error instead of a process group left half-made."""
    distributed = launched_by_torchrun()
    rank, world_size, local_rank = 0, 1, 0
    if distributed:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torchrun_device(config.device, local_rank)
    else:
        device = choose_device(config.device)
    precision, why = resolve_precision(config.precision, device)
    if config.sync_batchnorm and device.type != "cuda":
        raise UserError(f"--sync_batchnorm needs CUDA GPUs: PyTorch's SyncBatchNorm does not "
                        f"run on the {device.type.upper()}; leave it off for per-process batch "
                        "statistics")
    if distributed:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    set_math_mode(device, precision)
    channels_last = resolve_channels_last(config.channels_last, device, precision)
    runtime = Runtime(device=device, precision=precision, channels_last=channels_last,
                      batch_size=config.batch_size, checkpoint_dir=Path(config.checkpoint_dir),
                      rank=rank, world_size=world_size, local_rank=local_rank)
    if runtime.is_main:
        print(f"device {device}, precision {precision} ({why})"
              f"{', channels_last' if channels_last else ''}"
              f"{', compiled' if config.compile else ''}"
              f"{f', {world_size} processes' if distributed else ''}")
    return runtime


def torchrun_device(name, local_rank):
    """Under torchrun each process takes the GPU of its LOCAL_RANK, or the CPU."""
    if name not in ("auto", "cuda", "cpu"):
        raise UserError(f"--device {name}: under torchrun use auto, cuda or cpu; each process "
                        "takes the GPU of its LOCAL_RANK")
    if name == "cpu" or not torch.cuda.is_available():
        if name == "cuda":
            raise UserError("--device cuda: CUDA is not available on this machine")
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise UserError(f"LOCAL_RANK {local_rank}: this machine has {count} CUDA GPU(s); "
                        f"start at most --nproc_per_node={count} processes per node")
    return torch.device(f"cuda:{local_rank}")


def teardown(runtime):
    if runtime.ddp and dist.is_initialized():
        dist.destroy_process_group()


def prepare(module, config, runtime):
    """Move to the device (and memory format); SyncBatchNorm before optimisers see the params.

    In a single process SyncBatchNorm would equal BatchNorm, so a run saved with
    --sync_batchnorm resumes on one GPU unchanged (the state dicts are the same).
    """
    if config.sync_batchnorm and runtime.ddp:
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    module = module.to(runtime.device)
    if runtime.channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module


def wrap(generator, discriminator, config, runtime):
    """The callables the loop trains through: (generator, discriminator, frozen discriminator).

    Under torchrun both networks are wrapped in DDP separately. The generator's step calls the
    plain discriminator: its parameters are frozen there, so nothing of D is synchronised.
    """
    generator_step, discriminator_step = generator, discriminator
    if runtime.ddp:
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        generator_step = DistributedDataParallel(generator, device_ids=ids)
        discriminator_step = DistributedDataParallel(discriminator, device_ids=ids)
    discriminator_frozen = discriminator
    if config.compile:
        generator_step = torch.compile(generator_step)
        discriminator_step = torch.compile(discriminator_step)
        discriminator_frozen = torch.compile(discriminator_frozen)
    return generator_step, discriminator_step, discriminator_frozen


def sum_over_ranks(values, runtime):
    """Element-wise sum over all processes of a 1-D tensor (any device) or a list of floats;
    returns a list of floats. One process: no collective, just the read."""
    tensor = torch.as_tensor(values, dtype=torch.float64)
    if runtime.ddp:
        on = runtime.device if runtime.device.type == "cuda" else torch.device("cpu")
        tensor = tensor.to(on)
        dist.all_reduce(tensor)
    return tensor.tolist()


class StopFlag:
    """SIGINT/SIGTERM ask the loop to stop (every rank at the same step); a second SIGINT
    interrupts at once. Under DDP the processes agree by a collective, so `poll` is meant for
    every `POLL_STEPS` steps there; in one process reading the flag costs nothing."""

    POLL_STEPS = 10
    signal_number = 0  # the last stop signal this process received (train.py's exit status)

    def __init__(self, runtime):
        self.runtime = runtime
        self.signalled = False
        self.stopped = False

    def _handler(self, signum, frame):
        self.signalled = True
        StopFlag.signal_number = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)

    @contextlib.contextmanager
    def installed(self):
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for s in previous:
                signal.signal(s, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            previous = {}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def due(self, step, epoch_end):
        return not self.runtime.ddp or epoch_end or step % self.POLL_STEPS == 0

    def poll(self):
        flag = self.signalled
        if self.runtime.ddp:
            flag = sum_over_ranks([float(flag)], self.runtime)[0] > 0
        self.stopped = self.stopped or flag
        return self.stopped

