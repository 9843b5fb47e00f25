"""The quality benchmark: its summary and spread rule on hand-made runs, the segmentation judge,
and one tiny run end to end (no Inception: --no_fid)."""

import json
import math

import numpy as np
import pytest
import torch

from benchmark import artefacts, quality, quality_report
from benchmark import segmenter as seg
from conftest import CAMVID, tiny_model
from dataset import PairDataset
from utils import to_uint8


def run(config, seed, **values):
    return {"config": config, "seed": seed, **values}


def test_a_configuration_wins_only_beyond_the_spread():
    runs = [run("paper", 0, fid=100.0, l1=0.30), run("paper", 1, fid=110.0, l1=0.32),
            run("a", 0, fid=90.0, l1=0.31), run("a", 1, fid=99.0, l1=0.33),
            run("b", 0, fid=95.0, l1=0.30), run("b", 1, fid=105.0, l1=0.29)]
    summary = quality_report.summarise(runs)
    assert summary["paper"]["fid"] == {"mean": 105.0, "min": 100.0, "max": 110.0}
    assert quality_report.beyond_spread(summary, "a") == ["fid"]  # L1 ranges overlap
    assert quality_report.beyond_spread(summary, "b") == []  # FID 95..105 overlaps 100..110
    one_seed = quality_report.summarise([run("paper", 0, fid=100.0), run("c", 0, fid=1.0)])
    assert quality_report.beyond_spread(one_seed, "c") == []  # the spread is unknown
    assert "| a | 94.5 [90.0–99.0]" in quality_report.format_table(summary)


def test_the_judge_learns_flat_regions_and_scores_them():
    torch.manual_seed(0)
    ids = torch.zeros(16, 16, 16, dtype=torch.long)
    ids[:, 8:] = 2  # top half road, bottom half building
    ids[:4, :, :2] = 255  # ignored pixels
    photos = torch.where(ids[:, None] == 2, 0.5, -0.5).expand(-1, 3, -1, -1).clone()
    network = seg.train_segmenter(photos, ids, steps=60, batch_size=4)
    scores = seg.consistency(network, photos, ids)
    # Logits come at 1/2 resolution: the border row between the regions may blur.
    assert scores["pixel_accuracy"] > 0.9 and scores["mean_iou"] > 0.8


def test_one_tiny_benchmark_run(tmp_path, capsys):
    result = quality.main(["--configs", "paper,ema", "--seeds", "0", "--image_size", "32",
                           "--channels", "8", "--steps", "2", "--batch_size", "2",
                           "--num_train", "4", "--num_val", "2", "--segmenter_steps", "2",
                           "--work_dir", str(tmp_path), "--no_fid"])
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert [r["config"] for r in saved["runs"]] == ["paper", "paper@batchstats", "ema"]
    for row in saved["runs"]:
        assert 0 <= row["pixel_accuracy"] <= 1 and row["l1"] > 0 and row["train_seconds"] > 0
    assert set(result["summary"]) == {"paper", "paper@batchstats", "ema"}
    assert "| paper |" in capsys.readouterr().out
    # The judge is cached: a second benchmark does not train it again.
    again = quality.main(["--configs", "paper", "--seeds", "1", "--image_size", "32",
                          "--channels", "8", "--steps", "1", "--batch_size", "2",
                          "--num_train", "4", "--num_val", "2", "--segmenter_steps", "2",
                          "--work_dir", str(tmp_path), "--no_fid"])
    assert again["segmenter_seconds"] == 0.0


def test_unknown_configurations_are_refused():
    with pytest.raises(SystemExit):
        quality.parse(["--configs", "paper,nonsense"])


def test_artefacts_see_a_cast_edge_stripes_and_a_grid():
    torch.manual_seed(0)
    real = torch.rand(4, 3, 32, 32) * 1.6 - 0.8
    same = artefacts.artefacts(real, real)
    assert same["mean_shift"] == 0 and math.isclose(same["grid_power_ratio"], 1.0)
    assert same["std_ratio"] == 1.0
    cast = real.clone()
    cast[:, 1] += 0.2  # green by 25.5 levels
    assert math.isclose(artefacts.artefacts(cast, real)["mean_shift"], 25.5, rel_tol=1e-4)
    striped = real.clone()
    striped[..., :2] = 1.0  # bright columns at the left edge
    profile = artefacts.artefacts(striped, real)
    assert profile["edge_error_ratio"] > 3
    assert artefacts.artefacts(real + 0.05, real)["edge_error_ratio"] == pytest.approx(1.0)
    assert same["edge_detail_ratio"] == pytest.approx(1.0)
    smooth = torch.nn.functional.interpolate(torch.rand(4, 3, 4, 4), size=(32, 32),
                                             mode="bilinear") * 1.6 - 0.8
    comb = torch.tensor([0.2, -0.2, 0.2])  # sharp columns at both edges: stripes
    combed = smooth.clone()
    combed[..., :3] += comb
    combed[..., -3:] += comb
    assert artefacts.artefacts(combed, smooth)["edge_detail_ratio"] > 2
    blurred = real.clone()
    blurred[..., :2] = real[..., :2].mean(-1, keepdim=True)  # only a blur at the edge
    blurred[..., -2:] = real[..., -2:].mean(-1, keepdim=True)
    assert artefacts.artefacts(blurred, real)["edge_detail_ratio"] < 1
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None]) % 2 * 0.4 - 0.2
    gridded = (real + checker).clamp(-1, 1)
    assert artefacts.artefacts(gridded, real)["grid_power_ratio"] > 2


