"""Where a generator runs and at what precision, the same rules for training, inference.py and
app.py: the device (`choose_device`), the precision (`PRECISIONS`, `resolve_precision`: `auto`
is bf16 where the device computes it natively), the process-wide math flags
(`set_math_mode`), autocast, the channels-last memory format, and the flags that choose them.
"""

import argparse
import contextlib
from pathlib import Path

import torch

from utils import UserError

# --- Devices --------------------------------------------------------------------------------

def choose_device(name="auto"):
    """`auto` picks CUDA, then Apple MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a device; use auto, cpu, cuda, cuda:N "
                        "or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: Apple MPS is not available on this machine")
    return device


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
    `--device`, `--precision`, `--channels_last`, `--compile` and `--fold_batch_norm`."""
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
    parser.add_argument("--fold_batch_norm", action="store_true", default=True,
                        help="fold batch norm into the convolutions and, in bf16 or fp16, cast "
                             "the weights once (default; the same photos to rounding)")
    parser.add_argument("--no_fold_batch_norm", dest="fold_batch_norm", action="store_false",
                        help="run the network as trained, batch norm as its own layer")
