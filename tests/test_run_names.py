"""train.py --name: runs side by side under runs/NAME/, resumed and loaded by their folder;
--tensorboard beside the JSON log."""

import json
import sys

import numpy as np
import pytest
from conftest import cli_flags, draw_label_map, run_in_process, save_image, tiny_config

import inference
import train
from config import TrainConfig
from training_log import RunLog

pytestmark = pytest.mark.usefixtures("one_thread")


def run_flags(tmp_path, demo_set, **options):
    """train.py flags of a tiny run, without the output paths that --name sets."""
    flags = cli_flags(tiny_config(tmp_path, demo_set, epochs=1, max_steps=2, num_samples=1,
                                  sample_every_steps=1, **options))
    paths = {"--checkpoint_dir", "--log_file", "--sample_dir", "--name"}
    return [f for k, f in enumerate(flags) if f not in paths and flags[k - 1] not in paths]


def test_two_named_runs_side_by_side(tmp_path, demo_set, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    flags = run_flags(tmp_path, demo_set)
    for name, seed in (("first", "0"), ("second", "1")):
        train.main([*flags, "--name", name, "--seed", seed])
    for name in ("first", "second"):
        run = tmp_path / "runs" / name
        assert {p.name for p in (run / "checkpoints").iterdir()} == {"generator.pth",
                                                                      "latest.pth"}
        assert len(list((run / "samples").glob("step_*.png"))) == 2
        log = json.loads((run / "training_log.json").read_text())
        assert log["config"]["name"] == name and [e["step"] for e in log["steps"]] == [1, 2]
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "samples").exists()

    # The same name again is refused (the runs are apart, not overwritten) ...
    status, _, err = run_in_process(train.main, [*flags, "--name", "first"], capsys)
    assert status == 2 and "runs/first" in err and "--resume" in err
    # ... and continued by its folder.
    summary = train.main(["--resume", "runs/first", "--max_steps", "3"])
    assert summary["step"] == 3
    log = json.loads((tmp_path / "runs/first/training_log.json").read_text())
    assert [e["step"] for e in log["steps"]] == [1, 2, 3]

    # The run folder stands for its generator.pth in inference.py and app.py.
    save_image(draw_label_map(32, 48, np.random.default_rng(0)),
               tmp_path / "in" / "a.png")
    for name in ("first", "second"):
        inference.main(["--input_dir", "in", "--output_dir", f"out_{name}", "--model_path",
                        f"runs/{name}", "--precision", "fp32"])
    first, second = ((tmp_path / f"out_{n}" / "a.png").read_bytes() for n in ("first", "second"))
    assert first != second  # two different generators were read
    import app
    assert app.load_service("runs/second", "cpu", "fp32").translator is not None


def test_name_errors_are_one_line(tmp_path, demo_set, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    flags = run_flags(tmp_path, demo_set)
    for extra, message in ((["--name", "a", "--checkpoint_dir", "x"], "drop --checkpoint_dir"),
                           (["--name", "../up"], "--name '../up'"),
                           (["--resume", "runs/none"], "runs/none")):
        status, _, err = run_in_process(train.main, [*flags, *extra], capsys)
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    save_image(draw_label_map(32, 32, np.random.default_rng(0)), tmp_path / "in" / "a.png")
    status, _, err = run_in_process(inference.main, ["--input_dir", "in", "--output_dir", "o",
                                                     "--model_path", "runs/empty"], capsys)
    assert status == 2 and "runs/empty: is a folder without checkpoints/generator.pth" in err


def test_tensorboard_gets_the_logged_numbers_and_grids(tmp_path, demo_set, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.chdir(tmp_path)
    # max_steps 4: the epoch's end, so that validation is logged too.
    train.main([*run_flags(tmp_path, demo_set), "--name", "tb", "--tensorboard", "--max_steps",
                "4", "--sample_every_steps", "2"])
    events = EventAccumulator(str(tmp_path / "runs/tb/tensorboard"))
    events.Reload()
    log = json.loads((tmp_path / "runs/tb/training_log.json").read_text())
    for loss in ("g_l1", "d_real", "lr"):
        logged = events.Scalars(f"train/{loss}")
        assert [e.step for e in logged] == [e["step"] for e in log["steps"]] == [1, 2, 3, 4]
        assert [e.value for e in logged] == pytest.approx([e[loss] for e in log["steps"]])
    assert len(log["epochs"]) == 1
    for name in ("val_l1", "val_psnr"):
        assert [e.value for e in events.Scalars(f"val/{name}")] == pytest.approx(
            [e[name] for e in log["epochs"]])
    assert [e.step for e in events.Images("samples")] == [2, 4]


def test_tensorboard_missing_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    config = TrainConfig(log_file=str(tmp_path / "log.json"), tensorboard=True)
    with pytest.raises(inference.UserError, match="pip install tensorboard"):
        RunLog(config)
    assert RunLog(TrainConfig(log_file=str(tmp_path / "log.json"))).tensorboard is None