def test_border_lines_see_a_frame_drawn_in_every_photo_and_nothing_else():
    torch.manual_seed(0)
    photos = torch.rand(64, 3, 64, 64) * 1.6 - 0.8  # changes from photo to photo: averages out
    plain = artefacts.border_lines(photos)
    assert plain < 5
    framed = photos.clone()
    framed[..., 3] += 0.1  # a line 3 columns in, 12.75 levels, in every photo
    framed[..., 2, :] -= 0.1  # and one 2 rows down
    assert artefacts.border_lines(framed) > plain + 2
    centred = photos.clone()
    centred[..., 32] += 0.1  # the same line in the middle is not a border pattern
    assert artefacts.border_lines(centred) == pytest.approx(plain, abs=1e-4)
    values = artefacts.artefacts(framed, photos)
    assert values["border_lines"] > values["real_border_lines"] + 2


def test_period_power_ratios_peak_at_a_grid_added_to_every_photo():
    torch.manual_seed(0)
    real = torch.nn.functional.interpolate(torch.rand(16, 3, 8, 8), size=(64, 64),
                                           mode="bilinear") * 1.6 - 0.8
    same = artefacts.period_power_ratios(real, real)
    assert set(same) == {64 / k for k in range(1, 33)}
    assert all(v == pytest.approx(1.0) for v in same.values())
    columns = torch.arange(64, dtype=torch.float32)
    gridded = real + 0.05 * torch.cos(2 * math.pi * columns / 8)  # an 8-pixel grid
    ratios = artefacts.period_power_ratios(gridded, real)
    assert ratios[8.0] > 3 * max(ratios[64 / 7], ratios[64 / 9])


def test_equal_time_takes_each_run_at_its_last_point_within_the_shortest_run():
    runs = [run("slow", 0, step=100, train_seconds=50.0), run("slow", 0, step=200,
                                                             train_seconds=100.0),
            run("fast", 0, step=100, train_seconds=30.0), run("fast", 0, step=200,
                                                             train_seconds=60.0),
            run("slow", 1, step=200, train_seconds=40.0), run("fast", 1, step=200,
                                                             train_seconds=41.0)]
    chosen = {(r["config"], r["seed"]): r["step"] for r in quality_report.at_equal_time(runs)}
    # Seed 0: within fast's 60 s slow has reached step 100; seed 1: both within 5 %.
    assert chosen == {("slow", 0): 100, ("fast", 0): 200, ("slow", 1): 200, ("fast", 1): 200}
    assert quality.score_steps(300, 3) == [100, 200, 300]


def test_consistency_over_the_classes_of_the_data_only():
    ids = torch.zeros(2, 8, 8, dtype=torch.long)
    ids[:, 4:] = 10  # road and sky
    ids[0, 0, 0] = 13  # one stray car pixel: below the share
    assert seg.classes_present(ids, min_share=0.05) == [0, 10]

    class Constant(torch.nn.Module):  # says "road" everywhere
        def forward(self, photo):
            logits = torch.zeros(len(photo), 19, *photo.shape[-2:])
            logits[:, 0] = 1
            return logits

    photos = torch.zeros(2, 3, 8, 8)
    scores = seg.consistency(Constant(), photos, ids, classes=[0, 10])
    # Road IoU 63/128 (64 road pixels less the car, 128 predicted), sky 0: mean over 2.
    assert scores["mean_iou"] == pytest.approx((63 / 128 + 0) / 2)
    assert set(scores["class_iou"]) == {0, 10}




