"""The speed options give the same results as plain fp32: bf16 autocast, channels-last, fused
Adam, torch.compile, the cached loader, and inference's overlapped file work and batching. Plus
a smoke run of the speed benchmark at tiny sizes. No timings are asserted: only behaviour."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import distributed
import inference
import train
from checkpoints import load_checkpoint
from config import TrainConfig
from loaders import build_train_loader, build_val_dataset
from models import build_generator

from conftest import TINY_TRAINING, tiny_config, tiny_model

ROOT = Path(__file__).resolve().parents[1]
TINY = {**TINY_TRAINING, "epochs": 1, "max_steps": 3, "dropout": False}
# Inductor's C++ build takes about a minute even for the tiny model on a small CPU.
# Runs in CI (CI=true); elsewhere opt in, since the first inductor build takes about a minute.
FULL_COMPILE = os.environ.get("PIX2PIX_TEST_COMPILE") == "1" or bool(os.environ.get("CI"))


def run_tiny(tmp_path, data_dir, name, **options):
    """Three steps of the real loop; the per-step losses from its log and the summary."""
    config = tiny_config(Path(tmp_path) / name, data_dir, **{**TINY, **options})
    summary = train.train(config)
    steps = json.loads(Path(config.log_file).read_text())["steps"]
    return [[s[k] for k in ("g_adv", "g_l1", "d_real", "d_fake")] for s in steps], summary


def assert_close_losses(a, b, rel):
    assert len(a) == len(b)
    for step_a, step_b in zip(a, b):
        assert all(math.isfinite(v) for v in step_b)
        assert step_b == pytest.approx(step_a, rel=rel, abs=1e-3)


# --- Training options ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, demo_set):
    return run_tiny(tmp_path_factory.mktemp("fp32"), demo_set, "fp32", fused_adam=False)


def test_bf16_autocast_on_cpu_trains_like_fp32(tmp_path, demo_set, fp32_run):
    losses, summary = run_tiny(tmp_path, demo_set, "bf16", precision="bf16")
    # bf16 keeps 8 bits of mantissa: the losses agree to a few percent, not to the last bit.
    assert_close_losses(fp32_run[0], losses, rel=0.05)
    assert summary["step"] == 3


def test_channels_last_and_fused_adam_match_fp32(tmp_path, demo_set, fp32_run):
    losses, _ = run_tiny(tmp_path, demo_set, "fast", channels_last="on", fused_adam=True)
    assert_close_losses(fp32_run[0], losses, rel=1e-3)


def test_channels_last_reaches_weights_inputs_and_outputs():
    config = TrainConfig(**{**TINY, "channels_last": "on"})
    runtime = distributed.Runtime(device=torch.device("cpu"), channels_last=True)
    generator = distributed.prepare(build_generator(config.model_config()), config, runtime)
    conv = generator.encoder["down2"].conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    x = runtime.to_device(torch.rand(2, 3, 32, 32))
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert generator(x).is_contiguous(memory_format=torch.channels_last)


def test_fused_adam_takes_the_same_steps():
    def steps(fused):
        torch.manual_seed(0)
        model = build_generator(tiny_model(dropout=False))
        config = TrainConfig(**{**TINY, "fused_adam": fused})
        optimizer = train.build_adam(model, config, torch.device("cpu"))
        assert bool(optimizer.param_groups[0]["fused"]) is fused
        x = torch.rand(2, 3, 32, 32)
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            optimizer.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.allclose(steps(True), steps(False), rtol=1e-5, atol=1e-7)


def test_step_in_backward_makes_the_same_updates(tmp_path, demo_set, monkeypatch):
    """The generator updated parameter by parameter during backward ends where the usual
    optimizer.step() after backward does: same weights, same Adam state, same losses."""
    # Equal results are the point, so nothing shows the option applied: a spy does.
    installed, real = [], train.step_in_backward
    monkeypatch.setattr(train, "step_in_backward",
                        lambda *args: installed.append(real(*args)) or installed[-1])
    runs = {}
    for on in (True, False):
        losses, _ = run_tiny(tmp_path, demo_set, f"in_backward_{on}", step_in_backward=on,
                             dropout=True)
        checkpoint = load_checkpoint(tmp_path / f"in_backward_{on}" / "checkpoints" / "latest.pth")
        runs[on] = losses, checkpoint
    assert installed == [True, False]
    assert runs[True][0] == runs[False][0]
    for name, value in runs[False][1]["generator"].items():
        assert torch.equal(runs[True][1]["generator"][name], value), name
    states = [c["generator_optimizer"]["state"] for _, c in (runs[True], runs[False])]
    assert states[0].keys() == states[1].keys()
    for key in states[1]:
        for field, value in states[1][key].items():
            assert torch.equal(states[0][key][field], value), (key, field)


@pytest.mark.parametrize("in_backward", [False, True])
def test_no_gradient_outlives_its_optimizer_step(tmp_path, demo_set, in_backward):
    """Gradients are freed as soon as their update is made, not kept through the next step's
    forward passes (where they would add the generator's 218 MB to the peak)."""
    # Not observable on the CPU (it is GPU peak memory): torch's global hooks see every
    # optimiser step and every module's forward pass, whatever the loop calls them.
    from torch.nn.modules.module import register_module_forward_pre_hook
    from torch.optim.optimizer import register_optimizer_step_post_hook
    trained, held = set(), []

    def stepped(optimizer, args, kwargs):
        trained.update(p for group in optimizer.param_groups for p in group["params"])

    def forward(module, args):
        if trained:  # from the first update on
            held.append(any(p.grad is not None for p in trained))

    with register_optimizer_step_post_hook(stepped), register_module_forward_pre_hook(forward):
        run_tiny(tmp_path, demo_set, "freed", step_in_backward=in_backward)
    assert held and not any(held)
    assert all(p.grad is None for p in trained)


@pytest.mark.parametrize("where, applies", [(dict(), True), (dict(world_size=2), False),
                                            (dict(precision="fp16"), False)])
def test_step_in_backward_stays_off_under_ddp_and_fp16(where, applies):
    """--step_in_backward asked for: one fp32 process updates during backward (the control),
    under DDP or fp16 backward leaves every gradient for optimizer.step() and no weight moves."""
    model = build_generator(tiny_model())
    config = TrainConfig(**{**TINY, "precision": where.get("precision", "fp32"),
                            "step_in_backward": True})
    runtime = distributed.Runtime(device=torch.device("cpu"), world_size=where.get("world_size", 1),
                         precision=config.precision)
    optimizer = train.build_adam(model, config, runtime.device)
    assert train.step_in_backward(model, optimizer, config, runtime) is applies
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.rand(2, 3, 32, 32)).square().mean().backward()
    if applies:  # updated and freed during backward
        assert all(p.grad is None for p in model.parameters())
        assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    else:
        assert all(p.grad is not None for p in model.parameters())  # left for optimizer.step()
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_compile_traces_the_training_step(tmp_path, demo_set, fp32_run, monkeypatch):
    """The loop through torch.compile's graph capture (the eager backend: no C++ build, so it
    stays fast); PIX2PIX_TEST_COMPILE=1 uses the real inductor backend instead."""
    if not FULL_COMPILE:
        compile_ = torch.compile
        monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend="eager"))
    torch._dynamo.reset()
    losses, _ = run_tiny(tmp_path, demo_set, "compiled", compile=True)
    assert_close_losses(fp32_run[0], losses, rel=1e-3)


