"""A user's mistake gets one clear message naming the file or flag, a non-zero exit status and
no traceback."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import (TINY_MODEL, as_flags, assert_clean_failure, draw_label_map, run_scripts,
                      save_image, write_dataset)

import inference
import train
from utils import UserError, load_checkpoint, run_cli

TINY_RUN = [*as_flags(TINY_MODEL), "--epochs", "1", "--batch_size", "2", "--num_workers", "0",
            "--checkpoint_dir", "tmp/c", "--log_file", "tmp/log.json", "--sample_dir", "tmp/s"]


CASES = ["missing data folder", "empty data folder", "empty train folder", "orphan input",
         "corrupt image", "truncated image", "zero-byte image", "batch size 0",
         "negative epochs", "lr nan", "resume missing", "unreadable inputs", "model missing",
         "model plain state dict", "model text file", "input folder missing"]


def corrupt(path):
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    return path


def truncate(path):
    path.write_bytes(path.read_bytes()[:300])
    return path


def empty(path):
    path.write_bytes(b"")
    return path


@pytest.fixture(scope="module")
def cases(tmp_path_factory, tiny_checkpoint):
    """Every bad-input case, its data prepared: {case: (script, args, names the message must
    contain)}. "{out}" in args stands for an output folder of the runner's own."""
    root = tmp_path_factory.mktemp("bad")
    cases = {}

    def train_case(case, names, *args):
        cases[case] = ("train.py", [*TINY_RUN, *args], names)

    def infer_case(case, names, *args):
        cases[case] = ("inference.py", list(args), names)

    # train.py: data folders.
    train_case("missing data folder", [root / "nowhere"], "--data_dir", root / "nowhere")
    (root / "empty").mkdir()
    train_case("empty data folder", [root / "empty" / "train"], "--data_dir", root / "empty")
    (root / "no_images" / "train").mkdir(parents=True)
    train_case("empty train folder", [root / "no_images" / "train", "no images found"],
          "--data_dir", root / "no_images")
    orphan = write_dataset(root / "orphan", layout="paired") / "train" / "9_input.jpg"
    save_image(np.zeros((32, 32, 3), np.uint8), orphan)
    train_case("orphan input", [orphan, "no matching 9_target"], "--data_dir", root / "orphan")
    # train.py: unreadable images, in both layouts.
    bad = corrupt(write_dataset(root / "corrupt") / "train" / "2.jpg")
    train_case("corrupt image", [bad], "--data_dir", root / "corrupt")
    cut = truncate(write_dataset(root / "cut", layout="paired") / "train" / "3_target.jpg")
    train_case("truncated image", [cut, "truncated"], "--data_dir", root / "cut")
    zero = empty(write_dataset(root / "zero") / "train" / "4.jpg")
    train_case("zero-byte image", [zero, "empty"], "--data_dir", root / "zero")
    # train.py: numbers and checkpoints.
    good = write_dataset(root / "good")
    train_case("batch size 0", ["--batch_size", "got 0"], "--data_dir", good, "--batch_size", "0")
    train_case("negative epochs", ["--epochs", "got -1"], "--data_dir", good, "--epochs", "-1")
    train_case("lr nan", ["--lr", "got nan"], "--data_dir", good, "--lr", "nan")
    train_case("resume missing", [root / "gone.pth", "not found"], "--resume", root / "gone.pth")

    # inference.py: unreadable images among good ones.
    inputs = root / "inputs"
    for name in ("good1.png", "good2.jpg", "corrupt.jpg", "truncated.jpg", "zero.png"):
        save_image(draw_label_map(24, 30, np.random.default_rng(len(name))), inputs / name)
    unreadable = [corrupt(inputs / "corrupt.jpg"), truncate(inputs / "truncated.jpg"),
                  empty(inputs / "zero.png")]
    infer_case("unreadable inputs", unreadable, "--input_dir", inputs, "--output_dir", "{out}",
          "--model_path", tiny_checkpoint())
    # inference.py: checkpoints that are not ours.
    plain = root / "plain_state_dict.pth"
    torch.save(torch.nn.Conv2d(3, 3, 1).state_dict(), plain)
    text = root / "notes.pth"
    text.write_text("hello, this is a text file\n")
    for case, path, what in (("model missing", root / "nothing.pth", "not found"),
                             ("model plain state dict", plain, "not a pix2pix checkpoint"),
                             ("model text file", text, "not a readable checkpoint")):
        infer_case(case, [path, what], "--input_dir", inputs, "--output_dir", "{out}",
              "--model_path", path)
    infer_case("input folder missing", [root / "no_inputs"], "--input_dir", root / "no_inputs",
          "--output_dir", "{out}", "--model_path", tiny_checkpoint())
    return root, cases


def command(cases, case, out):
    script, args, names = cases[1][case]
    return script, [str(a).replace("{out}", str(out)) for a in args], names


SCRIPTS = {"train.py": train, "inference.py": inference}
# Start-up (importing torch) costs seconds per subprocess, so every case runs in this process
# through the script's own run_cli(main); these run as real subprocesses as well.
AS_SUBPROCESS = ["corrupt image", "unreadable inputs"]


