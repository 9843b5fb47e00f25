"""Shared test helpers: tiny synthetic Cityscapes-like data sets, a tiny checkpoint, and running
the scripts as subprocesses. Everything is written under pytest's tmp_path; nothing is
downloaded."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cityscapes import COLORS
from config import TrainConfig
from demo.data import real_profile_pair, save_real_profile_jpeg, write_demo_dataset
from models import ModelConfig
from utils import run_cli

# The real CamVid pairs (../shared/camvid, or $PIX2PIX_CAMVID); tests that read them skip
# where the folder is absent.
CAMVID = Path(os.environ.get("PIX2PIX_CAMVID", Path(__file__).resolve().parents[2] / "shared" /
                             "camvid"))

REPO = Path(__file__).resolve().parent.parent  # where the scripts live (pytest.ini: pythonpath)

# --- Tiny configurations: the one definition the test files share --------------------------

TINY_MODEL = {"image_size": 32, "generator_channels": 8, "discriminator_channels": 8}
# A tiny run: one process, no loader workers, every step logged, nothing else written mid-run;
# strict fp32 maths whatever the CPU (`auto` has its own tests).
TINY_TRAINING = {**TINY_MODEL, "batch_size": 2, "num_workers": 0, "log_every_steps": 1,
                 "sample_every_steps": 0, "checkpoint_every_steps": 0, "precision": "fp32"}


def tiny_model(**overrides):
    """The ModelConfig of TINY_MODEL with `overrides` (any ModelConfig field)."""
    return ModelConfig(**{**TINY_MODEL, **overrides})


def as_flags(options):
    """Command-line flags of {TrainConfig field: value}: `--name value`; booleans as
    `--name` / `--no_name`."""
    flags = []
    for name, value in options.items():
        if value is True:
            flags.append(f"--{name}")
        elif value is False:
            flags.append(f"--no_{name}")
        else:
            flags += [f"--{name}", str(value)]
    return flags

# --- Synthetic images ---------------------------------------------------------------------


def draw_label_map(height, width, rng):
    """(H, W, 3) uint8: a street scene in Cityscapes colours (sky, facades, road, sidewalk, a
    car, a pole), drawn with numpy so each region is a flat palette colour."""
    label = np.empty((height, width, 3), np.uint8)
    horizon = int(height * rng.uniform(0.35, 0.55))
    label[:horizon] = COLORS["sky"]
    label[horizon:] = COLORS["road"]
    x = 0
    while x < width:  # a skyline of facades and trees
        w = int(rng.integers(max(2, width // 6), max(3, width // 3)))
        top = int(rng.integers(0, max(1, horizon - 1)))
        label[top:horizon, x:x + w] = COLORS[("building", "vegetation", "wall")[x % 3]]
        x += w
    label[horizon:horizon + max(1, (height - horizon) // 3), :width // 4] = COLORS["sidewalk"]
    car_top, car_left = horizon + (height - horizon) // 3, int(rng.integers(width // 4, width // 2))
    label[car_top:car_top + max(2, height // 6), car_left:car_left + max(3, width // 4)] = \
        COLORS["car"]
    pole = int(rng.integers(width // 2, width - 1))
    label[horizon // 2:horizon + 2, pole:pole + max(1, width // 32)] = COLORS["pole"]
    return label


def draw_photo(label, rng):
    """(H, W, 3) uint8: a 'photo' of a label map as dark, grey and low in contrast as the real
    set's photos (shaded, desaturated region colours plus noise; ../shared/CITYSCAPES.md)."""
    height, width = label.shape[:2]
    shade = np.linspace(0.7, 1.2, height)[:, None, None] * np.linspace(0.9, 1.1, width)[:, None]
    colour = label.astype(np.float64)
    grey = colour.mean(axis=-1, keepdims=True)
    photo = (0.3 * colour + 0.7 * grey) * 0.45 * shade + 40 + rng.normal(0, 6, colour.shape)
    return np.clip(np.round(photo), 0, 255).astype(np.uint8)


