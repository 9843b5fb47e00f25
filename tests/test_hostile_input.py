"""Every way a user's data folder or output path can be wrong gets its documented behaviour:
converted, skipped with a warning, or stopped with one line naming the file. What is covered
already lives in tests/test_bad_input.py (unreadable images, flags, checkpoints) and
tests/test_dataset.py (RGBA, palette, 16-bit grey, grayscale label maps, EXIF, orphans, sizes)."""

import errno
import json
import os
import re
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dataset
import inference
import plot_loss
import train
import utils
from cityscapes import COLORS
from dataset import PairDataset, find_pairs, off_palette_pixels, read_rgb
from utils import UserError

from conftest import (TINY_MODEL, FailingFile, as_flags, draw_label_map, draw_photo,
                      run_in_process, save_image, write_dataset)

pytestmark = pytest.mark.usefixtures("one_thread")

PALETTE = np.array(list(COLORS.values()), np.uint8)
TINY_RUN = [*as_flags(TINY_MODEL), "--epochs", "1", "--batch_size", "2", "--num_workers", "0"]


def error_lines(stderr):
    """The `error:` lines among the progress bar's redraws."""
    return [line for line in re.split(r"[\r\n]+", stderr) if line.startswith("error:")]


# --- Image modes: converted -----------------------------------------------------------------


def png_48_bit(array):
    """A 16-bit-per-channel RGB PNG (PIL cannot write one), as exported by raw converters."""
    height, width, _ = array.shape
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2,
                                                            0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


RED = (200, 30, 60)


@pytest.mark.parametrize("mode, suffix, expected", [
    ("CMYK", ".jpg", RED), ("LA", ".png", (84, 84, 84)), ("1", ".png", (0, 0, 0)),
    ("I", ".tif", (84, 84, 84)), ("F", ".tif", (84, 84, 84)), ("48-bit", ".png", RED)])
def test_other_photo_modes_become_8_bit_rgb(tmp_path, mode, suffix, expected):
    path = tmp_path / f"photo{suffix}"
    if mode == "48-bit":
        path.write_bytes(png_48_bit(np.full((6, 8, 3), RED, np.uint16) * 257))
    else:
        Image.new("RGB", (8, 6), RED).convert(mode, dither=Image.Dither.NONE).save(path)
    photo = read_rgb(path, "photo")
    assert photo.shape == (6, 8, 3) and photo.dtype == np.uint8
    assert np.abs(photo.astype(int) - expected).max() <= 2, photo[0, 0]


def test_a_16_bit_label_map_is_refused_as_grayscale(tmp_path):
    path = tmp_path / "deep_input.png"
    Image.fromarray(np.full((6, 8), 40000, np.uint16)).save(path)
    with pytest.raises(UserError, match="single-channel") as error:
        read_rgb(path, "label map")
    assert str(path) in str(error.value)