@pytest.fixture(scope="module")
def subprocess_runs(cases):
    root = cases[0]
    commands = {}
    for case in AS_SUBPROCESS:
        script, args, _ = command(cases, case, root / "script_out")
        commands[case] = (script, *args)
    return run_scripts(commands, cwd=root, parallel=2)


def run_in_process(script, args, capsys):
    """(exit status, stdout, stderr) of the script's main under run_cli, as from the shell; any
    exception other than a UserError escapes and fails the test with its traceback."""
    capsys.readouterr()
    try:
        run_cli(SCRIPTS[script].main, args)
        status = 0
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([sys.executable, script], status, out, err)


@pytest.mark.parametrize("case", CASES)
def test_clean_failure(cases, case, capsys, monkeypatch):
    root = cases[0]
    monkeypatch.chdir(root)  # the runs' relative tmp/ paths
    script, args, names = command(cases, case, root / "in_process_out")
    result = run_in_process(script, args, capsys)
    assert_clean_failure(result, *names)
    if script == "train.py":
        assert result.returncode == 2  # run_cli's status for a user error
        assert not (root / "tmp" / "c" / "latest.pth").exists()


@pytest.mark.parametrize("case", AS_SUBPROCESS)
def test_clean_failure_as_script(cases, subprocess_runs, case):
    assert_clean_failure(subprocess_runs[case], *cases[1][case][2])


def test_unreadable_inputs_do_not_stop_the_others(cases, subprocess_runs):
    root, _ = cases
    result = subprocess_runs["unreadable inputs"]
    _, _, unreadable = cases[1]["unreadable inputs"]
    assert result.returncode == 1
    assert sorted(p.name for p in (root / "script_out").iterdir()) == ["good1.png", "good2.png"]
    assert "wrote 2 image(s)" in result.stdout and "3 could not be read" in result.stdout
    for path in unreadable:  # one line each, naming the file
        assert sum(str(path) in line for line in result.stderr.splitlines()) == 1


# --- Checkpoints and flags, in this process -------------------------------------------------


def test_checkpoint_variants(tmp_path, tiny_checkpoint):
    good = torch.load(tiny_checkpoint(), weights_only=True)
    variants = {
        "empty.pth": b"",
        "truncated.pth": tiny_checkpoint().read_bytes()[:2000],
        "garbage.pth": bytes(range(256)) * 4,
    }
    for name, data in variants.items():
        (tmp_path / name).write_bytes(data)
    torch.save({**good, "format": "someone-else"}, tmp_path / "foreign.pth")
    torch.save({k: v for k, v in good.items() if k != "generator"}, tmp_path / "no_gen.pth")
    wider = {**good, "config": {**good["config"], "model": {**good["config"]["model"],
                                                            "generator_channels": 16}}}
    torch.save(wider, tmp_path / "mismatch.pth")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled_module.pth")
    (tmp_path / "folder.pth").mkdir()
    expected = {"empty.pth": "empty", "truncated.pth": "truncated or corrupt",
                "garbage.pth": "not a readable checkpoint", "foreign.pth": "not a pix2pix",
                "no_gen.pth": "no generator", "mismatch.pth": "do not fit",
                "pickled_module.pth": "refused", "folder.pth": "is a folder"}
    for name, message in expected.items():
        with pytest.raises(UserError, match=message) as error:
            inference.load_generator(tmp_path / name)
        assert str(tmp_path / name) in str(error.value)
        assert "\n" not in str(error.value)


def test_newer_checkpoint_version_is_refused(tmp_path, tiny_checkpoint):
    good = torch.load(tiny_checkpoint(), weights_only=True)
    torch.save({**good, "version": 99}, tmp_path / "future.pth")
    with pytest.raises(UserError, match="version 99"):
        load_checkpoint(tmp_path / "future.pth")


@pytest.mark.parametrize("argv, flag", [(["--batch_size", "0"], "--batch_size"),
                                        (["--precision", "fp16", "--device", "cpu"],
                                         "--precision")])
def test_inference_flags(tmp_path, tiny_checkpoint, argv, flag):
    save_image(draw_label_map(16, 16, np.random.default_rng(0)), tmp_path / "in" / "a.png")
    with pytest.raises(UserError, match=flag):
        inference.main(["--input_dir", str(tmp_path / "in"), "--output_dir",
                        str(tmp_path / "out"), "--model_path", str(tiny_checkpoint()), *argv])


def test_paired_folder_without_inputs(tmp_path, tiny_checkpoint):
    save_image(np.zeros((8, 8, 3), np.uint8), tmp_path / "in" / "a_target.png")
    with pytest.raises(UserError, match="no label maps to translate"):
        inference.main(["--input_dir", str(tmp_path / "in"), "--output_dir",
                        str(tmp_path / "out"), "--model_path", str(tiny_checkpoint())])


def test_output_dir_that_is_a_file(tmp_path, tiny_checkpoint):
    save_image(np.zeros((8, 8, 3), np.uint8), tmp_path / "in" / "a.png")
    (tmp_path / "taken").write_text("")
    with pytest.raises(UserError, match="taken"):
        inference.main(["--input_dir", str(tmp_path / "in"), "--output_dir",
                        str(tmp_path / "taken"), "--model_path", str(tiny_checkpoint())])