def test_cached_loader_gives_the_same_batches_and_caches_validation(demo_set):
    config = TrainConfig(**{**TINY, "data_dir": str(demo_set), "cache": "off"})
    cached_config = TrainConfig(**{**TINY, "data_dir": str(demo_set), "cache": "on"})
    runtime = distributed.Runtime(device=torch.device("cpu"))
    (plain, plain_sampler), (cached, cached_sampler) = (build_train_loader(c, runtime)
                                                        for c in (config, cached_config))
    plain_sampler.set_epoch(1)
    cached_sampler.set_epoch(1)
    for a, b in zip(plain, cached):
        assert torch.equal(a["source"], b["source"]) and torch.equal(a["target"], b["target"])
    plain_val = build_val_dataset(config, runtime, plain.dataset)
    cached_val = build_val_dataset(cached_config, runtime, cached.dataset)
    assert plain_val.cache is None and cached_val.cache is not None
    assert torch.equal(plain_val[1]["target"], cached_val[1]["target"])


# --- Inference options --------------------------------------------------------------------

def translate(generator, arrays, **options):
    config = {"model": tiny_model().to_dict()}
    return inference.Translator(generator, config, "cpu", **options).translate(arrays)


@pytest.fixture(scope="module")
def generator_and_inputs():
    torch.manual_seed(0)
    generator = build_generator(tiny_model()).eval()
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    return generator, arrays


