"""Behaviour of the synthetic demo data: scenes, the dataset on disk, the lookup-table baseline."""


import numpy as np
import pytest
from PIL import Image

from cityscapes import COLORS
from demo.data import main, write_demo_dataset
from demo.run import apply_color_lookup, fit_color_lookup, lookup_l1, palette_index
from demo.scenes import CLASS_INDEX, PALETTE, make_scene

MAIN_CLASSES = ["sky", "building", "road", "sidewalk", "vegetation", "car", "person", "pole"]


def scenes(seed, count, size=128):
    rng = np.random.default_rng(seed)
    return [make_scene(rng, size) for _ in range(count)]


@pytest.fixture(scope="module")
def twenty_scenes():
    return scenes(seed=7, count=20)


def class_mask(label, name):
    return (label == COLORS[name]).all(axis=-1)


def near_palette_fraction(image):
    """Share of pixels within 25 (Euclidean RGB) of some palette colour."""
    diff = image[..., None, :].astype(float) - PALETTE.astype(float)  # (H, W, K, 3)
    return float((np.sqrt((diff**2).sum(-1)).min(-1) < 25).mean())


def distinct_colours(image):
    return len(np.unique(image.reshape(-1, 3), axis=0))


# ---------------------------------------------------------------- scenes
@pytest.mark.parametrize("size", [32, 77, 256])
def test_scene_shapes_and_dtypes(size):
    label, photo = make_scene(np.random.default_rng(0), size)
    assert label.shape == photo.shape == (size, size, 3)
    assert label.dtype == photo.dtype == np.uint8


def test_size_below_minimum_is_rejected():
    with pytest.raises(ValueError, match="size"):
        make_scene(np.random.default_rng(0), 16)


def test_label_uses_only_exact_palette_colours(twenty_scenes):
    palette = {tuple(colour) for colour in PALETTE.tolist()}
    for label, _ in twenty_scenes:
        used = {tuple(colour) for colour in np.unique(label.reshape(-1, 3), axis=0).tolist()}
        assert used <= palette


@pytest.mark.parametrize("name", MAIN_CLASSES)
def test_main_classes_appear_in_most_scenes(twenty_scenes, name):
    present = [class_mask(label, name).any() for label, _ in twenty_scenes]
    assert np.mean(present) >= 0.5


def test_sky_is_on_top_and_road_at_the_bottom(twenty_scenes):
    for label, _ in twenty_scenes:
        rows = np.broadcast_to(np.arange(len(label))[:, None], label.shape[:2])
        sky, road = class_mask(label, "sky"), class_mask(label, "road")
        assert road[-1].any()
        if sky.any():
            assert rows[sky].mean() < rows[road].mean()


def test_same_seed_gives_same_scene_and_other_seed_another():
    (label_a, photo_a), (label_b, photo_b) = scenes(3, 1)[0], scenes(3, 1)[0]
    label_c, photo_c = scenes(4, 1)[0]
    assert np.array_equal(label_a, label_b) and np.array_equal(photo_a, photo_b)
    assert not np.array_equal(label_a, label_c) and not np.array_equal(photo_a, photo_c)


@pytest.mark.parametrize("name", ["sky", "building", "road"])
def test_photo_is_not_constant_within_a_class(twenty_scenes, name):
    stds = [photo[class_mask(label, name)].std(axis=0).mean()
            for label, photo in twenty_scenes if class_mask(label, name).sum() > 50]
    assert np.median(stds) > 5


def test_lookup_table_cannot_reproduce_the_photo(twenty_scenes):
    table = fit_color_lookup(twenty_scenes[:15])
    l1 = lookup_l1(table, twenty_scenes[15:])
    assert 0.05 < l1 < 1


# ---------------------------------------------------------------- the dataset on disk
def test_side_by_side_layout_puts_photo_left_and_label_right(tmp_path):
    summary = write_demo_dataset(tmp_path, num_train=3, num_val=2, size=64, seed=1)
    assert summary == {"train": 3, "val": 2, "root": str(tmp_path), "layout": "side_by_side",
                       "size": 64, "profile": "scenes"}
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["1.jpg", "2.jpg", "3.jpg"]
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == ["1.jpg", "2.jpg"]
    pair = np.asarray(Image.open(tmp_path / "train" / "1.jpg").convert("RGB"))
    assert pair.shape == (64, 128, 3)
    photo, label = pair[:, :64], pair[:, 64:]
    assert distinct_colours(photo) > 2 * distinct_colours(label)
    assert near_palette_fraction(label) > 0.9
    assert near_palette_fraction(photo) < 0.7


