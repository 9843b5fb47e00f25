"""Translating folders with a checkpoint: sizes, layouts, modes, determinism."""

import re

import numpy as np
import pytest
import torch
from conftest import draw_label_map, draw_photo, run_script, save_image
from PIL import Image

import inference
from inference import Translator, load_generator
from utils import to_uint8, to_unit_range


def label_maps(folder, sizes, rng, suffix=".png"):
    """Label maps of the given (width, height) sizes, named 0, 1, ... ; returns the arrays."""
    arrays = {}
    for k, (width, height) in enumerate(sizes):
        arrays[f"{k}"] = draw_label_map(height, width, rng)
        save_image(arrays[f"{k}"], folder / f"{k}{suffix}")
    return arrays


def size_of(path):
    with Image.open(path) as image:
        return image.size


def read_png(path):
    assert path.suffix == ".png"
    return np.asarray(Image.open(path).convert("RGB"))


def translate_cli(argv):
    """inference.main in this process (the subprocess tests cover the script's start-up), in
    strict fp32 unless told otherwise: the outputs are compared with the generator's own."""
    argv = [str(a) for a in argv]
    inference.main(argv if "--precision" in argv else [*argv, "--precision", "fp32"])


def test_end_to_end_odd_sizes(tmp_path, tiny_checkpoint, rng):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    sizes = {"odd.jpg": (50, 37), "square.png": (40, 40), "wide.jpg": (61, 23)}
    for name, (width, height) in sizes.items():
        save_image(draw_label_map(height, width, rng), inputs / name)
    (inputs / "notes.txt").write_text("not an image")
    result = run_script("inference.py", "--input_dir", inputs, "--output_dir", outputs,
                        "--model_path", tiny_checkpoint())
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "notes.txt" in result.stderr and "skipped" in result.stderr
    assert sorted(p.name for p in outputs.iterdir()) == ["odd.png", "square.png", "wide.png"]
    for name, size in sizes.items():
        assert size_of(outputs / name.replace(".jpg", ".png")) == size
    assert "wrote 3 image(s)" in result.stdout


@pytest.mark.filterwarnings("error::UserWarning")  # e.g. torch on read-only numpy arrays
@pytest.mark.parametrize("side", ["right", "left"])
def test_side_by_side_inputs_use_the_label_half(tmp_path, tiny_checkpoint, rng, capsys, side):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    halves = {}
    for name, (width, height) in {"1.jpg": (64, 64), "2.jpg": (48, 40)}.items():
        label = draw_label_map(height, width, rng)
        pair = (draw_photo(label, rng), label)[::1 if side == "right" else -1]
        save_image(np.concatenate(pair, axis=1), inputs / name)
        joined = np.asarray(Image.open(inputs / name).convert("RGB"))
        halves[name] = joined[:, width:] if side == "right" else joined[:, :width]
    translate_cli(["--input_dir", inputs, "--output_dir", outputs,
                   "--model_path", tiny_checkpoint()])
    assert f"label map: {side} half (" in capsys.readouterr().out
    generator, config = load_generator(tiny_checkpoint())
    expected = Translator(generator, config, "cpu").translate(list(halves.values()))
    for (name, half), image in zip(halves.items(), expected):
        written = read_png(outputs / name.replace(".jpg", ".png"))
        assert written.shape == half.shape  # the size of one half
        assert np.array_equal(written, image)


def test_side_by_side_layout_and_half_can_be_forced(tmp_path, tiny_checkpoint, rng):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    label = draw_label_map(30, 30, rng)
    save_image(np.concatenate([label, draw_photo(label, rng)], axis=1), inputs / "x.png")
    translate_cli(["--input_dir", inputs, "--output_dir", outputs, "--input_layout",
                   "side_by_side", "--label_side", "left", "--model_path", tiny_checkpoint()])
    generator, config = load_generator(tiny_checkpoint())
    [expected] = Translator(generator, config, "cpu").translate([label])
    assert np.array_equal(read_png(outputs / "x.png"), expected)


def test_native_translates_without_scaling(tmp_path, tiny_checkpoint, rng):
    inputs = tmp_path / "in"
    arrays = label_maps(inputs, [(64, 64), (50, 37)], rng)
    translate_cli(["--input_dir", inputs, "--output_dir", tmp_path / "native", "--native",
                   "--model_path", tiny_checkpoint()])
    translate_cli(["--input_dir", inputs, "--output_dir", tmp_path / "scaled",
                   "--model_path", tiny_checkpoint()])
    generator, _ = load_generator(tiny_checkpoint())
    with torch.no_grad():
        direct = generator(to_unit_range(torch.from_numpy(arrays["0"]).permute(2, 0, 1)[None]))
    native = read_png(tmp_path / "native" / "0.png")
    assert np.array_equal(native, to_uint8(direct[0]).permute(1, 2, 0).numpy())
    assert not np.array_equal(native, read_png(tmp_path / "scaled" / "0.png"))
    assert read_png(tmp_path / "native" / "1.png").shape == (37, 50, 3)