def test_bf16_and_channels_last_inference_match_fp32(generator_and_inputs):
    generator, arrays = generator_and_inputs
    reference = translate(generator, arrays)
    fast = translate(inference.optimize_generator(generator, channels_last=True), arrays,
                     precision="bf16", channels_last=True)
    for a, b in zip(reference, fast):
        assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
        # Outputs are uint8 levels: bf16 rounding moves a few of them by a level or two.
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 4


def test_bf16_use_casts_the_batch_norm_folded_weights_once(generator_and_inputs):
    """For use in bf16 the generator's weights are bf16 already (autocast casts none of them
    at each call) and batch norm is folded away; its photos stay within bf16 rounding of
    fp32's. The paper's test mode (batch statistics) keeps the network as trained."""
    generator, arrays = generator_and_inputs
    fast = inference.optimize_generator(generator, precision="bf16")
    assert {p.dtype for p in fast.parameters()} == {torch.bfloat16}
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert {p.dtype for p in generator.parameters()} == {torch.float32}  # the original kept
    for a, b in zip(translate(generator, arrays), translate(fast, arrays, precision="bf16")):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 4
    as_trained = inference.optimize_generator(generator, precision="bf16", freeze=False)
    assert as_trained is generator


def test_inference_folds_batch_norm_unless_told_not_to(tmp_path, tiny_checkpoint):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(inputs / "a.png")
    checkpoint = str(tiny_checkpoint(image_size=32))
    for name, flags in {"folded": [], "as_trained": ["--no_fold_batch_norm"]}.items():
        inference.main(["--input_dir", str(inputs), "--output_dir", str(tmp_path / name),
                        "--model_path", checkpoint, "--input_layout", "labels",
                        "--precision", "fp32", *flags])
    folded, as_trained = (np.asarray(Image.open(tmp_path / name / "a.png")).astype(int)
                          for name in ("folded", "as_trained"))
    assert np.abs(folded - as_trained).max() <= 1  # fp32 rounding, at most one level


def test_inference_compile_flag_compiles_and_freezes(tmp_path, tiny_checkpoint, monkeypatch):
    import torch._inductor.config as inductor_config
    compiled = []
    compile_ = torch.compile

    # A spy: compiling shows only in speed (the outputs are asserted equal).
    def spy(model, **options):  # graph capture only: no C++ build
        compiled.append(model)
        return compile_(model, backend="eager")
    monkeypatch.setattr(torch, "compile", spy)
    monkeypatch.setattr(inductor_config, "freezing", False)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(inputs / "a.png")
    for name, flags in {"eager": [], "compiled": ["--compile"]}.items():
        inference.main(["--input_dir", str(inputs), "--output_dir", str(tmp_path / name),
                        "--model_path", str(tiny_checkpoint(image_size=32)),
                        "--input_layout", "labels", *flags])
    assert len(compiled) == 1 and inductor_config.freezing
    assert np.array_equal(np.asarray(Image.open(tmp_path / "eager" / "a.png")),
                          np.asarray(Image.open(tmp_path / "compiled" / "a.png")))


@pytest.mark.skipif(not FULL_COMPILE, reason="inductor's C++ build takes about a minute; "
                    "set PIX2PIX_TEST_COMPILE=1")
