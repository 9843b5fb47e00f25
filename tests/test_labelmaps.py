"""The label half and label maps on data with the real public set's profile.

Every fixture here is made by demo.data.real_profile_pair at 256x256 and saved as the public set
was (JPEG quality 95, 4:2:0), so the label halves ring and have blended borders and the photos
are dark and grey: the opposite of what our clean scenes look like, and what broke the
distinct-colour rule on the real set.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
import inference
import train
from cityscapes import COLORS, LABEL_IDS, LABELS, NUM_TRAIN_IDS
from config import merge_for_resume
from conftest import CAMVID, REPO, run_in_process, tiny_config
from dataset import PairDataset, find_pairs, read_rgb
from demo.data import real_profile_pair, save_real_profile_jpeg
from labelmaps import (colorize_ids, decide_half, detect_label_side, distinct_colors,
                       in_cityscapes_colours, profile)
from utils import UserError

# ../shared/CITYSCAPES.md, measured on 100 files of the real set: (photo range, label range).
REAL_RANGES = {"distinct_colors": ((80, 296), (410, 1364)),
               "palette_share": ((0.13, 0.56), (0.81, 0.94)),
               "smooth_pairs": ((0.63, 0.86), (0.69, 0.91)),
               "saturation": ((0.12, 0.29), (0.27, 0.65)),
               "intensity": ((51, 96), (70, 108))}
# The hard ends of the ranges: the darkest, greyest photos; the busiest label maps.
KINDS = {"typical": {}, "dark": {"darkness": 1.0}, "busy": {"busy": 14.0}}


def real_pair_file(path, seed, label_side="right", **options):
    """One side-by-side file like the public set's; returns the decoded (label, photo)."""
    label, photo = real_profile_pair(np.random.default_rng(seed), 256, **options)
    halves = (photo, label) if label_side == "right" else (label, photo)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_real_profile_jpeg(np.concatenate(halves, axis=1), path)
    left, right = np.split(np.asarray(Image.open(path).convert("RGB")), 2, axis=1)
    return (right, left) if label_side == "right" else (left, right)


@pytest.fixture(scope="module")
def real_sets(tmp_path_factory):
    """{kind: folder of 6 side-by-side files, label right} for each of KINDS."""
    root = tmp_path_factory.mktemp("real")
    for number, (kind, options) in enumerate(KINDS.items()):
        for k in range(6):
            real_pair_file(root / kind / f"{k + 1}.jpg", seed=100 * number + k, **options)
    return root


def halves(folder):
    for path in sorted(Path(folder).iterdir()):
        yield np.split(np.asarray(Image.open(path).convert("RGB")), 2, axis=1)  # photo, label


# --- The synthetic data has the real profile ------------------------------------------------

@pytest.mark.parametrize("kind", list(KINDS))
def test_real_profile_lands_in_the_real_ranges(real_sets, kind):
    """Every typical file inside the real set's range of every statistic, both halves; the hard
    ends sit at the edges of the ranges, so their medians must be inside."""
    stats = [(profile(photo), profile(label)) for photo, label in halves(real_sets / kind)]
    for name, ranges in REAL_RANGES.items():
        for which in (0, 1):
            low, high = ranges[which]
            values = [s[which][name] for s in stats]
            checked = values if kind == "typical" else [np.median(values)]
            assert all(low <= v <= high for v in checked), (kind, ("photo", "label")[which],
                                                            name, values)


def test_hard_ends_are_harder(real_sets):
    def median(kind, which, name):
        return np.median([profile(h[which])[name] for h in halves(real_sets / kind)])
    assert median("dark", 0, "intensity") < median("typical", 0, "intensity") - 10
    assert median("dark", 0, "saturation") < median("typical", 0, "saturation")
    assert median("busy", 1, "palette_share") < median("typical", 1, "palette_share")
    assert median("busy", 1, "distinct_colors") > median("typical", 1, "distinct_colors")


def test_the_ranges_are_the_shared_table():
    table = REPO.parent / "shared" / "CITYSCAPES.md"
    if not table.is_file():
        pytest.skip("../shared/CITYSCAPES.md is not beside this checkout")
    text = table.read_text()
    for (photo_low, photo_high), (label_low, label_high) in REAL_RANGES.values():
        for low, high in ((photo_low, photo_high), (label_low, label_high)):
            assert f"[{low:g}–{high:g}]" in text, (low, high)


