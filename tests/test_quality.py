"""The quality benchmark: its summary and spread rule on hand-made runs, the segmentation judge,
and one tiny run end to end (no Inception: --no_fid)."""

import json

import pytest
import torch

from benchmark import quality
from benchmark import segmenter as seg


def run(config, seed, **values):
    return {"config": config, "seed": seed, **values}


def test_a_configuration_wins_only_beyond_the_spread():
    runs = [run("paper", 0, fid=100.0, l1=0.30), run("paper", 1, fid=110.0, l1=0.32),
            run("a", 0, fid=90.0, l1=0.31), run("a", 1, fid=99.0, l1=0.33),
            run("b", 0, fid=95.0, l1=0.30), run("b", 1, fid=105.0, l1=0.29)]
    summary = quality.summarise(runs)
    assert summary["paper"]["fid"] == {"mean": 105.0, "min": 100.0, "max": 110.0}
    assert quality.beyond_spread(summary, "a") == ["fid"]  # L1 ranges overlap
    assert quality.beyond_spread(summary, "b") == []  # FID 95..105 overlaps 100..110
    one_seed = quality.summarise([run("paper", 0, fid=100.0), run("c", 0, fid=1.0)])
    assert quality.beyond_spread(one_seed, "c") == []  # the spread is unknown
    assert "| a | 94.5 [90.0–99.0]" in quality.format_table(summary)


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
