"""A frozen segmenter of real photos as an extra loss for the generator (`--segmenter_loss`;
the semantic consistency of CyCADA, Hoffman et al., ICML 2018): a small segmentation network is
trained on the training photos and their label maps, then frozen, and G is asked that it sees in
G's photos what the label maps say (losses.segmenter_loss).

    python segmentation.py --data_dir ./dataset --output ./checkpoints/segmenter.pth
    python train.py --data_dir ./dataset --segmenter_loss 1 --segmenter ./checkpoints/segmenter.pth

Its network (dilated context blocks at 1/8 resolution, after Yu & Koltun, ICLR 2016) is not the
quality benchmark's judge (benchmark/segmenter.py, an encoder-decoder with a skip), and on real
photos the benchmark trains the two on different video sequences: G never trains against its
own judge. Label maps must be drawn in the Cityscapes colours (their classes are read off them).
"""

import argparse
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import save_checkpoint
from cityscapes import NUM_TRAIN_IDS
from dataset import PairDataset
from labelmaps import SAMPLE_FILES, in_cityscapes_colours
from losses import IGNORED_CLASS, layout_classes
from utils import UserError, run_cli, to_uint8, to_unit_range

SEGMENTER_FORMAT = "pix2pix-layout-segmenter"


def _block(c_in, c_out, stride=1, dilation=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, padding=dilation, dilation=dilation,
                                   bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ContextSegmenter(nn.Module):
    """(B, 3, H, W) photos in [-1, 1] -> (B, 19, H, W) Cityscapes train-ID logits: three
    stride-2 levels to 1/8, three residual blocks dilated 2, 4 and 8 for context, a 1x1 head,
    bilinear upsampling to the photo's size."""

    def __init__(self, width=32, num_classes=NUM_TRAIN_IDS):
        super().__init__()
        self.width = width
        self.encoder = nn.Sequential(_block(3, width, 2), _block(width, 2 * width, 2),
                                     _block(2 * width, 4 * width, 2))
        self.context = nn.ModuleList(_block(4 * width, 4 * width, dilation=d) for d in (2, 4, 8))
        self.head = nn.Conv2d(4 * width, num_classes, 1)

    def forward(self, photo):
        features = self.encoder(photo)
        for block in self.context:
            features = features + block(features)
        return F.interpolate(self.head(features), size=photo.shape[-2:], mode="bilinear",
                             align_corners=False)


def fit_segmenter(build, photos, targets, steps=400, batch_size=8, seed=0, lr=2e-3,
                  ignore_index=IGNORED_CLASS):
    """The network `build()` makes, fitted to (N, 3, H, W) photos (in [-1, 1], or uint8) and
    their (N, H, W) class targets: Adam with a one-cycle schedule, random left-right flips
    (streets are left-right symmetric). Returned in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    network = build()
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    network.train()
    for _ in range(steps):
        index = torch.randint(len(photos), (batch_size,), generator=generator)
        x, y = photos[index], targets[index].long()
        x = to_unit_range(x) if x.dtype == torch.uint8 else x.float()
        if torch.rand((), generator=generator) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        loss = F.cross_entropy(network(x), y, ignore_index=ignore_index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return network.eval()


def save_segmenter(network, path, trained_on=""):
    save_checkpoint({"format": SEGMENTER_FORMAT, "width": network.width,
                     "trained_on": trained_on, "weights": network.state_dict()}, path)


def load_segmenter(path, device="cpu"):
    """The frozen ContextSegmenter saved at `path` (eval mode, no gradients), on `device`; a
    file that is not one is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such segmenter file (make one with segmentation.py)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: not a readable segmenter file ({type(e).__name__})") from None
    if not isinstance(saved, dict) or saved.get("format") != SEGMENTER_FORMAT:
        raise UserError(f"{path}: not a segmenter saved by segmentation.py")
    try:
        network = ContextSegmenter(width=int(saved["width"]))
        network.load_state_dict(saved["weights"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: damaged segmenter file ({type(e).__name__})") from None
    return network.to(device).eval().requires_grad_(False)


def training_set(data_dir, image_size):
    """(photos uint8 (N, 3, H, W), class targets int64 (N, H, W)) of DATA/train, the classes
    read off label maps drawn in the Cityscapes colours (losses.layout_classes, less 1)."""
    folder = Path(data_dir) / "train"
    data = PairDataset(folder, image_size=image_size, train=False)
    items = [data[i] for i in range(len(data))]
    labels = torch.stack([item["source"] for item in items])
    sample = labels[::max(1, len(labels) // SAMPLE_FILES)][:SAMPLE_FILES]  # spread: drives
    if not in_cityscapes_colours(to_uint8(sample).permute(0, 2, 3, 1).numpy()):
        raise UserError(f"{folder}: the label maps are not drawn in the Cityscapes colours; "
                        "a segmenter needs their classes")
    classes = torch.cat([layout_classes(part) for part in labels.split(64)])
    targets = torch.where(classes > 0, classes - 1, IGNORED_CLASS)
    return to_uint8(torch.stack([item["target"] for item in items])), targets


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the frozen segmenter for "
                                     "train.py --segmenter_loss on the training pairs.")
    parser.add_argument("--data_dir", default="./dataset", help="folder with train/")
    parser.add_argument("--output", default="./checkpoints/segmenter.pth")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.steps, args.batch_size, args.width, args.image_size) < 1:
        parser.error("--steps, --batch_size, --width and --image_size must be >= 1")
    photos, targets = training_set(args.data_dir, args.image_size)
    print(f"training the segmenter: {args.steps} steps on {len(photos)} photos")
    start = time.time()
    network = fit_segmenter(lambda: ContextSegmenter(args.width), photos, targets, args.steps,
                            args.batch_size, args.seed)
    save_segmenter(network, args.output, trained_on=str(Path(args.data_dir) / "train"))
    print(f"{args.output}: saved after {time.time() - start:.0f} s")


if __name__ == "__main__":
    run_cli(main)
