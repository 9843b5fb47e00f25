"""The synthetic demo dataset on disk: clean scenes, or scenes with the real set's profile.

    python -m demo.data --out ./dataset --num_train 200 --num_val 20 --size 256
    python -m demo.data --out ./rp --num_train 16 --profile real

Scenes come from demo/scenes.py.
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

import dataset
from demo.scenes import MIN_SIZE, make_scene

LAYOUTS = tuple(layout for layout in dataset.LAYOUTS if layout != "auto")
PROFILES = ("scenes", "real")


# ---------------------------------------------------------------- public: the dataset on disk
def _check_dataset_args(num_train, num_val, size, seed, layout, quality, profile):
    for name, value, ok, rule in (("num_train", num_train, num_train >= 1, "at least 1"),
                                  ("num_val", num_val, num_val >= 1, "at least 1"),
                                  ("size", size, size >= MIN_SIZE, f"at least {MIN_SIZE}"),
                                  ("seed", seed, seed >= 0, "non-negative"),
                                  ("layout", layout, layout in LAYOUTS, f"one of {list(LAYOUTS)}"),
                                  ("quality", quality, 1 <= quality <= 100, "in 1..100"),
                                  ("profile", profile, profile in PROFILES,
                                   f"one of {list(PROFILES)}")):
        if not ok:
            raise ValueError(f"{name} must be {rule}, got {value!r}")


def _save_jpeg(array, path, quality):
    # 4:4:4 chroma keeps the label colours' edges crisp; the default 4:2:0 smears them.
    Image.fromarray(array).save(path, quality=quality, subsampling=0)


def real_profile_pair(rng, size=256, busy=6.0, darkness=None, oversample=None):
    """(label, photo) uint8 arrays with the profile of the real public set, before its JPEG.

    As the public set was made: the label map is drawn `oversample` times larger in exact
    colours and downscaled with Pillow's default (smoothing) filter, so its borders blend; the
    photo is dark, grey and low in contrast, like overcast German streets, with the car's
    bonnet at the bottom (black "ego vehicle" in the label map). `busy` scales the number of
    objects; `darkness` in 0..1 (random if None) goes from the set's brightest photos to its
    darkest and greyest. `../shared/CITYSCAPES.md` has the statistics this aims at; tests
    check that it lands inside their ranges (at 256, the real size). `oversample` defaults to 4,
    less below 128 pixels, where blending would leave a tiny map few pixels of any one colour.
    """
    oversample = oversample or (4 if size >= 128 else 2 if size >= 64 else 1)
    big = size * oversample
    label, photo = make_scene(rng, big, busy=busy)
    darkness = rng.uniform(0.1, 0.9) if darkness is None else darkness
    x = (np.arange(big) + 0.5) / big
    height = rng.uniform(0.06, 0.14)
    rows = np.arange(big)[:, None] / big
    bonnet = rows > 1 - height + 0.6 * height * (2 * x[None] - 1) ** 2
    label[bonnet] = 0
    shine = 40 + 50 * np.exp(-((rows - (1 - height)) / 0.03) ** 2)  # a reflection on the paint
    photo = np.where(bonnet[..., None], np.broadcast_to(shine, bonnet.shape)[..., None], photo)
    label = np.asarray(Image.fromarray(label).resize((size, size), Image.BICUBIC))
    photo = np.asarray(Image.fromarray(photo.astype(np.uint8)).resize((size, size),
                                                                     Image.BICUBIC), np.float32)
    grey = photo @ np.array([0.299, 0.587, 0.114], np.float32)
    photo = grey[..., None] + (0.95 - 0.4 * darkness) * (photo - grey[..., None])
    photo = (95 - 42 * darkness) + (0.6 - 0.2 * darkness) * (photo - photo.mean())
    grain = rng.standard_normal(photo.shape, dtype=np.float32) * 0.7  # per channel
    shade = rng.standard_normal(photo.shape[:2], dtype=np.float32)[..., None]  # grey
    photo = photo + grain + shade * (2.2 + darkness)
    return label, np.clip(np.rint(photo), 0, 255).astype(np.uint8)


def save_real_profile_jpeg(array, path):
    """JPEG as in the public set: quality 95 (its luma table starts 2 1 1 2 2 4 5 6) and 4:2:0
    chroma subsampling; 4:4:4 below 64 pixels, where one 16-pixel chroma block would smear a
    quarter of the image."""
    subsampling = 2 if min(array.shape[:2]) >= 64 else 0
    Image.fromarray(array).save(path, format="JPEG", quality=95, subsampling=subsampling)


def write_demo_dataset(root, num_train=200, num_val=20, size=256, seed=0,
                       layout="side_by_side", quality=95, profile="scenes") -> dict:
    """Write root/train and root/val as JPEGs; the same arguments always give the same bytes.

    profile "scenes": our scenes as drawn, saved at `quality` with 4:4:4 chroma. "real": with
    the real public set's profile (real_profile_pair, save_real_profile_jpeg; `quality` unused).

    "side_by_side" (the public Cityscapes pix2pix format): `1.jpg`, `2.jpg`, ... each
    (size, 2 * size) with the photo on the left and the label on the right.
    "paired": `0001_input.jpg` (label) and `0001_target.jpg` (photo).
    Existing files are overwritten, never deleted.
    """
    _check_dataset_args(num_train, num_val, size, seed, layout, quality, profile)
    if profile == "real":
        make, save = real_profile_pair, save_real_profile_jpeg
    else:
        make, save = make_scene, lambda a, p: _save_jpeg(a, p, quality)
    root = Path(root)
    for split_index, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        rng = np.random.default_rng([seed, split_index])  # train and val never share a scene
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        for number in range(1, count + 1):
            label, photo = make(rng, size)
            if layout == "side_by_side":
                pair = np.concatenate([photo, label], axis=1)  # photo left, label right
                save(pair, folder / f"{number}.jpg")
            else:
                save(label, folder / f"{number:04d}_input.jpg")
                save(photo, folder / f"{number:04d}_target.jpg")
    return {"train": num_train, "val": num_val, "root": str(root), "layout": layout, "size": size,
            "profile": profile}


# ---------------------------------------------------------------- CLI
def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the synthetic street-scene demo dataset.")
    parser.add_argument("--out", default="./dataset", help="folder to write train/ and val/ into")
    parser.add_argument("--num_train", type=int, default=200)
    parser.add_argument("--num_val", type=int, default=20)
    parser.add_argument("--size", type=int, default=256, help="side of each square image, pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", default="side_by_side", choices=LAYOUTS)
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality, 1..100")
    parser.add_argument("--profile", default="scenes", choices=PROFILES,
                        help="real: dark grey photos, blended and JPEG-ringing label maps, as "
                             "measured on the real public set")
    args = parser.parse_args(argv)
    try:
        summary = write_demo_dataset(args.out, args.num_train, args.num_val, args.size,
                                     args.seed, args.layout, args.quality, args.profile)
    except ValueError as error:
        parser.error(str(error))  # one line and exit status 2, no traceback
    print(f"wrote {summary['train']} train + {summary['val']} val {summary['layout']} pairs "
          f"of {summary['size']}px to {summary['root']}")


if __name__ == "__main__":
    main()
