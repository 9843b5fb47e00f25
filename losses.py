"""pix2pix's objectives, as pure functions of tensors: the adversarial losses (bce, lsgan,
hinge, OASIS's per-class one and its LabelMix regulariser) and D's and G's totals (G adds
lambda * L1). train.py's GAN step calls them.
"""

import functools

import torch
import torch.nn.functional as F

from cityscapes import IGNORE_ID, LABELS, MAX_COLOR_DISTANCE, NUM_TRAIN_IDS, PALETTE


def gan_loss(logits, is_real, kind="bce", for_generator=False, classes=None):
    """Adversarial loss of a batch of PatchGAN logits against an all-real or all-fake target.

    Hinge (Lim & Ye 2017, as in SAGAN/SPADE): D pushes real logits above 1 and fake below -1;
    G (`for_generator`) raises the fake logits without a margin. OASIS: `classes` (from
    layout_classes) are the targets of "real", class 0 of "fake" (oasis_loss)."""
    if kind == "oasis":  # G asks for its photo's pixels to be segmented as the label map says
        return oasis_loss(logits, classes, is_real)
    if kind == "hinge":
        logits = logits.float()
        if for_generator:
            return -logits.mean()
        return F.relu(1 - logits).mean() if is_real else F.relu(1 + logits).mean()
    target = torch.ones_like(logits) if is_real else torch.zeros_like(logits)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits.float(), target.float())
    if kind == "lsgan":
        return F.mse_loss(logits.float(), target.float())
    raise ValueError(f"unknown GAN loss {kind!r}; choose bce, lsgan or hinge")


def discriminator_loss(real_logits, fake_logits, kind="bce", classes=None):
    """(loss, real part, fake part); halved as in the paper, to slow D relative to G."""
    real = gan_loss(real_logits, True, kind, classes=classes)
    fake = gan_loss(fake_logits, False, kind, classes=classes)
    return 0.5 * (real + fake), real, fake


def generator_loss(fake_logits, fake, target, lambda_l1, kind="bce", classes=None):
    """(loss, adversarial part, L1 part): fool D, and stay near the target in L1."""
    adversarial = gan_loss(fake_logits, True, kind, for_generator=True, classes=classes)
    l1 = F.l1_loss(fake.float(), target.float())
    return adversarial + lambda_l1 * l1, adversarial, l1


IGNORED_CLASS = -100  # F.cross_entropy's default ignore_index
_TRAIN_IDS = torch.tensor([train_id for _, train_id, _ in LABELS])


def layout_classes(label, max_distance=MAX_COLOR_DISTANCE):
    """(B, 3, H, W) colour label maps in [-1, 1] -> (B, H, W) int64 OASIS targets: 1 + the
    train ID of each pixel's nearest palette colour (0 is "fake"); IGNORED_CLASS for void
    classes and for pixels farther than `max_distance` from every colour (blended borders),
    the rule of cityscapes.decode_train_ids, on the device. Distances are taken once per
    distinct colour (a JPEG label map has a few thousand), not per pixel: 6x faster at 256x256."""
    colours = ((label.float() + 1) * 127.5).round().long().clamp(0, 255)
    codes = (colours[:, 0] << 16) | (colours[:, 1] << 8) | colours[:, 2]
    unique, inverse = torch.unique(codes, return_inverse=True)
    rgb = torch.stack([unique >> 16, (unique >> 8) & 255, unique & 255], dim=1).float()
    palette = torch.tensor(PALETTE, dtype=torch.float32, device=label.device)
    nearest, index = (rgb[:, None] - palette[None]).square().sum(-1).min(1)
    train_ids = _TRAIN_IDS.to(label.device)[index]
    ignored = (train_ids == IGNORE_ID) | (nearest > max_distance ** 2)
    return torch.where(ignored, IGNORED_CLASS, train_ids + 1)[inverse]


@functools.lru_cache(maxsize=16)
def _bilinear_weights(size_in, size_out, device):
    """(size_out, size_in) matrix of F.interpolate's bilinear weights along one axis
    (align_corners=False): the interpolation of each unit vector."""
    unit = torch.eye(size_in, device=device)[None, None]
    return F.interpolate(unit, size=(size_out, size_in), mode="bilinear", align_corners=False)[0, 0]