# --- The label-half detector ----------------------------------------------------------------

def distinct_colour_vote(array):
    """The rule this project used before: the half with fewer distinct colours is the label."""
    left, right = np.split(array, 2, axis=1)
    return "left" if distinct_colors(left) < distinct_colors(right) else "right"


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("side", ["right", "left"])
def test_each_file_decides_the_label_half(real_sets, kind, side):
    for photo, label in halves(real_sets / kind):
        array = np.concatenate([photo, label] if side == "right" else [label, photo], axis=1)
        evidence = decide_half(array)
        assert (evidence.side, evidence.cue) == (side, "palette"), evidence
        # The old rule picks the photo on data like this: the test above would have caught it.
        assert distinct_colour_vote(array) != side


@pytest.mark.parametrize("side", ["right", "left"])
def test_training_and_check_report_the_decided_half(tmp_path, capsys, side):
    for k in range(4):
        real_pair_file(tmp_path / "data" / "train" / f"{k + 1}.jpg", seed=50 + k, label_side=side)
        real_pair_file(tmp_path / "data" / "val" / f"{k + 1}.jpg", seed=60 + k, label_side=side)
    pairs, layout, found, evidence = find_pairs(tmp_path / "data" / "train")
    assert (layout, found) == ("side_by_side", side)
    assert evidence.startswith(f"label map: {side} half (")
    assert "on the Cityscapes palette" in evidence and "4 of 4 sampled files agree" in evidence
    status, out, _ = run_in_process(dataset.main, ["--check", tmp_path / "data"], capsys)
    assert status == 0 and out.count(f"label map: {side} half (") == 2, out
    assert "warning" not in out, out  # real label maps are ~11 % off the palette: no warning
    # The photo half forced as the label map: now the off-palette warning speaks.
    other = "left" if side == "right" else "right"
    status, out, _ = run_in_process(dataset.main, ["--check", tmp_path / "data", "--label_side",
                                                   other], capsys)
    assert status == 0 and out.count("warning:") == 2 and "--label_side" in out, out
    # The decided half is saved in the checkpoint, so a resume cannot flip it.
    config = tiny_config(tmp_path / "run", tmp_path / "data", image_size=32, max_steps=1,
                         epochs=1)
    train.train(config)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "latest.pth", weights_only=False)
    assert (saved["config"]["layout"], saved["config"]["label_side"]) == ("side_by_side", side)
    assert f"label map: {side} half (" in capsys.readouterr().out
    # Resuming with the first command's `auto` keeps the saved half; another half is refused.
    assert merge_for_resume(saved["config"], {"label_side": "auto"}).label_side == side
    with pytest.raises(UserError, match="cannot change --label_side"):
        merge_for_resume(saved["config"], {"label_side": other})


@pytest.mark.parametrize("side", ["right", "left"])
def test_label_maps_in_other_colours_decide_by_flatness(tmp_path, side):
    """A palette that is not Cityscapes' (inverted, channels turned): flatness decides."""
    (tmp_path / "data").mkdir()
    for k in range(6):
        label, photo = real_profile_pair(np.random.default_rng(80 + k), 256)
        recoloured = 255 - label[..., [2, 0, 1]]
        halves = [photo, recoloured] if side == "right" else [recoloured, photo]
        save_real_profile_jpeg(np.concatenate(halves, axis=1), tmp_path / "data" / f"{k}.jpg")
    for path in sorted((tmp_path / "data").iterdir()):
        evidence = decide_half(read_rgb(path))
        assert max(evidence.palette) < 0.6 and (evidence.side, evidence.cue) == (side, "flat")
    found = detect_label_side(sorted((tmp_path / "data").iterdir()), read_rgb)
    assert found.side == side and "flat 3x3 neighbourhoods" in str(found)


@pytest.mark.parametrize("sky_rows, expected", [(60, "right"), (100, None), (256, None)])
def test_a_flat_photo_never_passes_for_the_label_map(tmp_path, sky_rows, expected):
    """Photos unlike our assumption of texture everywhere: a blown-out white sky over the top
    `sky_rows` rows, next to a label map in other colours. The flat cue must then pick the label
    map or, once the photo is nearly as flat as a label map, refuse: never pick the photo."""
    for k in range(4):
        label, photo = real_profile_pair(np.random.default_rng(90 + k), 256)
        photo = photo.copy()
        photo[:sky_rows] = 255
        path = tmp_path / f"{k}.jpg"
        save_real_profile_jpeg(np.concatenate([photo, 255 - label[..., [2, 0, 1]]], axis=1), path)
        assert decide_half(read_rgb(path)).side == expected