def save_image(array, path, quality=90):
    """Write an array as an image; JPEG-compressed when the suffix says so (like the real set)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, quality=quality)
    else:
        image.save(path)
    return path


SCENES = ("real_profile", "drawn")


def write_dataset(root, layout="side_by_side", splits=(("train", 4), ("val", 2)), size=32,
                  label_side="right", suffix=".jpg", seed=0, scenes="real_profile"):
    """A tiny data set under `root` with one folder per split.

    side_by_side: `k.jpg` holds the photo and the label map side by side (label on
    `label_side`, the public set has it on the right); paired: `k_input.jpg` (label map) and
    `k_target.jpg` (photo). `scenes`: "real_profile", the scenes of demo.data.real_profile_pair
    with the real set's profile (square: `size` an int); "drawn", draw_label_map and draw_photo
    (`size` an int or (height, width)).
    """
    root = Path(root)
    height, width = (size, size) if isinstance(size, int) else size
    if scenes not in SCENES:
        raise ValueError(f"scenes={scenes!r}: choose one of {', '.join(SCENES)}")
    if scenes == "real_profile" and height != width:
        raise ValueError(f"real_profile scenes are square, got {height}x{width}: use "
                         f"scenes='drawn' for other shapes")
    for split_number, (split, count) in enumerate(splits):
        for k in range(1, count + 1):
            rng = np.random.default_rng([seed, split_number, k])
            if scenes == "real_profile":
                label, photo = real_profile_pair(rng, height)
            else:
                label = draw_label_map(height, width, rng)
                photo = draw_photo(label, rng)
            if layout == "side_by_side":
                halves = (photo, label) if label_side == "right" else (label, photo)
                save_real_profile(np.concatenate(halves, axis=1), root / split / f"{k}{suffix}")
            elif layout == "paired":
                save_real_profile(label, root / split / f"{k}_input{suffix}")
                save_real_profile(photo, root / split / f"{k}_target{suffix}")
            else:
                raise ValueError(layout)
    return root


def save_real_profile(array, path):
    """JPEG files as the public set's (demo.data.save_real_profile_jpeg), others lossless."""
    if Path(path).suffix.lower() not in (".jpg", ".jpeg"):
        return save_image(array, path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_real_profile_jpeg(array, path)
    return Path(path)


@pytest.fixture
def make_dataset(tmp_path):
    """make_dataset(name="data", **write_dataset options) -> the folder, under tmp_path."""
    def make(name="data", **options):
        return write_dataset(tmp_path / name, **options)
    return make


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# --- A tiny checkpoint --------------------------------------------------------------------

def write_checkpoint(path, image_size=32, latest=False, seed=0, **options):
    """A real checkpoint of a tiny, untrained model: generator.pth style, or latest.pth style
    (with the discriminator, optimisers, scaler and log state) if `latest`."""
    from config import TrainConfig
    from models import build_discriminator, build_generator
    from checkpoints import Progress, make_checkpoint, save_checkpoint
    from training_log import LossMeter

    torch.manual_seed(seed)
    # A trained run's configuration holds the adversarial loss decided on its data, never auto.
    config = TrainConfig(**{**TINY_MODEL, "image_size": image_size, "gan_loss": "hinge",
                            **options})
    generator = build_generator(config.model_config())
    if latest:
        discriminator = build_discriminator(config.model_config())
        optimizers = [torch.optim.Adam(m.parameters()) for m in (generator, discriminator)]
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        checkpoint = make_checkpoint(config, generator, Progress(), discriminator, optimizers,
                                     scaler, LossMeter("cpu").running_state())
    else:
        checkpoint = make_checkpoint(config, generator, Progress())
    save_checkpoint(checkpoint, path)
    return Path(path)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(image_size=32, latest=False, **TrainConfig options) -> path; cached."""
    folder = tmp_path_factory.mktemp("checkpoints")
    made = {}

    def make(image_size=32, latest=False, **options):
        key = (image_size, latest, tuple(sorted(options.items())))
        if key not in made:
            made[key] = write_checkpoint(folder / f"ckpt_{len(made)}.pth", image_size, latest,
                                         **options)
        return made[key]
    return make


# --- Running the scripts ------------------------------------------------------------------

def start_script(script, *args, cwd=None):
    """Start `python SCRIPT ARGS...` (a repository script) without waiting for it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.Popen([sys.executable, str(REPO / script), *map(str, args)],
                            cwd=cwd or REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process, timeout=180):
    """Wait for a started script: a CompletedProcess with its exit status and output."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"{process.args} did not finish in {timeout} s\n{stderr[-2000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_script(script, *args, cwd=None, timeout=180):
    return finish(start_script(script, *args, cwd=cwd), timeout)


def run_scripts(commands, cwd=None, parallel=4):
    """Run {key: (script, *args)} commands, a few side by side (start-up dominates their
    cost); returns {key: CompletedProcess}."""
    keys, results = list(commands), {}
    for start in range(0, len(keys), parallel):
        running = {k: start_script(*commands[k], cwd=cwd) for k in keys[start:start + parallel]}
        results.update({k: finish(p) for k, p in running.items()})
    return results


def assert_clean_failure(result, *names):
    """A user error: non-zero exit, each of `names` in stderr, and no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for name in names:
        assert str(name) in result.stderr, f"{name!r} not in stderr:\n{result.stderr}"


# --- Tiny training runs ---------------------------------------------------------------------



@pytest.fixture(scope="session")
def demo_set(tmp_path_factory):
    """8 training and 2 validation pairs of 32x32 synthetic scenes, side by side (4 steps of 2
    per epoch)."""
    root = tmp_path_factory.mktemp("demo")
    write_demo_dataset(root, num_train=8, num_val=2, size=32, seed=0)
    return root


def run_outputs(folder):
    """The output options of a run that writes everything under `folder`."""
    folder = Path(folder)
    return {"checkpoint_dir": str(folder / "checkpoints"), "log_file": str(folder / "log.json"),
            "sample_dir": str(folder / "samples")}


def tiny_config(folder, data_dir, **overrides):
    """A TrainConfig for a tiny model whose outputs all go under `folder`."""
    return TrainConfig(**{**TINY_TRAINING, "data_dir": str(data_dir), **run_outputs(folder),
                          **overrides})


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a busy 2-core machine: a second thread mostly waits."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def run_in_process(main, argv, capsys):
    """(exit status, stdout, stderr) of a script's main under run_cli, as from the shell."""
    capsys.readouterr()
    try:
        run_cli(main, [str(a) for a in argv])
        status = 0
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


# --- Simulated write failures ---------------------------------------------------------------

class FailingFile:
    """The temporary file, failing with `error` once `limit` bytes (or characters) have been
    written; the bytes up to the limit do reach the file, as when a process dies mid-write."""

    def __init__(self, file, limit, error, at_failure):
        self.file, self.limit, self.error, self.at_failure = file, limit, error, at_failure
        self.written = 0

    def write(self, data):
        room = self.limit - self.written
        if len(data) > room:
            self.file.write(data[:room])
            self.file.flush()
            self.at_failure()
            raise self.error
        self.written += len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return self.file.__exit__(*exc_info)


# --- Training runs as a user starts them -------------------------------------------------

def cli_flags(config):
    """The command-line flags of a TrainConfig, for train.py as a subprocess."""
    flags = []
    for name, value in config.to_dict().items():
        if name == "model":
            continue
        if isinstance(value, bool):
            if value != getattr(TrainConfig, name):
                flags.append(f"--no_{name}" if not value else f"--{name}")
        else:
            flags += [f"--{name}", str(value)]
    return flags


def logged_steps(log_file):
    return [entry["step"] for entry in json.loads(Path(log_file).read_text())["steps"]]


def temp_files(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp"))


def output_flags(config):
    """The output flags of a run: a resume writes where its command line says."""
    return [f"--{name}={getattr(config, name)}" for name in ("checkpoint_dir", "log_file",
                                                             "sample_dir")]