def to_label_size(logits, size):
    """D's (B, C, h, w) logits bilinearly upsampled to the label map's (H, W), in fp32.
    F.interpolate's weights applied as two matrix products (rows, then columns): equal to it
    to fp32 rounding, and a fraction of its cost forward and backward on a CPU."""
    logits = logits.float()
    rows = _bilinear_weights(logits.shape[-2], size[0], logits.device)
    columns = _bilinear_weights(logits.shape[-1], size[1], logits.device)
    with torch.autocast(logits.device.type, enabled=False):  # autocast would make it bf16
        return rows @ logits @ columns.T


def balanced_cross_entropy(logits, targets):
    """Cross-entropy of (B, C, H, W) logits against (B, H, W) targets in which each class
    present weighs as much in total, inverse to its pixel count, so that a pole counts as much
    as the road; IGNORED_CLASS pixels weigh nothing. The mean weight over the labelled pixels
    is 1 (the scale of plain cross-entropy); no labelled pixel at all costs 0."""
    num_classes = logits.shape[1]
    labelled = targets != IGNORED_CLASS
    count = labelled.sum().clamp_min(1)
    # The ignored pixels counted as one more class, then dropped: no read back to the host.
    counts = torch.bincount(torch.where(labelled, targets, num_classes).flatten(),
                            minlength=num_classes + 1)[:num_classes].float()
    present = (counts > 0).sum().clamp_min(1)
    weight = count / (present * counts.clamp_min(1))
    return F.cross_entropy(logits.float(), targets, weight=weight, ignore_index=IGNORED_CLASS,
                           reduction="sum") / count


def oasis_loss(logits, classes, to_classes):
    """OASIS's adversarial loss (Schoenfeld et al., ICLR 2021): D's (B, N+1, h, w) logits,
    upsampled to the label size, against `classes` (`to_classes`: D on real photos, and G on
    its fakes), class-balanced, or against class 0, "fake" (D on fakes)."""
    logits = to_label_size(logits, classes.shape[-2:])
    if to_classes:
        return balanced_cross_entropy(logits, classes)
    # Every labelled pixel's target is 0, "fake".
    return F.cross_entropy(logits, classes.clamp_max(0), ignore_index=IGNORED_CLASS,
                           reduction="sum") / (classes != IGNORED_CLASS).sum().clamp_min(1)


def segmenter_loss(logits, classes):
    """G's extra term with --segmenter_loss: a frozen segmenter's (B, 19, H, W) train-ID logits
    on G's photos against the label map's `classes` (layout_classes: 1 + the train ID),
    class-balanced as OASIS's."""
    return balanced_cross_entropy(logits, torch.where(classes > 0, classes - 1, IGNORED_CLASS))


def labelmix_mask(classes, generator=None):
    """(B, H, W) OASIS targets -> (B, 1, H, W) float mask of LabelMix (Schoenfeld et al. 2021):
    each class of each label map (ignored pixels as one more) drawn 1 or 0 at random, so that
    the mask's edges are the label map's own."""
    groups = classes.clamp_min(0)  # IGNORED_CLASS -> 0, the "fake" index no target uses
    # One bit per possible class (1 + the train IDs), not per class present: no read of the
    # classes back to the host in the training step.
    bits = torch.randint(0, 2, (classes.shape[0], NUM_TRAIN_IDS + 1), generator=generator,
                         device=classes.device)
    return bits.gather(1, groups.flatten(1)).view_as(classes)[:, None].float()


def labelmix_loss(mixed_logits, real_logits, fake_logits, mask):
    """LabelMix's consistency: D's logits of the photo mixed by `mask` (real where 1, fake
    where 0) should be the same mix of its logits of the real and of the fake photo. Logits
    upsampled to the mask's size, as oasis_loss does; mean squared error."""
    real, fake, mixed = (to_label_size(logits, mask.shape[-2:])
                         for logits in (real_logits, fake_logits, mixed_logits))
    return F.mse_loss(mixed, mask * real + (1 - mask) * fake)