def test_paired_folder_translates_only_inputs(tmp_path, tiny_checkpoint, rng):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    for stem in ("a", "b"):
        label = draw_label_map(32, 48, rng)
        save_image(label, inputs / f"{stem}_input.png")
        save_image(draw_photo(label, rng), inputs / f"{stem}_target.jpg")
    translate_cli(["--input_dir", inputs, "--output_dir", outputs,
                   "--model_path", tiny_checkpoint()])
    assert sorted(p.name for p in outputs.iterdir()) == ["a_input.png", "b_input.png"]
    assert read_png(outputs / "a_input.png").shape == (32, 48, 3)


def test_eval_mode_is_deterministic_and_independent_of_batch_mates(tiny_checkpoint, rng):
    generator, config = load_generator(tiny_checkpoint())
    assert not generator.training
    translator = Translator(generator, config, "cpu")
    alone = draw_label_map(37, 50, rng)
    mates = [draw_label_map(37, 50, rng), draw_label_map(40, 54, rng)]  # same padded shape
    [first] = translator.translate([alone])
    [second] = translator.translate([alone])
    batched = translator.translate([mates[0], alone, mates[1]])
    assert np.array_equal(first, second)
    assert np.array_equal(first, batched[1])
    assert first.shape == (37, 50, 3) and batched[2].shape == (40, 54, 3)


def test_paper_test_mode_keeps_dropout_on(tmp_path, tiny_checkpoint, rng):
    path = tiny_checkpoint(image_size=64)  # deep enough for dropout blocks (up5)
    generator, config = load_generator(path)
    translator = Translator(generator, config, "cpu", paper_test_mode=True)
    assert generator.training
    image = draw_label_map(64, 64, rng)
    [first], [second] = translator.translate([image]), translator.translate([image])
    assert not np.array_equal(first, second)
    # And through the command line.
    inputs = tmp_path / "in"
    save_image(image, inputs / "street.png")
    translate_cli(["--input_dir", inputs, "--output_dir", tmp_path / "out",
                   "--paper_test_mode", "--model_path", path])
    assert read_png(tmp_path / "out" / "street.png").shape == (64, 64, 3)


def test_latest_checkpoint_is_accepted(tmp_path, tiny_checkpoint, rng):
    inputs = tmp_path / "in"
    label_maps(inputs, [(40, 30)], rng)
    for kind, latest in (("generator", False), ("latest", True)):
        translate_cli(["--input_dir", inputs, "--output_dir", tmp_path / kind,
                       "--model_path", tiny_checkpoint(latest=latest)])
    assert torch.load(tiny_checkpoint(latest=True), weights_only=True).keys() >= {
        "discriminator", "generator_optimizer", "rng"}
    # Same seed, same weights: the extra keys change nothing.
    assert np.array_equal(read_png(tmp_path / "generator" / "0.png"),
                          read_png(tmp_path / "latest" / "0.png"))


def test_photo2label_output_keeps_to_nearest_colours(tiny_checkpoint, rng):
    generator, config = load_generator(tiny_checkpoint(direction="photo2label"))
    translator = Translator(generator, config, "cpu")
    assert not translator.input_is_label
    photo = draw_photo(draw_label_map(37, 50, rng), rng)
    [out] = translator.translate([photo])
    assert out.shape == photo.shape
    # Upscaled with nearest neighbour: no colour appears that the small output lacked.
    small = translator.generator(translator.prepare(photo)[0])
    h, w = translator.prepare(photo)[1][:2]
    small_colours = {tuple(c) for c in
                     to_uint8(small[0, :, :h, :w]).permute(1, 2, 0).reshape(-1, 3).tolist()}
    assert {tuple(c) for c in out.reshape(-1, 3).tolist()} <= small_colours


def test_every_script_reads_the_direction_alike(tmp_path, tiny_checkpoint, make_dataset, rng):
    """inference.py, the page and evaluate.py get their generator from load_translator: a
    photo2label checkpoint translates photos in inference.py, and is refused, naming the file,
    by the page and evaluate.py, which need label maps -> photos."""
    import app
    import evaluate
    from utils import UserError

    checkpoint = tiny_checkpoint(direction="photo2label")
    inputs = tmp_path / "photos"
    inputs.mkdir()
    save_image(draw_photo(draw_label_map(30, 40, rng), rng), inputs / "0.jpg")
    translate_cli(["--input_dir", inputs, "--output_dir", tmp_path / "out",
                   "--model_path", checkpoint])
    assert size_of(tmp_path / "out" / "0.png") == (40, 30)
    named = re.escape(str(checkpoint))
    with pytest.raises(UserError, match=f"{named}: .*the page needs a label2photo"):
        app.load_service(checkpoint, torch.device("cpu"), "fp32")
    data = make_dataset(splits=(("val", 1),), size=32)
    with pytest.raises(UserError, match=f"{named}: .*evaluate.py needs a label2photo"):
        evaluate.main(["--model_path", str(checkpoint), "--data_dir", str(data / "val"),
                       "--no_fid", "--device", "cpu"])