def test_paired_layout_names_and_contents(tmp_path):
    write_demo_dataset(tmp_path, num_train=2, num_val=1, size=48, layout="paired")
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        "0001_input.jpg", "0001_target.jpg", "0002_input.jpg", "0002_target.jpg"]
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == ["0001_input.jpg",
                                                                    "0001_target.jpg"]
    label = np.asarray(Image.open(tmp_path / "train" / "0001_input.jpg"))
    photo = np.asarray(Image.open(tmp_path / "train" / "0001_target.jpg"))
    assert label.shape == photo.shape == (48, 48, 3)
    assert near_palette_fraction(label) > near_palette_fraction(photo)


def test_dataset_is_deterministic_and_splits_differ(tmp_path):
    for name in ("a", "b"):
        write_demo_dataset(tmp_path / name, num_train=2, num_val=2, size=32, seed=5)
    for split in ("train", "val"):
        for number in (1, 2):
            a = (tmp_path / "a" / split / f"{number}.jpg").read_bytes()
            assert a == (tmp_path / "b" / split / f"{number}.jpg").read_bytes()
    assert (tmp_path / "a/train/1.jpg").read_bytes() != (tmp_path / "a/val/1.jpg").read_bytes()


BAD_ARGUMENTS = [({"num_train": 0}, "num_train"), ({"size": 31}, "size"),
                 ({"layout": "tiles"}, "layout")]


@pytest.mark.parametrize("kwargs, argument", BAD_ARGUMENTS)
def test_invalid_arguments_name_the_argument(tmp_path, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        write_demo_dataset(tmp_path, **{"num_train": 1, "num_val": 1, "size": 32, **kwargs})
    assert not (tmp_path / "train").exists()


def test_cli_writes_and_rejects_bad_flags(tmp_path, capsys):
    main(["--out", str(tmp_path), "--num_train", "2", "--num_val", "1", "--size", "32"])
    assert "2 train + 1 val" in capsys.readouterr().out
    assert len(list((tmp_path / "train").iterdir())) == 2
    with pytest.raises(SystemExit) as error:
        main(["--out", str(tmp_path), "--num_train", "0"])
    assert error.value.code == 2 and "num_train" in capsys.readouterr().err


# ---------------------------------------------------------------- the lookup-table baseline
def two_class_label():
    label = np.empty((4, 4, 3), dtype=np.uint8)
    label[:, :2], label[:, 2:] = COLORS["road"], COLORS["sky"]
    return label


def test_every_palette_colour_is_its_own_nearest():
    assert np.array_equal(palette_index(PALETTE[None]), np.arange(len(PALETTE))[None])


def test_lookup_is_exact_for_constant_class_colours():
    label = two_class_label()
    road = class_mask(label, "road")[..., None]
    photo = np.where(road, [90, 80, 70], [150, 190, 230]).astype(np.uint8)
    table = fit_color_lookup([(label, photo)])
    seen = {k for k in range(len(PALETTE)) if not (table[k] == 128).all()}
    assert seen == {CLASS_INDEX["road"], CLASS_INDEX["sky"]}
    assert lookup_l1(table, [(label, photo)]) == pytest.approx(0.0, abs=1e-12)
    assert np.array_equal(apply_color_lookup(table, label), photo)


def test_lookup_l1_matches_a_hand_computed_value():
    label = two_class_label()
    photo = np.full((4, 4, 3), 100, dtype=np.uint8)
    photo[0::2, :2], photo[1::2, :2] = 10, 30  # road: mean 20, every pixel 10 away from it
    table = fit_color_lookup([(label, photo)])
    np.testing.assert_allclose(table[CLASS_INDEX["road"]], [20, 20, 20])
    # Half the pixels are off by 10 in every channel, the other half exact.
    assert lookup_l1(table, [(label, photo)]) == pytest.approx(0.5 * 10 / 127.5)


def test_lookup_tolerates_jpeg_noise_and_paints_unseen_classes_grey():
    label = two_class_label()
    jitter = np.random.default_rng(0).integers(-12, 13, label.shape)
    noisy = np.clip(label.astype(int) + jitter, 0, 255)
    table = np.full((len(PALETTE), 3), 128.0)
    table[CLASS_INDEX["road"]] = [90, 80, 70]
    painted = apply_color_lookup(table, noisy.astype(np.uint8))
    assert (painted[:, :2] == [90, 80, 70]).all() and (painted[:, 2:] == 128).all()
