"""The CUDA surface: each precision, channels_last, compile, pinned memory, a resume that moves
between the CPU and a GPU, and two-process NCCL DDP. Skipped without a GPU (the project's CI
has none); `python -m benchmark.cuda_check` runs them with a short GPU benchmark."""

import json
import math
from pathlib import Path

import pytest
import torch

import distributed
import inference
import loaders
import train
from checkpoints import load_checkpoint

from conftest import as_flags, output_flags, run_outputs, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


def losses(config):
    return [(e["g_l1"], e["d_real"]) for e in
            json.loads(Path(config.log_file).read_text())["steps"]]


def finite_checkpoint(path):
    checkpoint = load_checkpoint(path)
    return all(v.isfinite().all() for v in checkpoint["generator"].values()
               if v.is_floating_point())


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "fp16", "auto"])
def test_training_runs_in_each_precision(tmp_path, demo_set, precision):
    config = tiny_config(tmp_path, demo_set, epochs=2, device="cuda", precision=precision,
                         image_size=64)
    summary = train.train(config)
    assert summary["step"] == 8 and math.isfinite(summary["val_l1"])
    assert finite_checkpoint(Path(config.checkpoint_dir) / "latest.pth")
    assert all(math.isfinite(a) and math.isfinite(b) for a, b in losses(config))
    if precision == "fp16":  # two optimisers, one scaler: its state is saved and moves on
        scaler = load_checkpoint(Path(config.checkpoint_dir) / "latest.pth")["scaler"]
        assert scaler["scale"] > 0 and scaler["_growth_tracker"] >= 0


def test_fp32_on_cuda_means_no_tf32(tmp_path, demo_set):
    train.train(tiny_config(tmp_path, demo_set, epochs=1, device="cuda", precision="fp32"))
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


def test_channels_last_compile_and_pinned_memory(tmp_path, demo_set):
    config = tiny_config(tmp_path, demo_set, epochs=1, device="cuda", precision="bf16",
                         channels_last="on", compile=True, step_in_backward=True)
    runtime = distributed.Runtime(device=torch.device("cuda"))
    loader, _ = loaders.build_train_loader(config, runtime)
    assert loader.pin_memory
    assert train.train(config)["step"] == 4


def test_a_run_moves_between_the_cpu_and_a_gpu(tmp_path, demo_set):
    config = tiny_config(tmp_path, demo_set, epochs=3, max_steps=4, device="cpu")
    train.train(config)
    latest = Path(config.checkpoint_dir) / "latest.pth"
    assert train.main(["--resume", str(latest), "--device", "cuda", "--max_steps", "8",
                       *output_flags(config)])[
        "step"] == 8
    assert train.main(["--resume", str(latest), "--device", "cpu", "--max_steps", "0",
                       *output_flags(config)])[
        "step"] == 12
    generator, _ = inference.load_generator(Path(config.checkpoint_dir) / "generator.pth",
                                            "cuda")
    assert next(generator.parameters()).is_cuda


def test_inference_on_cuda_in_each_precision(tmp_path, tiny_checkpoint):
    from PIL import Image
    (tmp_path / "in").mkdir()
    Image.new("RGB", (48, 40), (128, 64, 128)).save(tmp_path / "in" / "a.png")
    for precision in ("fp32", "tf32", "bf16", "fp16"):
        out = tmp_path / precision
        inference.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(out),
                        "--model_path", str(tiny_checkpoint()), "--device", "cuda",
                        "--precision", precision, "--channels_last"])
        assert Image.open(out / "a.png").size == (48, 40)


@needs_two
def test_two_process_nccl_ddp(tmp_path, demo_set):
    from test_distributed import TINY, assert_identical, torchrun
    flags = as_flags(dict(TINY, data_dir=str(demo_set), batch_size=2, epochs=2, image_size=64,
                          device="cuda", **run_outputs(tmp_path / "ddp")))
    launch = torchrun(tmp_path / "ddp", flags)
    assert launch.returncode == 0, launch.output[-5000:]
    assert_identical(launch.ranks[0], launch.ranks[1])
