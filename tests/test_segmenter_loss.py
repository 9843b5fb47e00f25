"""A frozen segmenter of real photos as G's extra loss (--segmenter_loss, segmentation.py), and
the quality benchmark's split of the training photos by video sequence, so that G's segmenter
and the benchmark's judge never see the same frames."""

from pathlib import Path

import pytest
import torch

import losses
import segmentation
import train
from benchmark import quality
from benchmark import segmenter as seg
from checkpoints import load_checkpoint
from cityscapes import NUM_TRAIN_IDS
from conftest import CAMVID, tiny_config
from test_labelmaps import write_real_profile_set
from utils import UserError


def test_the_segmenter_loss_is_class_balanced_cross_entropy_on_the_train_ids():
    classes = torch.ones(1, 10, 10, dtype=torch.long)  # road (train ID 0) everywhere...
    classes[0, :, 0] = 14  # ...a column of car (train ID 13)...
    classes[0, 0, 1:] = losses.IGNORED_CLASS  # ...and a row nobody scores
    right = torch.full((1, NUM_TRAIN_IDS, 10, 10), -10.0)
    right[:, 0] = 10.0
    right[0, :, :, 0] = -10.0
    right[0, 13, :, 0] = 10.0
    road_everywhere = torch.full((1, NUM_TRAIN_IDS, 10, 10), -10.0)
    road_everywhere[:, 0] = 10.0
    assert losses.segmenter_loss(right, classes) < 1e-3
    # The car column is 10 of 91 labelled pixels but half the loss: about 20 / 2.
    assert losses.segmenter_loss(road_everywhere, classes).item() == pytest.approx(10, rel=0.01)
    ignored_wrong = right.clone()
    ignored_wrong[0, :, 0, 1:] = road_everywhere[0, :, 0, 1:].roll(5, 0)
    assert losses.segmenter_loss(ignored_wrong, classes) < 1e-3  # ignored pixels weigh nothing


def test_the_context_segmenter_gives_train_id_logits_at_the_photo_size():
    torch.manual_seed(0)
    network = segmentation.ContextSegmenter(width=4).eval()
    assert network(torch.randn(2, 3, 36, 52)).shape == (2, NUM_TRAIN_IDS, 36, 52)


def test_segmentation_py_trains_a_segmenter_that_loads_frozen(tmp_path, demo_set, capsys):
    output = tmp_path / "seg" / "segmenter.pth"
    segmentation.main(["--data_dir", str(demo_set), "--output", str(output), "--image_size",
                       "32", "--steps", "3", "--batch_size", "2", "--width", "4"])
    assert "saved" in capsys.readouterr().out
    network = segmentation.load_segmenter(output)
    assert not network.training and not any(p.requires_grad for p in network.parameters())
    photo = torch.randn(1, 3, 32, 32, requires_grad=True)
    network(photo).sum().backward()
    assert photo.grad.abs().sum() > 0  # the gradient reaches G's photo, not the segmenter


def test_a_segmenter_file_that_is_missing_or_not_one_is_refused_naming_it(tmp_path):
    missing = tmp_path / "nothing.pth"
    with pytest.raises(UserError, match="nothing.pth: no such segmenter file"):
        segmentation.load_segmenter(missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="garbage.pth: not a readable segmenter file"):
        segmentation.load_segmenter(garbage)
    other = tmp_path / "other.pth"
    torch.save({"format": "something else"}, other)
    with pytest.raises(UserError, match="other.pth: not a segmenter saved by segmentation.py"):
        segmentation.load_segmenter(other)
    damaged = tmp_path / "damaged.pth"
    torch.save({"format": segmentation.SEGMENTER_FORMAT, "width": 4, "weights": {}}, damaged)
    with pytest.raises(UserError, match="damaged.pth: damaged segmenter file"):
        segmentation.load_segmenter(damaged)


def test_a_run_with_the_segmenter_loss_trains_and_changes_the_generators_update(tmp_path,
                                                                               demo_set):
    torch.manual_seed(0)
    path = tmp_path / "segmenter.pth"
    segmentation.save_segmenter(segmentation.ContextSegmenter(width=4).eval(), path)
    weights = []
    for weight in (0.0, 1.0):
        config = tiny_config(tmp_path / f"{weight}", demo_set, epochs=1, max_steps=2,
                             gan_loss="hinge", segmenter_loss=weight, segmenter=str(path),
                             discriminator_layers=2, ema_decay=0.0)
        assert train.train(config)["step"] == 2
        latest = load_checkpoint(Path(config.checkpoint_dir) / "latest.pth")
        weights.append(latest["generator"])
    assert latest["config"]["segmenter_loss"] == 1.0
    assert any(not torch.equal(a, weights[1][k]) for k, a in weights[0].items()
               if a.is_floating_point())


