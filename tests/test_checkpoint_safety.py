"""Checkpoints never run code, and foreign or broken ones get one line naming the file."""

from pathlib import Path

import pytest
import torch
from PIL import Image

import checkpoints
import inference
import train
import utils

from conftest import run_in_process

pytestmark = pytest.mark.usefixtures("one_thread")


# --- Checkpoints never run code, and foreign ones get one line ------------------------------


class RunsCode:
    """Unpickling this calls open(marker, "w"): a stand-in for any code hidden in a pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def corrupt_variants(folder, good):
    """{name: path} of checkpoints that must be refused, made from a good latest.pth dict."""
    folder = Path(folder)
    paths = {}

    def save(name, obj):
        paths[name] = folder / f"{name.replace(' ', '_')}.pth"
        torch.save(obj, paths[name])

    save("good", good)
    save("pickled code", {**good, "payload": RunsCode(folder / "code_ran")})
    save("another model's weights", {**good, "generator": good["discriminator"]})
    save("other width", {**good, "config": {
        **good["config"], "generator_channels": 16,
        "model": {**good["config"]["model"], "generator_channels": 16}}})
    save("no optimiser state", {k: v for k, v in good.items() if k != "generator_optimizer"})
    save("plain state dict", good["generator"])
    save("no configuration", {k: v for k, v in good.items() if k != "config"})
    whole = paths.pop("good").read_bytes()
    paths["truncated"] = folder / "truncated.pth"
    paths["truncated"].write_bytes(whole[:len(whole) // 2])
    paths["empty"] = folder / "empty.pth"
    paths["empty"].write_bytes(b"")
    paths["an image"] = folder / "picture.pth"
    Image.new("RGB", (8, 8)).save(paths["an image"], format="PNG")
    return paths


REFUSALS = {"pickled code": "refused", "another model's weights": "another model's state dict",
            "other width": "other channel settings", "no optimiser state": "incomplete",
            "plain state dict": "not a pix2pix checkpoint", "no configuration": "configuration",
            "truncated": "truncated or corrupt", "empty": "empty file",
            "an image": "not a readable checkpoint"}


def test_no_widened_allow_list():
    # Only what torch itself lists (its own rebuild functions and classes, Python's exception
    # classes): the project adds nothing, and no builtin such as open or exec is allowed.
    for entry in torch.serialization.get_safe_globals():
        obj = entry[0] if isinstance(entry, tuple) else entry
        module = obj.__module__.split(".")[0]
        assert module == "torch" or (module in ("builtins", "traceback") and
                                     isinstance(obj, type)), entry
    for source in Path(utils.__file__).parent.glob("*.py"):
        text = source.read_text()
        assert "safe_globals" not in text and "weights_only=False" not in text, source


def test_the_pickled_code_would_run_if_loaded_unsafely(tmp_path, tiny_checkpoint):
    # Proves the payload of the refusal tests is live.
    paths = corrupt_variants(tmp_path, torch.load(tiny_checkpoint(latest=True),
                                                  weights_only=True))
    torch.load(paths["pickled code"], weights_only=False)["payload"].close()
    assert (tmp_path / "code_ran").exists()


@pytest.mark.parametrize("variant", list(REFUSALS))
def test_resume_refuses_a_bad_checkpoint_in_one_line(tmp_path, tiny_checkpoint, capsys,
                                                     monkeypatch, variant):
    monkeypatch.chdir(tmp_path)
    path = corrupt_variants(tmp_path, torch.load(tiny_checkpoint(latest=True),
                                                 weights_only=True))[variant]
    status, _, stderr = run_in_process(train.main, [
        "--resume", path, "--data_dir", tmp_path / "no_data", "--checkpoint_dir",
        tmp_path / "run", "--log_file", tmp_path / "run" / "log.json", "--sample_dir",
        tmp_path / "run"], capsys)
    assert status == 2 and "Traceback" not in stderr
    [line] = stderr.strip().splitlines()
    assert line.startswith(f"error: {path}: ") and REFUSALS[variant] in line, line
    assert len(line) - len(str(path)) < 250, line  # a sentence, not a dump of keys
    assert not (tmp_path / "code_ran").exists()
    assert not (tmp_path / "run" / "latest.pth").exists()


@pytest.mark.parametrize("variant", ["pickled code", "another model's weights"])
def test_inference_refuses_a_bad_checkpoint_in_one_line(tmp_path, tiny_checkpoint, capsys,
                                                        variant):
    # The other variants: tests/test_bad_input.py::test_checkpoint_variants.
    path = corrupt_variants(tmp_path, torch.load(tiny_checkpoint(latest=True),
                                                 weights_only=True))[variant]
    (tmp_path / "in").mkdir()
    Image.new("RGB", (16, 16), (128, 64, 128)).save(tmp_path / "in" / "a.png")
    status, _, stderr = run_in_process(inference.main, [
        "--input_dir", tmp_path / "in", "--output_dir", tmp_path / "out", "--model_path", path],
        capsys)
    assert status == 2 and "Traceback" not in stderr
    [line] = stderr.strip().splitlines()
    assert line.startswith(f"error: {path}: ") and REFUSALS[variant] in line, line
    assert not (tmp_path / "code_ran").exists()
    assert not (tmp_path / "out").exists()


# --- A checkpoint's saved configuration is data: checked before anything is built -----------

HOSTILE_CONFIGS = {  # (where, field, value): what a damaged or hostile file may hold
    "negative width": ("model", "generator_channels", -8),
    "huge width": ("model", "generator_channels", 20_000),
    "fractional width": ("model", "generator_channels", 8.5),
    "width as text": ("model", "generator_channels", "8"),
    "size as text": ("model", "image_size", "32"),
    "huge size": ("model", "image_size", 2**20),
    "norm as a number": ("model", "norm", 5),
    "dropout as text": ("model", "dropout", "yes"),
    "model as a list": ("model", None, [1, 2]),
}


def hostile(good, where, field, value):
    config = dict(good["config"])
    if field is None:
        config[where] = value
    else:
        config[where] = {**config[where], field: value}
        config[field] = value  # the training configuration holds it too
    return {**good, "config": config}


@pytest.mark.parametrize("case", list(HOSTILE_CONFIGS))
def test_a_hostile_saved_configuration_is_one_line_before_anything_is_built(
        tmp_path, tiny_checkpoint, capsys, monkeypatch, case):
    where, field, value = HOSTILE_CONFIGS[case]
    good = torch.load(tiny_checkpoint(latest=True), weights_only=True)
    path = tmp_path / "hostile.pth"
    torch.save(hostile(good, where, field, value), path)

    def built(*args):  # a spy: building first would show only as time or memory spent
        raise AssertionError("a network was built from an unchecked configuration")
    monkeypatch.setattr(inference, "build_generator", built)
    monkeypatch.setattr(train, "build_generator", built)
    (tmp_path / "in").mkdir()
    Image.new("RGB", (16, 16), (128, 64, 128)).save(tmp_path / "in" / "a.png")
    for script, argv in ((inference.main, ["--input_dir", tmp_path / "in", "--output_dir",
                                           tmp_path / "out", "--model_path", path]),
                         (train.main, ["--resume", path, "--checkpoint_dir", tmp_path / "run"])):
        status, _, stderr = run_in_process(script, argv, capsys)
        assert status == 2 and "Traceback" not in stderr, stderr
        [line] = stderr.strip().splitlines()
        assert line.startswith(f"error: {path}: ") and (field or where) in line, line


def test_the_parameter_bound_is_above_every_real_count():
    from config import parameter_bound
    from models import ModelConfig, build_discriminator, build_generator, count_parameters
    for options in ({"upsample": "resize"}, {"upsample": "transposed"},
                    {"discriminator_layers": 5}, {"image_size": 32, "generator_channels": 8}):
        model = ModelConfig(**options)
        real = count_parameters(build_generator(model)) + \
            count_parameters(build_discriminator(model))
        assert real <= parameter_bound(model), options
        assert parameter_bound(model) <= 2 * real or "image_size" in options, options


def test_weights_of_another_shape_are_refused_before_any_is_copied(tiny_checkpoint):
    generator, _ = inference.load_generator(tiny_checkpoint())
    before = {k: v.clone() for k, v in generator.state_dict().items()}
    state = dict(generator.state_dict())
    first, last = list(state)[0], list(state)[-1]
    state[last] = torch.zeros(5)  # the last key is wrong: the first must stay untouched
    state[first] = torch.full_like(state[first], 7.0)
    with pytest.raises(utils.UserError, match=f"{last} has shape"):
        checkpoints.load_state(generator, state, "x.pth", "generator")
    assert torch.equal(generator.state_dict()[first], before[first])


def test_the_command_line_has_the_same_bound(capsys):
    from config import TrainConfig
    with pytest.raises(utils.UserError, match="parameters"):
        TrainConfig(generator_channels=20_000)
    with pytest.raises(utils.UserError, match="image_size"):
        TrainConfig(image_size=2**14)
    with pytest.raises(utils.UserError, match="--crop must be bool"):
        TrainConfig(crop="no")