def test_compiled_frozen_generator_matches_eager(generator_and_inputs):
    generator, arrays = generator_and_inputs
    torch._dynamo.reset()
    twin = build_generator(tiny_model()).eval()
    twin.load_state_dict(generator.state_dict())  # before compiling: freezing packs the weights
    compiled = inference.optimize_generator(twin, compile=True)
    for a, b in zip(translate(generator, arrays), translate(compiled, arrays)):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_overlapped_file_work_and_batching_write_the_same_pngs(tmp_path, tiny_checkpoint):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(1)
    for k in range(5):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            inputs / f"{k}.png")
    checkpoint = tiny_checkpoint(image_size=32)
    outputs = {}
    for name, flags in {"serial": ["--io_threads", "0", "--batch_size", "1"],
                        "overlapped": ["--io_threads", "2", "--batch_size", "2",
                                       "--png_compression", "1"]}.items():
        inference.main(["--input_dir", str(inputs), "--output_dir", str(tmp_path / name),
                        "--model_path", str(checkpoint), "--input_layout", "labels", *flags])
        outputs[name] = {p.name: np.asarray(Image.open(p))
                         for p in sorted((tmp_path / name).glob("*.png"))}
    assert list(outputs["serial"]) == [f"{k}.png" for k in range(5)]
    assert outputs["serial"].keys() == outputs["overlapped"].keys()
    for key, array in outputs["serial"].items():
        assert np.array_equal(array, outputs["overlapped"][key])


def test_a_failed_read_is_reported_and_the_rest_is_written(tmp_path, tiny_checkpoint, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for k in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * k, np.uint8)).save(inputs / f"{k}.png")
    (inputs / "1.png").write_bytes(b"not an image")
    with pytest.raises(SystemExit) as stopped:
        inference.main(["--input_dir", str(inputs), "--output_dir", str(tmp_path / "out"),
                        "--model_path", str(tiny_checkpoint(image_size=32)),
                        "--input_layout", "labels", "--batch_size", "2"])
    assert stopped.value.code == 1
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["0.png", "2.png"]
    assert "1.png" in capsys.readouterr().err


# --- The benchmark --------------------------------------------------------------------------

def test_benchmark_runs_end_to_end_at_tiny_size(tmp_path):
    output = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmark.speed", "--configs", "fp32,bf16+fused+cl+data",
         "--image_size", "32", "--channels", "8", "--batch_sizes", "1,2",
         "--infer_batch_sizes", "1", "--steps", "1", "--warmup_steps", "1", "--repeats", "1",
         "--infer_images", "3", "--device", "cpu", "--output", str(output)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(output.read_text())
    flops = results["flops"]["default"]
    # Two batch sizes: the FLOP count trains once per size in one run folder.
    assert flops["train_step"]["1"] > 0 and flops["train_step"]["2"] > flops["train_step"]["1"]
    assert flops["generator_forward"] > 0
    for part in ("train", "inference", "forward"):
        rows = {row["config"]: row for row in results[part]}
        assert set(rows) == {"fp32", "bf16+fused+cl+data"}
        assert all(row["img_s"]["median"] > 0 and row["gflop_s"] > 0 for row in rows.values())
    assert results["train"][0]["x_plain"] == 1.0
    assert results["train"][0]["peak_mib"]["median"] > 0
    assert len(results["loader"]) == 2 * 2  # configurations x batch sizes
    profile = {row["config"]: row for row in results["profile"]}
    assert set(profile) == {"fp32", "bf16+fused+cl+data"}
    for row in profile.values():  # convolutions and Adam both found, within the step's time
        assert 0 < row["convolution_share"] < 1 and 0 < row["optimizer_share"] < 1
        assert row["convolution_s"] + row["optimizer_s"] < row["step_s"]
        assert row["ceiling_x_plain"] > 0
    assert "Training: train.py at steady state" in done.stdout
    assert "Where a training step's time goes" in done.stdout


def test_benchmark_rejects_an_unknown_option():
    done = subprocess.run([sys.executable, "-m", "benchmark.speed", "--configs", "fp32+fast",
                           "--device", "cpu"], capture_output=True, text=True, timeout=120,
                          check=False, cwd=ROOT)
    assert done.returncode != 0
    assert "unknown option 'fast'" in done.stderr and "Traceback" not in done.stderr