@pytest.mark.skipif(not (CAMVID / "train").is_dir(), reason="../shared/camvid is not here")
def test_camvid_labels_hold_camvids_classes_in_cityscapes_train_ids():
    data = PairDataset(CAMVID / "val", image_size=32, train=False, label_side="right")
    assert len(data) == 101
    labels = torch.stack([data[i]["source"] for i in range(0, 101, 10)])
    present = seg.classes_present(seg.train_ids_of(labels))
    camvid = {0, 1, 2, 4, 5, 7, 8, 10, 11, 12, 13}  # README: the 11 classes' train IDs
    assert {0, 2, 10, 13} <= set(present) <= camvid


def test_the_judge_probes_score_real_blurred_checkerboarded_and_lookup_table_photos():
    ids = torch.zeros(2, 16, 16, dtype=torch.long)
    ids[:, :, ::2] = 10  # one-pixel stripes: blurring them away costs the judge everything

    class ByBrightness(torch.nn.Module):  # bright pixel -> sky, dark -> road
        def forward(self, photo):
            logits = torch.zeros(len(photo), 19, *photo.shape[-2:])
            logits[:, 10] = photo.mean(1)
            return logits

    photos = torch.where(ids[:, None] == 10, 0.5, -0.5).expand(-1, 3, -1, -1)
    # A lookup table fitted where the sky is dark and the road bright swaps the classes.
    probes = quality.judge_probes(ByBrightness(), photos, ids, [0, 10], -photos)
    assert probes["real"] == 1.0 and probes["checkerboard"] == 1.0
    assert probes["blurred"] < 0.7
    assert probes["lookup"] == 0.0


def test_lookup_table_photos_paint_each_class_its_mean_training_colour():
    """The real set's profile: label maps that went through JPEG (ringing at the class edges)
    and dark grey photos; each class is painted its mean training colour."""
    import io
    from PIL import Image
    label = np.zeros((32, 32, 3), np.uint8)
    label[:16], label[16:] = (70, 130, 180), (128, 64, 128)  # sky over road
    buffer = io.BytesIO()
    Image.fromarray(label).save(buffer, "JPEG", quality=75)
    label = np.array(Image.open(buffer).convert("RGB"))
    assert (label != label[[0]]).any()  # ringing: not the exact palette colours any more
    photo = np.zeros((32, 32, 3), np.uint8)
    photo[:16], photo[16:] = (92, 96, 104), (38, 40, 44)
    as_tensor = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float() / 127.5 - 1
    painted = quality.lookup_table_photos(as_tensor(label), as_tensor(label), as_tensor(photo))
    assert painted.shape == (1, 3, 32, 32)
    painted = to_uint8(painted)[0].permute(1, 2, 0).numpy().astype(int)
    assert np.abs(painted - photo).max() <= 1


@pytest.mark.skipif(not (CAMVID / "train").is_dir(), reason="../shared/camvid is not here")
def test_lookup_table_photos_of_real_camvid_pairs_follow_their_photos():
    """Real label maps (JPEG) and photos: the table painted from the train pairs is closer to
    the val photos than their mean colour is, and it is not a photo (no texture)."""
    def split(name, step):
        data = PairDataset(CAMVID / name, image_size=64, train=False, label_side="right")
        items = [data[i] for i in range(0, len(data), step)]
        return (torch.stack([item["source"] for item in items]),
                torch.stack([item["target"] for item in items]))
    (train_labels, train_photos), (labels, photos) = split("train", 8), split("val", 10)
    painted = quality.lookup_table_photos(labels, train_labels, train_photos)
    mean_colour = photos.mean((0, 2, 3), keepdim=True)
    assert (painted - photos).abs().mean() < 0.9 * (mean_colour - photos).abs().mean()
    assert painted.std((2, 3)).mean() < photos.std((2, 3)).mean()


def test_precise_batch_norm_recomputes_the_statistics_of_the_weights_scored():
    from models import build_generator
    torch.manual_seed(0)
    generator = build_generator(tiny_model()).eval()
    norm = generator.decoder["up2"].norm
    norm.running_mean.fill_(5.0)  # statistics of other weights, as the EMA's copied ones
    labels = torch.rand(32, 3, 32, 32) * 2 - 1
    fixed = quality.precise_batch_norm(generator, labels, batch_size=8)
    assert norm.running_mean.eq(5.0).all()  # the scored copy changes, not the original
    fixed_norm = fixed.decoder["up2"].norm
    assert not fixed.training and fixed_norm.running_mean.abs().max() < 1
    # Statistics of its own inputs: eval mode now normalises them to about zero mean.
    captured = []
    fixed_norm.register_forward_hook(lambda m, i, o: captured.append(o))
    fixed(labels)
    assert captured[0].mean((0, 2, 3)).abs().max() < 0.1
