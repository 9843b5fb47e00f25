"""Where and how training runs: device, precision, memory format, and DDP under torchrun.

Runtime state lives here, apart from the configuration: the same TrainConfig trains in one
process or in many (`torchrun --nproc_per_node=N train.py ...`).
"""

import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from utils import UserError, choose_device

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    precision: str = "fp32"
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
        if self.precision not in AUTOCAST_DTYPES:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.precision])

    def to_device(self, tensor):
        tensor = tensor.to(self.device, non_blocking=True)
        if self.channels_last:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor


def launched_by_torchrun():
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(config):
    """Pick the device, set precision flags, and join the process group under torchrun.

    Flags are checked before joining, so that a mistake gives every process the same one-line
    error instead of a process group left half-made.
    """
    distributed = launched_by_torchrun()
    rank, world_size, local_rank = 0, 1, 0
    if distributed:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torchrun_device(config.device, local_rank)
    else:
        device = choose_device(config.device)
    if config.precision in ("fp16", "tf32") and device.type != "cuda":
        raise UserError(f"--precision {config.precision} needs a CUDA GPU; on {device.type} "
                        "use fp32 or bf16")
    if config.sync_batchnorm and device.type != "cuda":
        raise UserError(f"--sync_batchnorm needs CUDA GPUs: PyTorch's SyncBatchNorm does not "
                        f"run on the {device.type.upper()}; leave it off for per-process batch "
                        "statistics")
    if distributed:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        # Plain fp32 means fp32: cuDNN would otherwise use TF32 for convolutions by default.
        tf32 = config.precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True  # fixed input sizes: pick the fastest kernels
    return Runtime(device=device, precision=config.precision,
                   channels_last=config.channels_last, batch_size=config.batch_size,
                   checkpoint_dir=Path(config.checkpoint_dir), rank=rank,
                   world_size=world_size, local_rank=local_rank)


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


def build_adam(module, config, runtime):
    """Adam over `module`'s parameters. With --fused_adam one kernel updates every tensor (the
    same maths); otherwise PyTorch's default, which on the CPU is about ten passes per tensor."""
    fused = config.fused_adam and runtime.device.type in ("cpu", "cuda")
    return torch.optim.Adam(module.parameters(), lr=config.lr, betas=(config.beta1, config.beta2),
                            fused=fused or None)


def step_in_backward(module, optimizer, config, runtime):
    """Update each of `module`'s parameters as soon as backward has finished its gradient, and
    free that gradient: Adam treats every tensor on its own, so this is the update that
    optimizer.step() after backward would make, but the gradients never all exist at once
    (the generator's are 218 MB in fp32). Returns False, changing nothing, where it can't apply:
    under DDP (gradients are averaged after backward) and with fp16 (the gradient scaler
    checks all of them first)."""
    if not config.step_in_backward or runtime.ddp or config.precision == "fp16":
        return False

    def update(param):
        optimizer.step()  # only parameters holding a gradient take part: this one
        param.grad = None

    for param in module.parameters():
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(update)
    return True


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
    """Element-wise sum of a list of floats over all processes (a no-op in one process)."""
    if not runtime.ddp:
        return list(values)
    device = runtime.device if runtime.device.type == "cuda" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


class StopFlag:
    """SIGINT/SIGTERM ask the loop to stop after the current step (every rank at the same step);
    a second SIGINT interrupts at once."""

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

    def poll(self):
        flag = self.signalled
        if self.runtime.ddp:
            flag = sum_over_ranks([float(flag)], self.runtime)[0] > 0
        self.stopped = self.stopped or flag
        return self.stopped
