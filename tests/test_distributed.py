"""DDP under torchrun: two CPU processes with Gloo on a tiny synthetic set.

Each launch runs tests/ddp_worker.py, which is train.py's main plus a record of the weights
every process trained from and ended with. A launch costs a few seconds, so each test makes
one and checks several things on it.
"""

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import distributed
import train
from checkpoints import load_checkpoint
from config import TrainConfig
from inference import load_generator
from loaders import EpochSampler
from models import build_discriminator, build_generator
from utils import UserError

from conftest import TINY_TRAINING, as_flags, run_outputs

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "ddp_worker.py"
# The batch size is each test's own (per process under torchrun).
TINY = {**{k: v for k, v in TINY_TRAINING.items() if k != "batch_size"},
        # The paper's generator without weight averaging: the cancelled-bias count below is
        # about its layers, and the saved generator is then the trained one (the EMA has its
        # own tests in test_levers.py).
        "upsample": "transposed", "ema_decay": 0.0}
# Per sample, nothing random and nothing shared within a batch: the same global batch gives the
# same gradients whether it is split over processes or not. (OASIS weighs its classes by their
# pixels in each process's batch, as batch norm takes each process's statistics: hinge here.)
DETERMINISTIC = dict(norm="instance", dropout=False, crop=False, flip=False, gan_loss="hinge")
LAUNCH_SECONDS = 120


@dataclass
class Launch:
    returncode: int
    output: str  # stdout and stderr of torchrun and both processes
    seconds: float
    ranks: list  # what each process saved at its end (see tests/ddp_worker.py)


def torchrun(out, flags, env=None, interrupt_once=None):
    """Two processes of tests/ddp_worker.py writing into `out`; with `interrupt_once` (a path),
    Ctrl-C is sent to torchrun as soon as that file exists."""
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(WORKER), str(out), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    output_file = out.parent / f"{out.name}.output.txt"  # a file: a full pipe would block
    start = time.monotonic()
    with open(output_file, "w") as output:
        process = subprocess.Popen(command, cwd=out, env=env, stdout=output,
                                   stderr=subprocess.STDOUT)
        try:
            while interrupt_once and not Path(interrupt_once).exists() and \
                    process.poll() is None and time.monotonic() - start < LAUNCH_SECONDS:
                time.sleep(0.1)
            if interrupt_once and process.poll() is None:
                process.send_signal(signal.SIGINT)
            process.wait(timeout=max(1.0, LAUNCH_SECONDS - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            process.terminate()  # torchrun stops its processes (SIGTERM, SIGKILL after 30 s)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
            pytest.fail(f"torchrun did not finish in {LAUNCH_SECONDS} s (a hang?)\n"
                        f"{output_file.read_text()[-3000:]}")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True)
             for r in range(2) if (out / f"rank{r}.pt").exists()]
    return Launch(process.returncode, output_file.read_text(), time.monotonic() - start, ranks)


def assert_succeeded(launch):
    assert launch.returncode == 0, launch.output[-5000:]


def parameters(record):
    """(network.key, tensor) of both networks' parameters; the batch-norm running statistics,
    which stay per process (only rank 0's are saved), are left out."""
    for net in ("generator", "discriminator"):
        for key, value in record[net].items():
            if not ("running_" in key or "num_batches_tracked" in key):
                yield f"{net}.{key}", value


def assert_identical(a, b):
    for (name, value), (_, other) in zip(parameters(a), parameters(b), strict=True):
        assert torch.equal(value, other), (name, (value - other).abs().max().item())


def assert_same_training(a, b, start, skip=()):
    """`a` and `b` trained from `start` alike: they differ by at most 0.1% of how far `b` moved
    (rounding alone, e.g. 1 vs 2 threads, gives about 0.004% here; Adam makes small rounding
    differences of tiny gradients into visible ones, so bitwise equality is not expected)."""
    moved = dict(parameters(start))
    for (name, value), (_, other) in zip(parameters(a), parameters(b), strict=True):
        if name not in skip:
            distance = (value - other).norm() / (other - moved[name]).norm()
            assert distance < 1e-3, (name, distance.item())


