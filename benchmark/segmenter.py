"""The quality benchmark's segmentation-consistency judge, in the spirit of the pix2pix paper's
FCN-score: a small segmentation network trained once on real (synthetic) photos and their label
maps, then applied to generated photos and compared with the input label maps.

No pretrained weights are available offline, so the benchmark trains its own: a small
encoder-decoder (three stride-2 levels, a skip from half resolution, logits upsampled
bilinearly; sized to train in minutes on two CPU cores), cached next to the data it was trained
on. Its score on the real val photos is the upper bound a generated photo can reach.

When a configuration trains G against a segmenter of its own (--segmenter_loss), the judge
and that segmenter are trained on different video sequences of the training photos
(sequence_split), so that the benchmark never trains G against its own judge.
"""

import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import metrics
from checkpoints import save_checkpoint
from cityscapes import NUM_TRAIN_IDS, decode_train_ids
from segmentation import ContextSegmenter, fit_segmenter, save_segmenter
from utils import to_uint8

SEGMENTER_FORMAT = "pix2pix-quality-segmenter"


def _block(c_in, c_out, stride=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Segmenter(nn.Module):
    """(B, 3, H, W) photos in [-1, 1] -> (B, 19, H, W) train-ID logits (H, W multiples of 8)."""

    def __init__(self, width=16, num_classes=NUM_TRAIN_IDS):
        super().__init__()
        self.stem = _block(3, width, 2)
        self.down = nn.Sequential(_block(width, 2 * width, 2), _block(2 * width, 4 * width, 2),
                                  _block(4 * width, 4 * width))
        self.head = nn.Sequential(_block(4 * width + width, width),
                                  nn.Conv2d(width, num_classes, 1))

    def forward(self, photo):
        skip = self.stem(photo)
        deep = F.interpolate(self.down(skip), size=skip.shape[-2:], mode="bilinear",
                             align_corners=False)
        logits = self.head(torch.cat([deep, skip], dim=1))
        return F.interpolate(logits, size=photo.shape[-2:], mode="bilinear", align_corners=False)


def train_ids_of(labels):
    """(N, 3, H, W) label maps in [-1, 1] -> (N, H, W) int64 train IDs (255: ignored)."""
    arrays = to_uint8(labels).permute(0, 2, 3, 1).cpu().numpy()
    return torch.stack([torch.from_numpy(decode_train_ids(a)).long() for a in arrays])


def train_segmenter(photos, train_ids, steps=400, batch_size=8, seed=0, lr=2e-3):
    """A Segmenter fitted to (N, 3, H, W) photos in [-1, 1] and their (N, H, W) train IDs."""
    return fit_segmenter(Segmenter, photos, train_ids, steps, batch_size, seed, lr,
                         ignore_index=255)


@torch.no_grad()
def predict(network, photos, batch_size=32):
    """(N, 3, H, W) photos in [-1, 1] -> (N, H, W) predicted train IDs."""
    network.eval()
    return torch.cat([network(photos[i:i + batch_size].float()).argmax(1)
                      for i in range(0, len(photos), batch_size)])


def classes_present(train_ids, min_share=1e-3):
    """The train IDs that hold at least `min_share` of the labelled pixels (CamVid: its 11
    classes; stray JPEG colours near another palette colour stay below the share)."""
    counts = torch.bincount(train_ids[train_ids != 255].flatten(), minlength=NUM_TRAIN_IDS)
    return [c for c in range(NUM_TRAIN_IDS) if counts[c] >= min_share * counts.sum()]


def consistency(network, photos, train_ids, classes=None):
    """Pixel accuracy, mean class accuracy and mean IoU of `network` on photos against the
    train IDs of the label maps they should show (metrics.segmentation_scores); with
    `classes`, the means are over those classes only (a class of the list that is absent from
    both the truth and the prediction is left out)."""
    confusion = metrics.confusion_matrix(predict(network, photos), train_ids, NUM_TRAIN_IDS)
    scores = metrics.segmentation_scores(confusion)
    values = {k: scores[k] for k in ("pixel_accuracy", "mean_class_accuracy", "mean_iou")}
    if classes is not None:
        ious = [scores["class_iou"][c] for c in classes if scores["class_iou"][c] is not None]
        values["mean_iou"] = sum(ious) / len(ious) if ious else None
        values["class_iou"] = {c: scores["class_iou"][c] for c in classes}
    return values


def cached_segmenter(path, key, train_photos, train_ids, steps=400, log=print):
    """The segmenter saved at `path` for this `key` (the data it depends on), else a new one,
    trained and saved there. Returns (network, seconds spent training, 0 when cached)."""
    path = Path(path)
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("format") == SEGMENTER_FORMAT and saved.get("key") == key:
            network = Segmenter()
            network.load_state_dict(saved["weights"])
            return network.eval(), 0.0
    log(f"training the segmentation judge ({steps} steps on {len(train_photos)} photos)...")
    start = time.time()
    network = train_segmenter(train_photos, train_ids, steps=steps)
    seconds = time.time() - start
    save_checkpoint({"format": SEGMENTER_FORMAT, "key": key,
                     "weights": network.state_dict()}, path)
    return network, seconds


# --- Keeping the judge apart from what G trains against -------------------------------------

def video_sequences(photos, spike=1.5):
    """Index ranges of the runs of consecutive video frames among `photos` (in file order). A
    cut is a one-frame spike in the mean absolute difference of neighbouring photos (at
    32x32): above twice its median and `spike` times the largest of the two changes before
    and after it. A turn or a fast stretch of one drive changes several frames in a row."""
    small = F.adaptive_avg_pool2d(photos.float(), 32)
    change = (small[1:] - small[:-1]).abs().mean((1, 2, 3))
    padded = F.pad(change, (2, 2))
    around = torch.stack([padded[k:k + len(change)] for k in (0, 1, 3, 4)]).amax(0)
    cut = (change > 2 * change.median()) & (change > spike * around)
    bounds = [0, *(torch.nonzero(cut).flatten() + 1).tolist(), len(photos)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def sequence_split(train_photos, val_photos):
    """(judge's range, segmenter's range) of the training photos, split at a sequence
    boundary near the middle: the judge gets the half holding the sequence the val photos are
    nearest to (CamVid's val is a later stretch of one of its train sequences), G's
    segmenter the other half. No frame of one half is a neighbour of a frame of the other."""
    sequences = video_sequences(train_photos)
    if len(sequences) < 2:
        raise SystemExit("the training photos hold one video sequence: the judge and G's "
                         "segmenter cannot be trained on different ones")
    middle = min((s.start for s in sequences[1:]), key=lambda b: abs(b - len(train_photos) / 2))
    halves = range(0, middle), range(middle, len(train_photos))
    small = lambda x: F.adaptive_avg_pool2d(x.float(), 16).flatten(1)  # noqa: E731
    nearest = torch.cdist(small(val_photos), small(train_photos)).argmin(1)
    val_in_second = (nearest >= middle).float().mean() > 0.5
    return (halves[1], halves[0]) if val_in_second else halves


def layout_segmenter(path, key, photos, train_ids, steps, log=print):
    """The path of G's frozen segmenter (segmentation.py's network, not the judge's) trained
    on `photos`, cached at `path` for `key`."""
    if path.is_file() and torch.load(path, weights_only=True).get("trained_on") == key:
        return str(path)
    log(f"training G's segmenter ({steps} steps on {len(photos)} photos)...")
    network = fit_segmenter(ContextSegmenter, photos, train_ids, steps, ignore_index=255)
    save_segmenter(network, path, trained_on=key)
    return str(path)