def test_no_clear_half_asks_for_label_side(tmp_path):
    # Two photos side by side: neither half is a label map.
    for k in range(4):
        _, photo = real_profile_pair(np.random.default_rng(k), 256)
        _, other = real_profile_pair(np.random.default_rng(k + 10), 256)
        (tmp_path / "photos" / "train").mkdir(parents=True, exist_ok=True)
        save_real_profile_jpeg(np.concatenate([photo, other], axis=1),
                               tmp_path / "photos" / "train" / f"{k}.jpg")
    # Files that disagree: half of them have the label map on the left.
    for k in range(4):
        real_pair_file(tmp_path / "mixed" / "train" / f"{k}.jpg", seed=k,
                       label_side=("left", "right")[k % 2])
    for name in ("photos", "mixed"):
        with pytest.raises(UserError, match=r"cannot tell which half .*--label_side left\|right"):
            find_pairs(tmp_path / name / "train")
        forced = find_pairs(tmp_path / name / "train", label_side="left")
        assert forced[2] == "left" and "--label_side" in forced[3]


# --- Inference on real-profile inputs -------------------------------------------------------

@pytest.mark.parametrize("side", ["right", "left"])
def test_inference_takes_real_label_maps_and_real_pairs(tmp_path, tiny_checkpoint, capsys, side):
    label, _ = real_pair_file(tmp_path / "pair" / "1.jpg", seed=7, label_side=side)
    plain = tmp_path / "plain"
    plain.mkdir()
    save_real_profile_jpeg(label, plain / "a.jpg")  # a label map with the JPEG ringing
    Image.fromarray(label).save(plain / "b.png")
    wide = np.concatenate([label, label[:, ::-1]], axis=1)  # a 512x256 label map, not a pair
    Image.fromarray(wide).save(plain / "c.png")
    model = tiny_checkpoint()
    status, out, err = run_in_process(inference.main, ["--input_dir", plain, "--output_dir",
                                                       tmp_path / "out1", "--model_path", model],
                                      capsys)
    assert status == 0 and "side-by-side" not in out, out + err
    assert Image.open(tmp_path / "out1" / "c.png").size == (512, 256)
    status, out, err = run_in_process(inference.main, ["--input_dir", tmp_path / "pair",
                                                       "--output_dir", tmp_path / "out2",
                                                       "--model_path", model,
                                                       "--precision", "fp32"], capsys)
    assert status == 0 and f"1 side-by-side pair(s), label map: {side} half (" in out, out + err
    generator, config = inference.load_generator(model)
    alone = inference.Translator(generator, config, "cpu").translate([label])[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out2" / "1.png")), alone)


def test_inference_refuses_a_folder_of_pairs_and_plain_label_maps(tmp_path, tiny_checkpoint,
                                                                   capsys):
    label, _ = real_pair_file(tmp_path / "in" / "pair.jpg", seed=8)
    save_real_profile_jpeg(label, tmp_path / "in" / "plain.jpg")
    status, _, err = run_in_process(inference.main, ["--input_dir", tmp_path / "in",
                                                     "--output_dir", tmp_path / "out",
                                                     "--model_path", tiny_checkpoint()], capsys)
    assert status != 0 and "cannot tell which half" in err and "--input_layout labels" in err
    assert "Traceback" not in err


def test_inference_in_a_paired_folder_translates_every_label_map(tmp_path, tiny_checkpoint,
                                                                  capsys):
    folder = tmp_path / "in"
    label, photo = real_profile_pair(np.random.default_rng(3), 64)
    for name, array in (("a_input.jpg", label), ("a_target.jpg", photo), ("odd.png", label)):
        folder.mkdir(exist_ok=True)
        Image.fromarray(array).save(folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    status, out, err = run_in_process(inference.main, ["--input_dir", folder, "--output_dir",
                                                       tmp_path / "out", "--model_path",
                                                       tiny_checkpoint()], capsys)
    assert status == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_input.png", "odd.png"]
    assert f"skipped {folder / 'a_target.jpg'}: a NAME_target photo" in out
    assert f"{folder / 'broken.png'}: cannot read" in err


# --- Single-channel id maps -----------------------------------------------------------------

def id_maps(rng, size=64):
    """(colour label map, its labelIds map, its trainIds map), drawn from a real-profile scene
    snapped to exact palette colours."""
    label, _ = real_profile_pair(rng, size)
    index = np.argmin(((label[..., None, :].astype(int) - np.array(
        [c for _, _, c in LABELS])) ** 2).sum(-1), axis=-1)
    colour = np.array([c for _, _, c in LABELS], np.uint8)[index]
    label_ids = np.array([LABEL_IDS[n][-1] for n, _, _ in LABELS], np.uint8)[index]
    train_ids = np.array([t for _, t, _ in LABELS], np.uint8)[index]
    return colour, label_ids, train_ids


def test_id_maps_are_coloured_with_the_cityscapes_table(tmp_path):
    colour, label_ids, train_ids = id_maps(np.random.default_rng(0))
    Image.fromarray(label_ids).save(tmp_path / "ids.png")
    Image.fromarray(train_ids).save(tmp_path / "train_ids.png")
    assert np.array_equal(read_rgb(tmp_path / "ids.png", "label map"), colour)
    # trainIds lose the void classes (255): they turn black, as "unlabeled".
    void = train_ids == 255
    from_train = read_rgb(tmp_path / "train_ids.png", "label map", "train_ids")
    assert np.array_equal(from_train[~void], colour[~void]) and (from_train[void] == 0).all()
    assert colorize_ids(np.array([[7, 26]], np.uint8), "x", "label_ids").tolist() == \
        [[list(COLORS["road"]), list(COLORS["car"])]]


def test_id_maps_that_fit_no_table_or_both_are_refused(tmp_path):
    Image.fromarray(np.full((8, 8), 40, np.uint8)).save(tmp_path / "bad.png")
    with pytest.raises(UserError, match=r"bad.png: .*single-channel.*values 40"):
        read_rgb(tmp_path / "bad.png", "label map")
    Image.fromarray(np.array([[0, 7, 13]] * 3, np.uint8)).save(tmp_path / "both.png")
    with pytest.raises(UserError, match=r"both.png: .*--label_format"):
        read_rgb(tmp_path / "both.png", "label map")
    assert read_rgb(tmp_path / "both.png", "label map", "train_ids")[0, 1].tolist() == \
        list(COLORS["traffic sign"])  # train id 7
    with pytest.raises(UserError, match=r"both.png: .*--label_format color"):
        read_rgb(tmp_path / "both.png", "label map", "color")


def test_training_on_id_maps_sees_the_colour_maps(tmp_path):
    colour, label_ids, _ = id_maps(np.random.default_rng(1), size=32)
    _, photo = real_profile_pair(np.random.default_rng(1), 32)
    for folder, label in (("colour", colour), ("ids", label_ids)):
        (tmp_path / folder).mkdir()
        Image.fromarray(label).save(tmp_path / folder / "a_input.png")
        Image.fromarray(photo).save(tmp_path / folder / "a_target.png")
    items = [PairDataset(tmp_path / f, image_size=32, train=False)[0] for f in ("colour", "ids")]
    assert torch.equal(items[0]["source"], items[1]["source"])
    # --label_format reaches the reading, in the dataset and in --check.
    forced = PairDataset(tmp_path / "ids", image_size=32, train=False, label_format="label_ids")
    assert torch.equal(forced[0]["source"], items[0]["source"])
    report, problems = dataset.check_split(tmp_path / "ids", label_format="train_ids")
    assert problems and "--label_format train_ids" in problems[0] and "a_input.png" in problems[0]


def test_inference_translates_id_maps_as_their_colour_maps(tmp_path, tiny_checkpoint, capsys):
    colour, label_ids, _ = id_maps(np.random.default_rng(2))
    for folder, label in (("colour", colour), ("ids", label_ids)):
        (tmp_path / folder).mkdir()
        Image.fromarray(label).save(tmp_path / folder / "x.png")
        status, _, err = run_in_process(inference.main, [
            "--input_dir", tmp_path / folder, "--output_dir", tmp_path / f"out_{folder}",
            "--model_path", tiny_checkpoint()], capsys)
        assert status == 0, err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out_colour" / "x.png")),
                          np.asarray(Image.open(tmp_path / "out_ids" / "x.png")))


# --- Which adversarial loss `--gan_loss auto` picks -----------------------------------------

@pytest.mark.parametrize("kind", list(KINDS))
def test_real_profile_label_maps_count_as_cityscapes_colours(real_sets, kind):
    """The JPEG label halves of the real set's profile (ringing, blended borders, the busiest
    too) are in the Cityscapes colours; their photo halves, the darkest too, are not."""
    photos, labels = zip(*halves(real_sets / kind))
    assert in_cityscapes_colours(labels)
    assert not in_cityscapes_colours(photos)


def test_label_maps_in_other_colours_do_not_count():
    labels = [255 - real_profile_pair(np.random.default_rng(k), 256)[0][..., [2, 0, 1]]
              for k in range(4)]
    assert not in_cityscapes_colours(labels)
    assert not in_cityscapes_colours([])


@pytest.mark.skipif(not (CAMVID / "train").is_dir(), reason="needs ../shared/camvid")
def test_real_camvid_label_maps_count_as_cityscapes_colours():
    """Real street photos with hand-made labels drawn in the Cityscapes palette, JPEG."""
    files = sorted((CAMVID / "train").glob("*.jpg"))[::23][:16]
    pairs = [np.split(np.asarray(Image.open(f).convert("RGB")), 2, axis=1) for f in files]
    assert in_cityscapes_colours([label for photo, label in pairs])
    assert not in_cityscapes_colours([photo for photo, label in pairs])


def write_real_profile_set(folder, recoloured):
    """4 train and 1 val side-by-side JPEGs of the real set's profile, photo left; `recoloured`
    draws the label maps in colours of their own instead of the Cityscapes palette."""
    for split, count in (("train", 4), ("val", 1)):
        (folder / split).mkdir(parents=True)
        for k in range(count):
            label, photo = real_profile_pair(np.random.default_rng([k, count]), 64)
            if recoloured:
                label = 255 - label[..., [2, 0, 1]]
            save_real_profile_jpeg(np.concatenate([photo, label], axis=1),
                                   folder / split / f"{k}.jpg")


@pytest.mark.parametrize("recoloured, flags, expected", [
    (False, {}, "oasis"), (True, {}, "hinge"), (False, {"gan_loss": "hinge"}, "hinge"),
    (False, {"direction": "photo2label"}, "hinge")])
def test_training_decides_the_adversarial_loss_on_the_label_maps(tmp_path, capsys, recoloured,
                                                                flags, expected):
    """`auto` trains OASIS's segmenting discriminator on Cityscapes-coloured label maps and
    hinge on label maps in colours of their own (or photo -> label); the decision is saved with
    the run, and an explicit --gan_loss is kept."""
    write_real_profile_set(tmp_path / "data", recoloured)
    config = tiny_config(tmp_path / "run", tmp_path / "data", image_size=32, max_steps=1,
                         epochs=1, label_side="right", **flags)
    train.train(config)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "latest.pth", weights_only=False)
    assert saved["config"]["gan_loss"] == expected
    head = saved["discriminator"]["layers.head.weight"]
    assert head.shape[0] == (NUM_TRAIN_IDS + 1 if expected == "oasis" else 1)
    assert (f"adversarial loss: {expected}" in capsys.readouterr().out) == ("gan_loss" not in flags)
    # The first command repeated with --resume keeps the decided loss; another is refused.
    assert merge_for_resume(saved["config"], {"gan_loss": "auto"}).gan_loss == expected
    other = "bce"
    with pytest.raises(UserError, match="cannot change --gan_loss"):
        merge_for_resume(saved["config"], {"gan_loss": other})


def test_labelmix_is_refused_where_auto_chooses_hinge(tmp_path):
    """LabelMix needs OASIS's discriminator: label maps in colours of their own make `auto`
    choose hinge, and the run stops in one line before it trains or saves anything."""
    write_real_profile_set(tmp_path / "data", recoloured=True)
    config = tiny_config(tmp_path / "run", tmp_path / "data", image_size=32, max_steps=1,
                         epochs=1, label_side="right", labelmix=10.0)
    with pytest.raises(UserError, match="--labelmix needs OASIS.*trains hinge"):
        train.train(config)
    assert not (tmp_path / "run" / "checkpoints" / "latest.pth").exists()