def cancelled_biases(options):
    """Convolution biases that the instance norm right after them subtracts again.

    Their gradient is zero but for rounding, and Adam scales rounding noise up to full-size
    steps, so their values are noise (which changes no output): not comparable across runs.
    """
    model_config = TrainConfig(**options).model_config()
    names = set()
    for net, module in (("generator", build_generator(model_config)),
                        ("discriminator", build_discriminator(model_config))):
        for block_name, block in module.named_modules():
            if not isinstance(block, nn.Sequential):
                continue
            for (name, layer), (_, after) in itertools.pairwise(block.named_children()):
                if isinstance(after, nn.InstanceNorm2d) and getattr(layer, "bias", None) \
                        is not None:
                    names.add(f"{net}.{block_name}.{name}.bias")
    return names


def read_log(path):
    return json.loads(Path(path).read_text())


# --- Without launching ----------------------------------------------------------------------

def test_two_shards_of_batch_b_hold_the_single_process_batch_of_2b():
    batch = 2
    single = EpochSampler(8, seed=3)
    shards = [EpochSampler(8, seed=3, rank=r, world_size=2) for r in range(2)]
    for epoch in (0, 1):
        for sampler in (single, *shards):
            sampler.set_epoch(epoch)
        order = [i for _, i in single]
        rank_orders = [[i for _, i in shard] for shard in shards]
        assert rank_orders == [order[0::2], order[1::2]]
        for step in range(2):
            split = {i for rank in rank_orders for i in rank[step * batch:(step + 1) * batch]}
            assert split == set(order[step * 2 * batch:(step + 1) * 2 * batch])
    assert {e for e, _ in shards[1]} == {1}  # the epoch travels with every key


def test_sync_batchnorm_is_refused_on_the_cpu(monkeypatch):
    config = TrainConfig(device="cpu", sync_batchnorm=True)
    with pytest.raises(UserError, match="SyncBatchNorm does not run on the CPU"):
        distributed.setup(config)  # one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserError, match="SyncBatchNorm does not run on the CPU"):
        distributed.setup(config)  # under torchrun: refused before joining the process group
    assert not torch.distributed.is_initialized()


# --- Two processes --------------------------------------------------------------------------

def test_two_processes_of_batch_b_train_like_one_process_of_batch_2b(tmp_path, demo_set):
    options = dict(TINY, **DETERMINISTIC, data_dir=str(demo_set), epochs=2, lr=2e-3)
    launch = torchrun(tmp_path / "ddp", as_flags(
        dict(options, batch_size=2, **run_outputs(tmp_path / "ddp"))))
    assert_succeeded(launch)
    ranks = launch.ranks
    single = TrainConfig(**options, batch_size=4, **run_outputs(tmp_path / "single"))
    summary = train.train(single)

    # The processes hold the same weights, and those of one process with twice the batch.
    assert len(ranks) == 2
    assert_identical(ranks[0], ranks[1])
    assert ranks[0]["summary"]["step"] == summary["step"] == 4
    reference = load_checkpoint(Path(single.checkpoint_dir) / "latest.pth")
    skip = cancelled_biases(options)
    assert len(skip) == 3 + 4 + 3  # down2-4 and up2-5 in the generator, conv2-4 in the D
    assert_same_training(ranks[0], reference, ranks[0]["start"], skip)

    # Rank 0 alone wrote one log, one set of checkpoints and the samples.
    out = tmp_path / "ddp"
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoints", "log.json", "rank0.pt", "rank1.pt", "samples"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "generator.pth", "latest.pth"]
    assert len(list((out / "samples").iterdir())) == 2  # one grid per epoch
    saved = load_checkpoint(out / "checkpoints" / "latest.pth")
    assert_identical(ranks[0], saved)
    assert launch.output.count("8 pairs, layout") == 1  # printed by rank 0 only
    assert launch.output.count("val L1") == 2  # once per epoch

    # Logged losses and validation are means over both processes: those of the big batch.
    ddp_log, single_log = read_log(out / "log.json"), read_log(single.log_file)
    assert [e["step"] for e in ddp_log["steps"]] == [1, 2, 3, 4]
    for a, b in zip(ddp_log["steps"], single_log["steps"]):
        for name in ("g_adv", "g_l1", "d_real", "d_fake"):
            assert a[name] == pytest.approx(b[name], rel=1e-4), (a["step"], name)
    for a, b in zip(ddp_log["epochs"], single_log["epochs"]):
        assert a["val_l1"] == pytest.approx(b["val_l1"], rel=1e-4)


