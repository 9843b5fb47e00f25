"""Where and how training runs: device, precision, memory format, DDP under torchrun, and the
data loader that feeds each process its share.

Runtime state lives here, apart from the configuration: the same TrainConfig trains in one
process or in many (`torchrun --nproc_per_node=N train.py ...`). inference.py uses the same
precision rules (`PRECISIONS`, `resolve_precision`, `set_math_mode`, `autocast`).
"""

import argparse
import contextlib
import os
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from dataset import PairDataset
from utils import UserError, choose_device

# --- Precision ------------------------------------------------------------------------------

PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 instructions that compute bf16


def native_bf16(device):
    """Whether `device` computes bf16 in hardware: CUDA from compute capability 8.0 (Ampere),
    x86 CPUs with AVX-512 BF16 or AMX. Elsewhere bf16 is emulated and slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type != "cpu":
        return False
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)


def resolve_precision(precision, device):
    """(precision, why) with `auto` decided for `device`: bf16 autocast where it is native
    (measured within 1 % of fp32's validation L1 by `python -m benchmark.speed
    --equivalence`, and 1.5-1.8x faster on a CPU with AVX-512 BF16), fp32 elsewhere."""
    device = torch.device(device)
    if precision != "auto":
        if precision in ("fp16", "tf32") and device.type != "cuda":
            raise UserError(f"--precision {precision} needs a CUDA GPU; on {device.type} use "
                            "fp32 or bf16")
        return precision, "as asked"
    if native_bf16(device):
        return "bf16", f"auto: the {device.type.upper()} computes bf16 natively"
    return "fp32", f"auto: no native bf16 on the {device.type.upper()}"


def set_math_mode(device, precision):
    """fp32 means strict fp32, in training, validation and inference alike: cuDNN would
    otherwise use TF32 for convolutions by default. tf32 allows it for matmuls and
    convolutions. Process-wide flags (PyTorch has no per-module switch)."""
    if torch.device(device).type == "cuda":
        tf32 = precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True  # fixed input sizes: pick the fastest kernels


def autocast(device, precision):
    if precision not in AUTOCAST_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AUTOCAST_DTYPES[precision])


# --- Memory format --------------------------------------------------------------------------

CHANNELS_LAST_CHOICES = ("auto", "on", "off")
CHANNELS_LAST_PRECISIONS = ("bf16", "fp16")  # where `auto` turns it on


def resolve_channels_last(setting, device, precision):
    """Whether to run channels-last: `on`/`off` as asked (a bool, from callers, counts as
    on/off); `auto`: where the decided precision is bf16 or fp16. On the CPU (AMX) that was
    measured as fast in training and faster in inference, and slower in fp32
    (docs/performance.md); on CUDA it is the layout the tensor-core kernels take without
    reordering (not measured yet)."""
    if isinstance(setting, bool):
        return setting
    if setting not in CHANNELS_LAST_CHOICES:
        raise UserError(f"--channels_last {setting!r}: choose one of "
                        f"{', '.join(CHANNELS_LAST_CHOICES)}")
    if setting != "auto":
        return setting == "on"
    return precision in CHANNELS_LAST_PRECISIONS


def add_channels_last_flag(parser, default="auto",
                           help="channels-last memory format; auto (default): on where the "
                                "precision is bf16 or fp16"):
    """`--channels_last [auto|on|off]` (alone: on) and `--no_channels_last`: the one definition,
    for train.py's parser (whose defaults are suppressed) and the inference side's."""
    parser.add_argument("--channels_last", nargs="?", const="on", default=default,
                        choices=CHANNELS_LAST_CHOICES, help=help)
    parser.add_argument("--no_channels_last", dest="channels_last", action="store_const",
                        const="off", help=argparse.SUPPRESS)


def add_inference_speed_flags(parser):
    """The flags that decide how a loaded generator runs, the same for inference.py and app.py:
    `--device`, `--precision`, `--channels_last` and `--compile`."""
    parser.add_argument("--device", default="auto",
                        help="auto: CUDA, then Apple MPS, then the CPU; or cpu, cuda:1, ...")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="auto: bf16 autocast where the device computes bf16 natively, "
                             "else fp32; fp32 (strict: no TF32, as in training), tf32 (CUDA), "
                             "bf16, fp16 (CUDA)")
    add_channels_last_flag(parser)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the generator: a slower start, faster photos (pays "
                             "off on large folders and long sessions)")


# --- The runtime ----------------------------------------------------------------------------

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


# --- Data for each process ------------------------------------------------------------------

class EpochSampler(Sampler):
    """Yields (epoch, index) keys: one shuffled order per epoch from (seed, epoch), dealt to the
    processes round-robin by DistributedSampler, and able to start mid-epoch when resuming.

    The epoch travels with each key so that augmentation draws depend on (seed, epoch, index)
    only, whichever loader worker or process handles the sample. Resuming skips the samples the
    whole run already used this epoch, so it stays exact even with another number of processes.
    """

    def __init__(self, num_samples, seed=0, shuffle=True, rank=0, world_size=1):
        self.order = DistributedSampler(range(num_samples), num_replicas=1, rank=0,
                                        shuffle=shuffle, seed=seed)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.indices = []

    def set_epoch(self, epoch, skip_samples=0):
        self.epoch = epoch
        self.order.set_epoch(epoch)
        remaining = list(self.order)[skip_samples:]
        # Rank r takes remaining[r::world_size] (padded to equal lengths, as DDP needs).
        shard = DistributedSampler(remaining, num_replicas=self.world_size, rank=self.rank,
                                   shuffle=False)
        self.indices = [remaining[i] for i in shard]

    def __iter__(self):
        return iter([(self.epoch, i) for i in self.indices])

    def __len__(self):
        return len(self.indices)


def cache_fits(num_pairs, load_size):
    """Whether decoded pairs fit comfortably in memory (a quarter of it, 8 GiB at most)."""
    needed = num_pairs * 2 * 3 * load_size * load_size
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return needed <= min(total // 4, 8 << 30)


def split_folder(config, split):
    if not Path(config.data_dir).is_dir():
        raise UserError(f"{config.data_dir}: data folder not found (--data_dir)")
    return Path(config.data_dir) / split


def build_train_loader(config, runtime):
    folder = split_folder(config, "train")
    if not folder.is_dir():
        raise UserError(f"{folder}: not found; --data_dir must hold train/ and val/ folders")
    dataset = PairDataset(folder, image_size=config.image_size, load_size=config.load_size,
                          train=True, crop=config.crop, flip=config.flip,
                          direction=config.direction, layout=config.layout,
                          label_side=config.label_side, label_format=config.label_format,
                          seed=config.seed)
    cache = config.cache == "on" or (config.cache == "auto" and
                                     cache_fits(len(dataset), config.load_size))
    if cache:
        dataset.fill_cache()
    if runtime.is_main:
        print(f"{folder}: {len(dataset)} pairs, layout {dataset.layout}"
              f"{', cached in memory' if cache else ''}")
        if dataset.evidence:
            print(f"  {dataset.evidence}")
    sampler = EpochSampler(len(dataset), seed=config.seed, rank=runtime.rank,
                           world_size=runtime.world_size)
    workers = config.loader_workers()
    # A generator of its own: each epoch's iterator draws a seed from it, which from the global
    # one would shift the dropout masks of a resumed run against the uninterrupted run's.
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler,
                        num_workers=workers, persistent_workers=workers > 0,
                        pin_memory=runtime.device.type == "cuda",
                        generator=torch.Generator().manual_seed(config.seed),
                        worker_init_fn=ignore_stop_signals if workers else None)
    return loader, sampler


def ignore_stop_signals(worker_id):
    """In a loader worker: Ctrl-C and SIGTERM are the main process's to handle (it finishes the
    step, saves and stops the workers). A forked worker inherits the main process's handler;
    one started by spawn or forkserver (macOS; Linux from Python 3.14) would die of the signal,
    and the main process would fail with "worker exited unexpectedly" instead of saving."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)


def build_val_dataset(config, runtime, train_dataset):
    folder = split_folder(config, "val")
    if not folder.is_dir():
        if runtime.is_main:  # once, not once per process
            warnings.warn(f"{folder}: not found; validating on the training pairs (no "
                          "augmentation)", stacklevel=2)
        folder = train_dataset.folder
    # The label half was decided once, on the training set.
    dataset = PairDataset(folder, image_size=config.image_size, train=False,
                          direction=config.direction, layout=train_dataset.layout,
                          label_side=train_dataset.label_side or "auto",
                          label_format=config.label_format)
    # Validation sees the same pairs every epoch: decode them once, like the training set.
    if train_dataset.cache is not None and cache_fits(len(dataset), config.image_size):
        dataset.fill_cache()
    return dataset


def total_steps(config, loader, runtime):
    """Steps of the whole run, for the progress bar (from a full epoch's length)."""
    per_process = -(-len(loader.dataset) // runtime.world_size)
    steps = config.epochs * -(-per_process // config.batch_size)
    return min(steps, config.max_steps) if config.max_steps else steps


def fixed_batch(dataset, indices, runtime):
    """A batch of chosen items (no augmentation keys), on the device."""
    items = [dataset[i] for i in indices]
    if not items:
        raise UserError(f"{dataset.folder}: no pairs to validate on")
    return {key: runtime.to_device(torch.stack([item[key] for item in items]))
            for key in ("source", "target")}