def test_inference_converts_what_it_can_and_names_what_it_cannot(tmp_path, tiny_checkpoint,
                                                                 capsys, rng):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    label = draw_label_map(24, 32, rng)
    save_image(label, inputs / "plain.png")
    rgba = np.concatenate([label, np.full((24, 32, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba).save(inputs / "rgba.png")
    Image.fromarray(label).quantize(8).save(inputs / "palette.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated: 32 high, 24 wide
    Image.fromarray(label).save(inputs / "rotated.jpg", exif=exif, quality=95)
    Image.fromarray(label).convert("L").save(inputs / "gray.png")
    (inputs / "notes.txt").write_text("not an image")
    (inputs / "._plain.png").write_bytes(b"macOS metadata")  # hidden: ignored silently

    with pytest.warns(UserWarning) as warned:
        status, out, err = run_in_process(inference.main, [
            "--input_dir", inputs, "--output_dir", outputs, "--model_path", tiny_checkpoint()],
            capsys)
    assert status == 1  # some inputs could not be translated
    assert "Traceback" not in err
    [gray_error] = error_lines(err)
    assert str(inputs / "gray.png") in gray_error and "single-channel" in gray_error
    [skipped] = [str(w.message) for w in warned]
    assert "notes.txt: not an image file, skipped" in skipped
    assert sorted(p.name for p in outputs.iterdir()) == [
        "palette.png", "plain.png", "rgba.png", "rotated.png"]
    assert Image.open(outputs / "rotated.png").size == (24, 32)  # as displayed
    assert "wrote 4 image(s)" in out and "1 could not be read" in out


# --- Folder contents: skipped with a warning or stopped naming the file ---------------------


def test_non_image_entries_are_skipped_with_a_warning(make_dataset):
    train_dir = make_dataset(layout="paired", splits=(("train", 2),)) / "train"
    (train_dir / "README.txt").write_text("labels from annotator B")
    (train_dir / "Thumbs.db").write_bytes(b"\x00" * 16)
    (train_dir / "extra").mkdir()
    (train_dir / "broken.jpg").symlink_to(train_dir / "nowhere.jpg")
    (train_dir / ".DS_Store").write_bytes(b"\x00")  # hidden: ignored silently
    (train_dir / "._1_input.jpg").write_bytes(b"AppleDouble")  # hidden, though it looks like one
    with pytest.warns(UserWarning, match="skipping 4 non-image entries") as caught:
        pairs, layout, _, _ = find_pairs(train_dir)
    message = str(caught[0].message)
    assert all(name in message for name in ("README.txt", "Thumbs.db", "extra", "broken.jpg"))
    assert ".DS_Store" not in message and len(pairs) == 2 and layout == "paired"


def test_two_files_for_one_role_are_refused_naming_both(make_dataset):
    train_dir = make_dataset(layout="paired", splits=(("train", 2),)) / "train"
    save_image(np.zeros((32, 32, 3), np.uint8), train_dir / "1_input.png")
    with pytest.raises(UserError, match=r"two input files for '1' \(1_input\.(jpg|png) and "
                                        r"1_input\.(png|jpg)\)"):
        find_pairs(train_dir)


def test_a_rotated_photo_against_an_unrotated_label_map_names_the_sizes(tmp_path, rng):
    label = draw_label_map(24, 40, rng)
    save_image(label, tmp_path / "a_input.png")
    exif = Image.Exif()
    exif[0x0112] = 8  # the camera says: show this rotated
    Image.fromarray(draw_photo(label, rng)).save(tmp_path / "a_target.jpg", exif=exif)
    with pytest.raises(UserError, match=r"a_input\.png: size 40x24 differs from its photo "
                                        r"a_target\.jpg \(24x40\)"):
        PairDataset(tmp_path, image_size=32, train=False)[0]


def test_images_smaller_than_the_crop_are_scaled_up(tmp_path, rng):
    folder = tmp_path / "small"
    label = PALETTE[rng.integers(0, len(PALETTE), (10, 12))]
    save_image(label, folder / "a_input.png")
    save_image(draw_photo(label, rng), folder / "a_target.png")
    item = PairDataset(folder, image_size=32, load_size=36)[(0, 0)]
    assert item["source"].shape == item["target"].shape == (3, 32, 32)
    colours = (item["source"].add(1).mul(127.5).round().permute(1, 2, 0).reshape(-1, 3)
               .numpy().astype(np.uint8))
    assert {tuple(c) for c in colours} <= {tuple(c) for c in label.reshape(-1, 3)}  # nearest


def test_a_side_by_side_image_one_pixel_wide_is_refused(tmp_path):
    save_image(np.zeros((8, 1, 3), np.uint8), tmp_path / "1.png")
    with pytest.raises(UserError, match=r"1\.png: too narrow"):
        PairDataset(tmp_path, image_size=32, train=False, layout="side_by_side",
                    label_side="right")[0]


def test_tiny_inputs_translate_at_their_own_size(tmp_path, tiny_checkpoint, rng):
    save_image(PALETTE[rng.integers(0, len(PALETTE), (3, 2))], tmp_path / "in" / "speck.png")
    inference.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"),
                    "--model_path", str(tiny_checkpoint())])
    assert Image.open(tmp_path / "out" / "speck.png").size == (2, 3)


# --- Label maps outside the Cityscapes colours: trained on, reported by --check -------------


def test_off_palette_pixels_uses_a_25_rgb_tolerance():
    label = np.broadcast_to(PALETTE[:, None, :], (len(PALETTE), 4, 3)).copy()
    assert off_palette_pixels(label) == 0
    near = np.clip(label.astype(int) + 10, 0, 255).astype(np.uint8)  # 17 RGB: JPEG-like noise
    assert off_palette_pixels(near) == 0
    far = label.copy()
    far[0] = (255, 255, 255)  # white is nowhere near a Cityscapes colour
    assert off_palette_pixels(far) == 4


def test_check_warns_about_label_maps_in_other_colours(tmp_path, make_dataset, capsys, rng):
    good = make_dataset("good", layout="side_by_side")
    odd = tmp_path / "odd"
    for split, count in (("train", 3), ("val", 1)):
        for k in range(count):  # a label map in a palette of its own (ADE20K-like)
            label = rng.integers(0, 256, (6, 3), dtype=np.uint8)[rng.integers(0, 6, (8, 8))]
            label = np.repeat(np.repeat(label, 4, 0), 4, 1)
            save_image(label, odd / split / f"{k}_input.png")
            save_image(draw_photo(label, rng), odd / split / f"{k}_target.png")

    status, out, _ = run_in_process(dataset.main, ["--check", odd], capsys)
    assert status == 0, out  # a warning, not a problem
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and str(odd / "train") in warnings[0], out
    assert "Cityscapes colour" in warnings[0] and "0 problem(s)" in out
    # Training proceeds on any colours.
    assert PairDataset(odd / "train", image_size=32)[(0, 0)]["source"].shape == (3, 32, 32)

    status, out, _ = run_in_process(dataset.main, ["--check", good], capsys)
    assert status == 0 and "warning:" not in out, out  # JPEG'd Cityscapes colours are fine
    # The photo half taken for the label map: the warning points at --label_side.
    status, out, _ = run_in_process(dataset.main, ["--check", good, "--label_side", "left"],
                                    capsys)
    assert status == 0 and "--label_side" in out and out.count("warning:") == 2, out


# --- Output paths that are files or cannot be created ---------------------------------------


@pytest.mark.parametrize("flag, make_bad", [
    ("--checkpoint_dir", lambda tmp: touch(tmp / "taken")),
    ("--sample_dir", lambda tmp: touch(tmp / "taken") / "samples"),
    ("--log_file", lambda tmp: mkdir(tmp / "log.json")),
    ("--log_file", lambda tmp: touch(tmp / "taken") / "log.json"),
], ids=["checkpoint_dir is a file", "sample_dir under a file", "log_file is a folder",
        "log_file under a file"])
def test_train_refuses_an_output_path_before_training(tmp_path, capsys, flag, make_bad):
    data = write_dataset(tmp_path / "data")
    outputs = {"--checkpoint_dir": tmp_path / "c", "--sample_dir": tmp_path / "s",
               "--log_file": tmp_path / "l" / "log.json", flag: make_bad(tmp_path)}
    status, out, err = run_in_process(train.main, [
        *TINY_RUN, "--data_dir", data, *[str(a) for pair in outputs.items() for a in pair]],
        capsys)
    assert status == 2 and "Traceback" not in err
    [line] = error_lines(err)
    assert str(outputs[flag]).split("/taken")[0] in line and flag.lstrip("-") in line, line
    assert "pairs" not in out  # stopped before reading the data
    assert not (tmp_path / "c" / "latest.pth").exists()


def touch(path):
    path.write_text("")
    return path


def mkdir(path):
    path.mkdir()
    return path


@pytest.mark.parametrize("script", ["inference", "plot_loss"])
def test_an_output_under_a_file_is_refused_naming_it(tmp_path, tiny_checkpoint, capsys,
                                                     script, rng):
    blocked = touch(tmp_path / "taken") / "out"
    if script == "inference":
        save_image(draw_label_map(16, 16, rng), tmp_path / "in" / "a.png")
        main, argv = inference.main, ["--input_dir", tmp_path / "in", "--output_dir", blocked,
                                      "--model_path", tiny_checkpoint()]
    else:
        (tmp_path / "log.json").write_text('{"steps": [{"step": 1, "g_l1": 0.5}]}')
        main, argv = plot_loss.main, ["--log_file", tmp_path / "log.json", "--output",
                                      blocked / "plot.png"]
    status, out, err = run_in_process(main, argv, capsys)
    assert status == 2 and "Traceback" not in err
    [line] = error_lines(err)
    assert str(tmp_path / "taken") in line and "a file is in the way" in line, line
    assert "wrote" not in out


def test_plot_to_a_folder_is_refused(tmp_path, capsys):
    (tmp_path / "log.json").write_text('{"steps": [{"step": 1, "g_l1": 0.5}]}')
    status, _, err = run_in_process(plot_loss.main, [
        "--log_file", tmp_path / "log.json", "--output", mkdir(tmp_path / "plot.png")], capsys)
    assert status == 2 and "is a folder" in err and "Traceback" not in err


# --- A full disk --------------------------------------------------------------------------


class PatchedOs:
    """What utils sees as `os`: the real module with some functions replaced."""

    def __init__(self, **replaced):
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(os, name)


def fill_the_disk_after(monkeypatch, files):
    """The writes of the first `files` files succeed; then every write fails with ENOSPC."""
    opened = []

    def fdopen(fd, mode):
        opened.append(fd)
        file = os.fdopen(fd, mode)
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return file if len(opened) <= files else FailingFile(file, 0, full, lambda: None)

    monkeypatch.setattr(utils, "os", PatchedOs(fdopen=fdopen))


def test_inference_on_a_full_disk_stops_naming_the_file(tmp_path, tiny_checkpoint, capsys,
                                                        monkeypatch, rng):
    for name in ("a", "b", "c"):
        save_image(draw_label_map(16, 16, rng), tmp_path / "in" / f"{name}.png")
    fill_the_disk_after(monkeypatch, files=1)
    status, _, err = run_in_process(inference.main, [
        "--input_dir", tmp_path / "in", "--output_dir", tmp_path / "out", "--batch_size", "1",
        "--model_path", tiny_checkpoint()], capsys)
    assert status == 2 and "Traceback" not in err
    [line] = error_lines(err)
    assert str(tmp_path / "out" / "b.png") in line and "No space left on device" in line, line
    # What was written is whole; nothing half-written, no temporary file.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]
    Image.open(tmp_path / "out" / "a.png").verify()


def test_plot_on_a_full_disk_stops_naming_the_file(tmp_path, capsys, monkeypatch):
    (tmp_path / "log.json").write_text('{"steps": [{"step": 1, "g_l1": 0.5}]}')
    fill_the_disk_after(monkeypatch, files=0)
    status, _, err = run_in_process(plot_loss.main, ["--log_file", tmp_path / "log.json"],
                                    capsys)
    assert status == 2 and "Traceback" not in err
    assert str(tmp_path / "log.png") in err and "No space left on device" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.json"]


def test_ctrl_c_outside_training_exits_130_without_a_traceback(capsys):
    def main(argv):
        raise KeyboardInterrupt

    status, _, err = run_in_process(main, [], capsys)
    assert status == 130 and err.strip() == "interrupted; files written so far are complete"
    assert sys.exc_info() == (None, None, None)


# --- Inference never writes over an input or over another output ---------------------------


def test_inference_refuses_to_write_into_the_input_folder(tmp_path, tiny_checkpoint, capsys,
                                                          rng):
    folder = tmp_path / "maps"
    save_image(draw_label_map(16, 16, rng), folder / "a.png")
    before = (folder / "a.png").read_bytes()
    for output in (folder, tmp_path / "." / "maps"):
        status, _, err = run_in_process(inference.main, [
            "--input_dir", folder, "--output_dir", output, "--model_path", tiny_checkpoint()],
            capsys)
        assert status == 2 and "Traceback" not in err
        assert "--output_dir" in err and "input" in err, err
    assert (folder / "a.png").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["a.png"]


def test_output_names_never_collide(tmp_path, tiny_checkpoint, capsys, rng):
    inputs = tmp_path / "in"
    for name in ("x.jpg", "x.png", "x.jpg.png", "y.png", "Y.png"):
        save_image(draw_label_map(16, 16, rng), inputs / name)
    files = sorted(inputs.iterdir())
    targets = dict(zip((p.name for p in files), inference.output_paths(files, tmp_path / "out")))
    assert len({t.name.casefold() for n, t in targets.items() if n.startswith("x")}) == 3
    assert len(set(targets.values())) == 5 and targets["y.png"].name != targets["Y.png"].name
    status, out, err = run_in_process(inference.main, [
        "--input_dir", inputs, "--output_dir", tmp_path / "out", "--model_path",
        tiny_checkpoint()], capsys)
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert status == 0, err
    assert len(written) == 5 and "wrote 5 image(s)" in out, (written, out)


def test_output_names_that_still_collide_are_refused_before_the_first_image(tmp_path):
    files = [tmp_path / "A.png", tmp_path / "a.png"]
    with pytest.raises(UserError, match=r"A\.png.*a\.png"):
        inference.output_paths(files, tmp_path / "out", case_sensitive=False)


def test_an_unwritable_output_is_one_line_and_the_others_are_written(tmp_path, tiny_checkpoint,
                                                                     capsys, monkeypatch, rng):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    long_name = "n" * 236 + ".png"  # legal (240 bytes); its temporary file's name would not be
    for name in ("a.png", long_name, "b.png"):
        save_image(draw_label_map(16, 16, rng), inputs / name)
    status, out, err = run_in_process(inference.main, [
        "--input_dir", inputs, "--output_dir", outputs, "--batch_size", "1",
        "--model_path", tiny_checkpoint()], capsys)
    assert status == 0 and "Traceback" not in err, err
    assert sorted(p.name for p in outputs.iterdir()) == sorted(["a.png", "b.png", long_name])
    # A read-only output folder (as a non-root user sees it): one line per file, every input
    # tried, exit status 1.
    readonly = tmp_path / "readonly"

    def mkstemp(*args, dir=None, **kwargs):
        if Path(dir) == readonly:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return tempfile.mkstemp(*args, dir=dir, **kwargs)
    monkeypatch.setattr(utils.tempfile, "mkstemp", mkstemp)
    status, out, err = run_in_process(inference.main, [
        "--input_dir", inputs, "--output_dir", readonly, "--batch_size", "1",
        "--model_path", tiny_checkpoint()], capsys)
    assert status == 1 and "Traceback" not in err, err
    lines = error_lines(err)
    assert len(lines) == 3 and all(str(readonly) in line and "Permission denied" in line
                                   for line in lines), lines
    assert "wrote 0 image(s)" in out and "3 could not be written" in out, out


def test_a_too_long_temporary_name_is_shortened(tmp_path):
    path = tmp_path / ("n" * 250 + ".png")
    utils.atomic_write(path, lambda f: f.write(b"x"))
    assert path.read_bytes() == b"x" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# --- File names: non-ASCII digits, line breaks, bytes that are not UTF-8 --------------------

ODD_NAMES = ["1\u00b22", "a\nb", os.fsdecode(b"bad\xff")]


def test_odd_file_names_are_listed_sorted_and_named(tmp_path, tiny_checkpoint, capsys, rng):
    train_dir = write_dataset(tmp_path / "data", splits=(("train", 2),)) / "train"
    for name in ODD_NAMES:
        (train_dir / f"{name}.jpg").write_bytes((train_dir / "1.jpg").read_bytes())
    assert len(find_pairs(train_dir)[0]) == 5  # "²" is a digit to isdigit, not to int()
    inputs = tmp_path / "in"
    for name in ODD_NAMES:
        save_image(draw_label_map(16, 16, rng), inputs / f"{name}.png")
        (inputs / f"{name}_broken.png").write_bytes(b"not an image")
    status, out, err = run_in_process(inference.main, [
        "--input_dir", inputs, "--output_dir", tmp_path / "out", "--model_path",
        tiny_checkpoint()], capsys)
    assert status == 1 and "Traceback" not in err, err
    lines = error_lines(err)
    assert len(lines) == 3 and any("a\\nb_broken.png" in line for line in lines), lines
    assert "wrote 3 image(s)" in out
    assert len(list((tmp_path / "out").iterdir())) == 3


def test_an_error_naming_a_file_with_a_line_break_stays_one_line(capsys):
    def main(argv):
        raise UserError("data/a\nb.jpg: cannot read the photo")
    status, _, err = run_in_process(main, [], capsys)
    assert status == 2 and err == "error: data/a\\nb.jpg: cannot read the photo\n"


# --- evaluate.py --real_stats, plot_loss.py: files of the wrong shape -----------------------


@pytest.mark.parametrize("content", ["empty", "text", "npy", "wrong keys", "text features",
                                     "one row"])
def test_a_foreign_real_stats_file_is_one_line(tmp_path, content):
    import evaluate
    import metrics
    path = tmp_path / "stats.npz"
    names = ["1.png", "2.png"]
    good = dict(names_sha1=evaluate.names_digest(names),
                preprocessing=metrics.INCEPTION_PREPROCESSING)
    if content == "empty":
        path.write_bytes(b"")
    elif content == "text":
        path.write_text("mu sigma")
    elif content == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    elif content == "wrong keys":
        with open(path, "wb") as f:
            np.savez(f, something=np.zeros(3))
    else:
        features = np.array(["a", "b"]) if content == "text features" else np.zeros((1, 8))
        with open(path, "wb") as f:
            np.savez(f, features=features, **good)
    with pytest.raises(UserError, match=re.escape(str(path))) as error:
        evaluate.load_real_stats(path, names)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("steps", [[1, 2], [{"g_l1": 0.5}], [{"step": "one", "g_l1": 0.5}],
                                   [{"step": 1, "g_l1": "high"}], [{"step": 1, "g_l1": None}]],
                         ids=["numbers", "no step", "text step", "text loss", "null loss"])
def test_a_log_of_the_wrong_shape_is_one_line(tmp_path, capsys, steps):
    log = tmp_path / "log.json"
    log.write_text(json.dumps({"steps": steps, "epochs": []}))
    status, _, err = run_in_process(plot_loss.main, ["--log_file", log], capsys)
    assert status == 2 and "Traceback" not in err and str(log) in err, err
    assert "steps[0]" in err and len(err.strip().splitlines()) == 1


def test_log_epochs_of_the_wrong_shape_are_one_line(tmp_path, capsys):
    log = tmp_path / "log.json"
    for epochs in ([3], [{"epoch": 0, "val_l1": "x"}], {"0": 1}):
        log.write_text(json.dumps({"steps": [{"step": 1, "g_l1": 0.5}], "epochs": epochs}))
        status, _, err = run_in_process(plot_loss.main, ["--log_file", log], capsys)
        assert status == 2 and "Traceback" not in err and "epochs" in err, err