def test_checkpoints_move_between_one_and_two_processes(tmp_path, demo_set):
    """Batch norm, dropout and augmentation on: the processes still agree on every parameter.
    At 64x64 the U-Net has a dropout layer (at 32x32 none)."""
    options = dict(TINY, data_dir=str(demo_set), batch_size=2, image_size=64)
    first = TrainConfig(**options, epochs=1, **run_outputs(tmp_path / "one"))
    assert train.train(first)["step"] == 4
    single_latest = Path(first.checkpoint_dir) / "latest.pth"

    # One process -> two: resume its latest.pth under torchrun, continuing its log.
    two = tmp_path / "two"
    two.mkdir()
    shutil.copy(first.log_file, two / "log.json")
    (two / "checkpoints").mkdir()  # the run moves here: a resume writes where its flags say
    shutil.copy(single_latest, two / "checkpoints" / "latest.pth")
    launch = torchrun(two, ["--resume", str(two / "checkpoints" / "latest.pth"), "--epochs", "3",
                            *as_flags(run_outputs(two))])
    assert_succeeded(launch)
    ranks = launch.ranks
    checkpoint = load_checkpoint(single_latest)
    assert len(ranks) == 2
    for record in ranks:
        assert record["summary"]["step"] == 4 + 2 * 2  # 2 epochs of 2 steps per process
        for key, value in checkpoint["generator"].items():  # each trained from the checkpoint
            assert torch.equal(record["start"]["generator"][key], value), key
    assert_identical(ranks[0], ranks[1])
    assert [e["step"] for e in read_log(two / "log.json")["steps"]] == list(range(1, 9))

    # Two processes -> one: inference and resume.
    two_latest = two / "checkpoints" / "latest.pth"
    generator, saved_config = load_generator(two / "checkpoints" / "generator.pth")
    for key, value in generator.state_dict().items():
        assert torch.equal(value, ranks[0]["generator"][key]), key
    assert saved_config["norm"] == "batch"
    summary = train.main(["--resume", str(two_latest), "--epochs", "4",
                          *as_flags(run_outputs(tmp_path / "back"))])
    assert summary["step"] == 8 + 4 and summary["epoch"] == 4
    assert load_checkpoint(tmp_path / "back" / "checkpoints" / "latest.pth")["step"] == 12


def test_a_failing_process_ends_the_run_with_its_message(tmp_path, demo_set):
    out = tmp_path / "fail"
    flags = as_flags(dict(TINY, data_dir=str(demo_set), batch_size=2, epochs=5, **run_outputs(out)))
    launch = torchrun(out, flags, env={"DDP_TEST_FAIL_RANK": "1", "DDP_TEST_FAIL_STEP": "3"})
    assert launch.returncode != 0
    assert "injected failure on rank 1 at step 3" in launch.output, launch.output[-5000:]
    assert launch.seconds < 60, f"{launch.seconds:.0f} s: the other process was left waiting"
    assert launch.ranks == []  # neither process got to the end
    # The checkpoint of the last completed epoch is intact.
    assert load_checkpoint(out / "checkpoints" / "latest.pth")["step"] == 2


def test_ctrl_c_stops_both_processes_at_the_same_step_and_saves(tmp_path, demo_set):
    out = tmp_path / "stop"
    flags = as_flags(dict(TINY, data_dir=str(demo_set), batch_size=2, epochs=1000,
                          **run_outputs(out)))
    launch = torchrun(out, flags, interrupt_once=out / "log.json")  # after the first step
    # torchrun itself exits non-zero on a signal; its processes end their step, save, return.
    assert len(launch.ranks) == 2, launch.output[-5000:]
    summaries = [record["summary"] for record in launch.ranks]
    assert summaries[0] == summaries[1] and summaries[0]["interrupted"]
    latest = load_checkpoint(out / "checkpoints" / "latest.pth")
    assert latest["step"] == summaries[0]["step"] < 2000
    assert_identical(launch.ranks[0], launch.ranks[1])
    assert_identical(launch.ranks[0], latest)
    assert launch.output.count("interrupted at step") == 1
