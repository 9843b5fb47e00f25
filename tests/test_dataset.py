"""Finding pairs (both layouts), the label half, the paired augmentation, image modes, --check."""

import numpy as np
import pytest
import torch
from conftest import run_scripts, save_image
from PIL import Image

from cityscapes import COLORS
from dataset import PairDataset, find_pairs, load_pair, read_rgb
from utils import UserError

PALETTE = np.array(list(COLORS.values()), np.uint8)


def to_uint8(tensor):
    """A dataset tensor in [-1, 1] back to (H, W, 3) uint8."""
    return (tensor.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
            .permute(1, 2, 0).numpy())


def colours(array):
    return {tuple(c) for c in array.reshape(-1, 3)}


def block_label_map(height, width, rng, block=4):
    """Random palette colours in small blocks: no two crops or mirror images look alike."""
    cells = rng.integers(0, len(PALETTE), (height // block + 1, width // block + 1))
    cells = np.repeat(np.repeat(cells, block, 0), block, 1)[:height, :width]
    return PALETTE[cells]


# --- Layouts --------------------------------------------------------------------------------


def test_side_by_side_layout_is_detected(make_dataset):
    root = make_dataset(layout="side_by_side")
    pairs, layout, side, _ = find_pairs(root / "train")
    assert (layout, side, len(pairs)) == ("side_by_side", "right", 4)
    assert all(p.label == p.photo and p.label_side == "right" for p in pairs)


def test_paired_layout_is_detected_and_matched(make_dataset):
    root = make_dataset(layout="paired", splits=(("train", 11),))
    pairs, layout, side, _ = find_pairs(root / "train")
    assert (layout, side) == ("paired", "")
    # Natural order (2 before 10), each _input with the _target of the same name.
    assert [p.label.name for p in pairs] == [f"{k}_input.jpg" for k in range(1, 12)]
    assert [p.photo.name for p in pairs] == [f"{k}_target.jpg" for k in range(1, 12)]


def test_mixed_layouts_are_refused_naming_a_file(make_dataset):
    root = make_dataset(layout="paired", splits=(("train", 2),))
    save_image(np.zeros((8, 16, 3), np.uint8), root / "train" / "stray.jpg")
    with pytest.raises(UserError, match="stray.jpg"):
        find_pairs(root / "train")


@pytest.mark.parametrize("orphan", ["3_input.png", "3_target.png"])
def test_orphan_is_refused_naming_the_file(make_dataset, orphan):
    root = make_dataset(layout="paired", splits=(("train", 2),))
    save_image(np.zeros((8, 8, 3), np.uint8), root / "train" / orphan)
    with pytest.raises(UserError, match=orphan.replace(".", r"\.")):
        PairDataset(root / "train")


@pytest.mark.parametrize("side", ["right", "left"])
def test_label_half_is_found_on_jpeg_data(make_dataset, side):
    root = make_dataset(layout="side_by_side", label_side=side, splits=(("train", 5),))
    dataset = PairDataset(root / "train", image_size=32, train=False)
    assert dataset.label_side == side
    label, photo = load_pair(dataset.pairs[0])
    full = read_rgb(dataset.pairs[0].label)
    expected = (full[:, :32], full[:, 32:]) if side == "left" else (full[:, 32:], full[:, :32])
    assert np.array_equal(label, expected[0]) and np.array_equal(photo, expected[1])


def test_label_side_can_be_forced(make_dataset):
    root = make_dataset(layout="side_by_side", label_side="right", splits=(("train", 2),))
    forced = PairDataset(root / "train", image_size=32, train=False, label_side="left")
    found = PairDataset(root / "train", image_size=32, train=False)
    assert forced.label_side == "left"
    assert torch.equal(forced[0]["source"], found[0]["target"])
    assert torch.equal(forced[0]["target"], found[0]["source"])


def test_direction_swaps_source_and_target(make_dataset):
    root = make_dataset(layout="paired", splits=(("train", 2),))
    forward = PairDataset(root / "train", image_size=32, train=False)
    backward = PairDataset(root / "train", image_size=32, train=False, direction="photo2label")
    label = to_uint8(forward[1]["source"])
    assert colours(label) <= colours(read_rgb(root / "train" / "2_input.jpg"))
    assert torch.equal(forward[1]["source"], backward[1]["target"])
    assert torch.equal(forward[1]["target"], backward[1]["source"])
    assert not torch.equal(forward[1]["source"], forward[1]["target"])


def test_pair_of_different_sizes_is_refused(tmp_path, rng):
    save_image(block_label_map(32, 32, rng), tmp_path / "a_input.png")
    save_image(block_label_map(32, 40, rng), tmp_path / "a_target.png")
    with pytest.raises(UserError, match=r"a_input\.png: size 32x32 differs .* \(40x32\)"):
        PairDataset(tmp_path, image_size=32, train=False)[0]


def test_load_size_below_crop_is_refused(make_dataset):
    root = make_dataset(layout="paired", splits=(("train", 1),))
    with pytest.raises(UserError, match="--load_size"):
        PairDataset(root / "train", image_size=32, load_size=30)


def test_unknown_choices_are_refused(make_dataset):
    root = make_dataset(layout="paired", splits=(("train", 1),))
    with pytest.raises(UserError, match="--direction"):
        PairDataset(root / "train", direction="sideways")
    with pytest.raises(UserError, match="--layout"):
        find_pairs(root / "train", layout="stacked")


# --- The paired augmentation ----------------------------------------------------------------


@pytest.fixture
def twin_dataset(tmp_path, rng):
    """A paired set whose label map and photo are the same PNG: any misalignment shows."""
    folder = tmp_path / "twins"
    originals = []
    for k in range(3):
        image = block_label_map(40, 40, rng)
        save_image(image, folder / f"{k}_input.png")
        save_image(image, folder / f"{k}_target.png")
        originals.append(image)
    return folder, originals


def locate(crop, original):
    """(top, left, flipped) of a 32x32 crop (maybe mirrored) within the original."""
    size = crop.shape[0]
    for flipped in (False, True):
        source = original[:, ::-1] if flipped else original
        for top in range(original.shape[0] - size + 1):
            for left in range(original.shape[1] - size + 1):
                if np.array_equal(source[top:top + size, left:left + size], crop):
                    # Report the offset in the unflipped image's coordinates.
                    x = original.shape[1] - size - left if flipped else left
                    return top, x, flipped
    raise AssertionError("the crop is not a window of the original")


def test_crop_and_flip_are_the_same_for_both_images(twin_dataset):
    folder, originals = twin_dataset
    # load_size equals the image size, so the first resize is the identity.
    dataset = PairDataset(folder, image_size=32, load_size=40, seed=3)
    draws = set()
    for epoch in range(6):
        for index in range(len(originals)):
            item = dataset[(epoch, index)]
            assert torch.equal(item["source"], item["target"]), (epoch, index)
            draws.add(locate(to_uint8(item["source"]), originals[index]))
    assert len({(top, left) for top, left, _ in draws}) >= 5  # crops at distinct offsets
    assert {flipped for _, _, flipped in draws} == {False, True}


def test_flip_off_never_mirrors(twin_dataset):
    folder, originals = twin_dataset
    dataset = PairDataset(folder, image_size=32, load_size=40, flip=False)
    for epoch in range(6):
        _, _, flipped = locate(to_uint8(dataset[(epoch, 0)]["source"]), originals[0])
        assert not flipped


def test_crop_off_resizes_the_whole_image(twin_dataset):
    folder, _ = twin_dataset
    validation = PairDataset(folder, image_size=32, train=False)
    whole = validation[1]["target"]
    no_crop = PairDataset(folder, image_size=32, load_size=40, crop=False)
    seen = set()
    for epoch in range(8):
        target = no_crop[(epoch, 1)]["target"]
        if torch.equal(target, whole):
            seen.add("plain")
        elif torch.equal(target, whole.flip(-1)):
            seen.add("mirrored")
        else:
            raise AssertionError("crop=False must not crop")
    assert seen == {"plain", "mirrored"}
    neither = PairDataset(folder, image_size=32, load_size=40, crop=False, flip=False)
    assert all(torch.equal(neither[(epoch, 1)]["target"], whole) for epoch in range(4))


@pytest.mark.parametrize("train", [True, False])
def test_label_maps_keep_their_exact_colours(tmp_path, rng, train):
    folder = tmp_path / "odd"
    label = block_label_map(37, 50, rng, block=3)
    save_image(label, folder / "a_input.png")
    save_image(label, folder / "a_target.png")
    dataset = PairDataset(folder, image_size=32, load_size=45, train=train)
    item = dataset[(1, 0)]
    assert item["source"].shape == (3, 32, 32)
    assert colours(to_uint8(item["source"])) <= colours(label)
    # The photo (the same picture) is resized smoothly: blended colours appear.
    assert not colours(to_uint8(item["target"])) <= colours(label)


def test_validation_is_a_deterministic_resize(make_dataset):
    root = make_dataset(layout="side_by_side", size=48)
    dataset = PairDataset(root / "val", image_size=32, train=False, seed=1)
    first = dataset[0]
    for key in (0, (0, 0), (7, 0)):
        item = dataset[key]
        assert torch.equal(item["source"], first["source"])
        assert torch.equal(item["target"], first["target"])
    assert first["source"].shape == first["target"].shape == (3, 32, 32)
    assert first["source"].min() >= -1 and first["source"].max() <= 1
    other_seed = PairDataset(root / "val", image_size=32, train=False, seed=9)
    assert torch.equal(other_seed[0]["target"], first["target"])


def test_draws_depend_on_seed_epoch_and_index_only(make_dataset):
    root = make_dataset(layout="side_by_side", size=32)
    one = PairDataset(root / "train", image_size=32, load_size=40, seed=5)
    two = PairDataset(root / "train", image_size=32, load_size=40, seed=5)
    two.fill_cache()  # cached decoding gives the same items
    two[(0, 2)], two[(4, 1)]  # other items drawn before do not matter
    for key in ((0, 1), (3, 1), (3, 2)):
        assert torch.equal(one[key]["target"], two[key]["target"])
        assert torch.equal(one[key]["source"], two[key]["source"])
    by_epoch = [one[(epoch, 1)]["target"] for epoch in range(4)]
    assert len({t.numpy().tobytes() for t in by_epoch}) >= 3  # a new crop each epoch
    other_seed = PairDataset(root / "train", image_size=32, load_size=40, seed=6)
    assert not all(torch.equal(other_seed[(e, 1)]["target"], by_epoch[e]) for e in range(4))


def test_items_leave_the_global_random_state_alone(make_dataset):
    root = make_dataset(layout="paired", splits=(("train", 2),))
    dataset = PairDataset(root / "train", image_size=32, load_size=36)
    torch.manual_seed(11)
    expected = torch.rand(4)
    torch.manual_seed(11)
    dataset[(2, 1)]
    assert torch.equal(torch.rand(4), expected)


# --- Image modes ----------------------------------------------------------------------------


def test_rgba_drops_alpha(tmp_path, rng):
    rgb = block_label_map(12, 16, rng)
    alpha = rng.integers(0, 256, (12, 16, 1), dtype=np.uint8)
    path = tmp_path / "rgba.png"
    Image.fromarray(np.concatenate([rgb, alpha], axis=2)).save(path)
    assert np.array_equal(read_rgb(path, "label map"), rgb)


@pytest.mark.parametrize("transparency", [False, True])
def test_palette_image_gives_its_colours(tmp_path, rng, transparency):
    indices = rng.integers(0, len(PALETTE), (12, 16)).astype(np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(PALETTE.flatten().tolist())
    path = tmp_path / "palette.png"
    image.save(path, **({"transparency": 0} if transparency else {}))
    assert np.array_equal(read_rgb(path, "label map"), PALETTE[indices])


def test_16_bit_photo_is_scaled_to_8_bits(tmp_path):
    ramp = (np.arange(16 * 32).reshape(16, 32) * 128).astype(np.uint16)  # 0 .. 65408
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    photo = read_rgb(path, "photo")
    assert photo.shape == (16, 32, 3) and photo.dtype == np.uint8
    assert np.array_equal(photo[..., 0], photo[..., 2])
    assert np.abs(photo[..., 0].astype(int) - ramp / 257).max() <= 1


def test_grayscale_label_map_is_refused(make_dataset):
    root = make_dataset(layout="paired", splits=(("train", 2),))
    gray = root / "train" / "2_input.jpg"
    Image.open(gray).convert("L").save(gray)
    dataset = PairDataset(root / "train", image_size=32, train=False)
    with pytest.raises(UserError, match="colour label map") as error:
        dataset[1]
    assert str(gray) in str(error.value)
    Image.open(root / "train" / "1_target.jpg").convert("L").save(root / "train" / "1_target.jpg")
    assert dataset[0]["target"].shape == (3, 32, 32)  # a grayscale photo is fine


def test_exif_rotation_is_applied(tmp_path, rng):
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:10, :20] = (255, 0, 0)  # red top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "turned_target.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    shown = read_rgb(path, "photo")
    assert shown.shape == (40, 20, 3)
    assert shown[5, 15, 0] > 200 and shown[5, 5, 0] < 60  # red now top-right
    # Its label map is drawn the displayed way up, so the pair loads.
    save_image(block_label_map(40, 20, rng), tmp_path / "turned_input.png")
    label, photo = load_pair(find_pairs(tmp_path)[0][0])
    assert label.shape == photo.shape == (40, 20, 3)


# --- python dataset.py --check --------------------------------------------------------------


def test_check_command(make_dataset):
    good = make_dataset("good", layout="side_by_side")
    bad = make_dataset("bad", layout="side_by_side")
    corrupt, truncated = bad / "train" / "2.jpg", bad / "val" / "1.jpg"
    corrupt.write_bytes(b"not a jpeg at all")
    truncated.write_bytes(truncated.read_bytes()[:200])
    results = run_scripts({"good": ("dataset.py", "--check", good),
                           "bad": ("dataset.py", "--check", bad)})

    ok = results["good"]
    assert ok.returncode == 0, ok.stderr
    for text in (f"{good / 'train'}: 4 pairs, layout side_by_side", "label map: right half (",
                 f"{good / 'val'}: 2 pairs", "32x32 (4)", "32x32 (2)", "0 problem(s)"):
        assert text in ok.stdout, ok.stdout

    failed = results["bad"]
    assert failed.returncode != 0
    assert "Traceback" not in failed.stderr, failed.stderr
    assert str(corrupt) in failed.stdout and str(truncated) in failed.stdout, failed.stdout
    assert "2 problem(s)" in failed.stdout
    # The readable files are still counted.
    assert f"{bad / 'train'}: 4 pairs" in failed.stdout and "32x32 (3)" in failed.stdout


def test_augmentation_seeds_only_its_own_cpu_generator(make_dataset, monkeypatch):
    """Seeding a sample's crop and flip must leave the CUDA generators (dropout masks on a GPU)
    alone: torch.manual_seed would reseed them and not restore them."""
    calls = []  # a spy: a CPU-only machine has no CUDA generator to look at
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(seed))
    dataset = PairDataset(make_dataset() / "train", image_size=32, load_size=36, seed=3)
    before = torch.random.get_rng_state()
    first = dataset[(0, 1)]["source"]
    assert calls == [] and torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(dataset[(0, 1)]["source"], first)  # still reproducible