def test_the_segmenter_loss_is_refused_without_a_file_or_cityscapes_colours(tmp_path,
                                                                           demo_set):
    with pytest.raises(UserError, match="--segmenter_loss needs --segmenter FILE"):
        tiny_config(tmp_path / "a", demo_set, segmenter_loss=1.0)
    config = tiny_config(tmp_path / "b", demo_set, segmenter_loss=1.0,
                         segmenter=str(tmp_path / "missing.pth"))
    with pytest.raises(UserError, match="missing.pth: no such segmenter file"):
        train.train(config)
    assert not (tmp_path / "b" / "checkpoints" / "latest.pth").exists()
    write_real_profile_set(tmp_path / "own", recoloured=True)
    path = tmp_path / "segmenter.pth"
    segmentation.save_segmenter(segmentation.ContextSegmenter(width=4), path)
    config = tiny_config(tmp_path / "c", tmp_path / "own", image_size=32, label_side="right",
                         segmenter_loss=1.0, segmenter=str(path))
    with pytest.raises(UserError, match="not drawn in the Cityscapes colours"):
        train.train(config)
    with pytest.raises(UserError, match="needs --direction label2photo"):
        tiny_config(tmp_path / "d", demo_set, segmenter_loss=1.0, segmenter=str(path),
                    direction="photo2label")


def drive(generator, frames, scene):
    """`frames` consecutive frames of one drive: a fixed random scene of 16-pixel blocks,
    brightened by `scene`, panned a pixel a frame."""
    blocks = torch.rand(3, 4, 5 + frames // 16, generator=generator) * 2 - 1 + scene
    wide = blocks.repeat_interleave(16, 1).repeat_interleave(16, 2)
    return torch.stack([wide[:, :, k:k + 64] for k in range(frames)]).clamp(-1, 1)


def test_training_photos_split_by_video_sequence_and_the_judge_gets_vals_drive():
    generator = torch.Generator().manual_seed(0)
    drives = [drive(generator, n, shift) for n, shift in ((30, -0.3), (12, 0.0), (25, 0.3))]
    photos = torch.cat(drives)
    assert [len(r) for r in seg.video_sequences(photos)] == [30, 12, 25]
    later_stretch_of_third = drives[2][-5:] + 0.01
    judged, trained = seg.sequence_split(photos, later_stretch_of_third)
    assert (judged, trained) == (range(30, 67), range(0, 30))
    judged, trained = seg.sequence_split(photos, drives[0][:4])
    assert (judged, trained) == (range(0, 30), range(30, 67))


@pytest.mark.skipif(not (CAMVID / "train").is_dir(), reason="../shared/camvid is not here")
def test_camvids_training_photos_split_into_its_drives_and_the_judge_gets_vals_drive():
    """CamVid's train split is four drives one after the other; its val photos are a later
    stretch of the last. The judge's half holds that drive, G's segmenter's half the others,
    and no drive is cut between them."""
    _, photos = quality.load_split(CAMVID / "train", 32)
    _, val_photos = quality.load_split(CAMVID / "val", 32)
    drives = seg.video_sequences(photos)
    assert len(drives) == 4 and min(len(d) for d in drives) > 50
    judged, trained = seg.sequence_split(photos, val_photos)
    assert judged.stop == len(photos) and trained.start == 0
    assert trained.stop == judged.start in [d.start for d in drives]


def test_the_benchmark_trains_g_against_a_segmenter_the_judge_never_saw(tmp_path):
    """`oasis+segmenter`: G's segmenter and the judge are trained on disjoint halves of the
    training scenes, and the run trains with G's segmenter."""
    result = quality.main(["--configs", "oasis+segmenter", "--seeds", "0", "--image_size",
                           "32", "--channels", "8", "--steps", "2", "--batch_size", "2",
                           "--num_train", "6", "--num_val", "2", "--segmenter_steps", "2",
                           "--work_dir", str(tmp_path), "--no_fid"])
    assert result["split"]["judge_photos"] == result["split"]["segmenter_photos"] == 3
    saved = load_checkpoint(next((tmp_path / "runs").glob("*oasis+segmenter_seed0")) /
                            "checkpoints" / "latest.pth")
    assert saved["config"]["segmenter_loss"] == 1.0
    assert saved["config"]["segmenter"] == result["split"]["segmenter_path"]
    assert segmentation.load_segmenter(saved["config"]["segmenter"]) is not None
