"""The speed benchmark's measurements, each run in a subprocess of its own so that its peak
memory is its own: training through train.py, the loader alone, the bare generator forward,
inference.py on a folder, and the FLOP count. `run_child` starts one and watches its memory.
"""

import contextlib
import io
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# --- Measurements, each run in a subprocess of its own ------------------------------------------

def child_train(spec):
    import train
    train.main(spec["argv"])


def child_loader(spec):
    """Images/s of the training loader alone (what the model would be fed at best)."""
    import distributed
    from config import TrainConfig
    from loaders import build_train_loader
    results = {}
    for batch_size in spec["batch_sizes"]:
        config = TrainConfig(**{**spec["config"], "batch_size": batch_size})
        runtime = distributed.setup(config)
        loader, sampler = build_train_loader(config, runtime)
        sampler.set_epoch(0)
        times, start = [], time.perf_counter()
        for i, _ in enumerate(loader):  # the first batch waits for the workers to start
            now = time.perf_counter()
            times.append(now - start)
            start = now
            if i + 1 == spec["batches"]:
                break
        del loader
        results[batch_size] = batch_size / statistics.median(times[1:] or times)
    return {"loader_img_s": results}


def child_forward(spec):
    """The bare generator: seconds per batch at each batch size (no file work)."""
    import torch

    import devices
    import inference
    device = torch.device(spec["device"])
    generator, _ = inference.load_generator(spec["checkpoint"], device)
    generator = inference.optimize_generator(generator, spec["channels_last"], spec["compile"],
                                             precision=spec["precision"], fold=spec["fold"])
    results = {}
    for batch_size in spec["batch_sizes"]:
        x = torch.rand(batch_size, 3, spec["image_size"], spec["image_size"], device=device)
        if spec["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        reset_peak(device)
        times = []
        for i in range(spec["warmup"] + spec["iterations"]):
            start = time.perf_counter()
            with torch.no_grad(), devices.autocast(device, spec["precision"]):
                generator(x).float()
            synchronize(device)
            times.append(time.perf_counter() - start)
        results[batch_size] = {"seconds": statistics.median(times[spec["warmup"]:]),
                               "first_s": times[0], **memory_report(device)}
    return {"forward": results}


def child_inference(spec):
    """inference.py on a folder, once per batch size (smallest first, so that each memory peak
    read after a run is that run's); the steady rate comes from the PNGs' modification times."""
    import torch

    import inference
    results = {}
    for batch_size in spec["batch_sizes"]:
        output = Path(spec["output_dir"]) / f"batch{batch_size}"
        reset_peak(torch.device(spec["device"]))
        start = time.time()
        with contextlib.redirect_stdout(io.StringIO()):
            inference.main([*spec["argv"], "--batch_size", str(batch_size),
                            "--output_dir", str(output)])
        wall = time.time() - start
        stamps = sorted(p.stat().st_mtime_ns / 1e9 for p in output.glob("*.png"))
        # From the first batch's last PNG (the warm-up done) to the last PNG.
        first = min(batch_size, len(stamps) - 1) - 1
        steady = (len(stamps) - 1 - first) / max(stamps[-1] - stamps[first], 1e-9)
        results[batch_size] = {"img_s": steady, "wall_s": wall, "images": len(stamps),
                               **memory_report(torch.device(spec["device"]))}
    return {"inference": results}


def child_flops(spec):
    """FLOPs of one real training step (train.py under FlopCounterMode, eager fp32) per batch
    size, and of one generator forward per image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import train
    from benchmark.configs import as_config_dict
    from config import TrainConfig
    from models import build_generator
    steps = {}
    for batch_size in spec["batch_sizes"]:
        # One run folder for every batch size: each run replaces the one before it.
        argv = [*spec["argv"], "--batch_size", str(batch_size), "--max_steps", "1", "--overwrite"]
        with FlopCounterMode(display=False) as counter, \
                contextlib.redirect_stdout(io.StringIO()):
            train.main(argv)
        steps[batch_size] = counter.get_total_flops()
    config = TrainConfig(**as_config_dict(spec["argv"]))
    generator = build_generator(config.model_config()).eval()
    x = torch.zeros(1, 3, config.image_size, config.image_size)
    with torch.no_grad():
        generator(x)  # inference's later calls: the resize-convolutions' kernels prepared once
        with FlopCounterMode(display=False) as counter:
            generator(x)
    return {"train_step": steps, "generator_forward": counter.get_total_flops()}


def child_profile(spec):
    """Where the time of a training step goes: train.py under torch.profiler for the steps after
    the warm-up; convolutions (self time of every convolution op, forward and backward), the
    optimiser steps (with everything they call), and the rest, in seconds per step."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    import train
    device = torch.device(spec["device"])
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    warmup, steps = spec["warmup_steps"], spec["steps"]
    first, window_edges = [], []

    def on_optimizer_step(optimizer, *_):
        # The discriminator's optimiser steps once per training step, and first (the
        # generator's may step once per parameter: --step_in_backward).
        if not first:
            first.append(optimizer)
        if optimizer is first[0]:
            synchronize(device)
            window_edges.append(time.perf_counter())
            profiler.step()

    with profile(activities=activities, schedule=schedule(
            wait=warmup - 1, warmup=1, active=steps, repeat=1)) as profiler:
        handle = register_optimizer_step_post_hook(on_optimizer_step)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                train.main(spec["argv"])
        finally:
            handle.remove()
    # An fp16 step skipped by the gradient scaler calls no optimiser: the window then starts a
    # step later (the benchmark runs a spare step); a window never closed reports nothing.
    events = profiler.key_averages() if profiler.step_num >= warmup + steps else []
    if not events:
        return {"profile": None}
    # The kinds' times are shares of the profiled window itself (from the profiler.step() that
    # opened it to the one that closed it), not of other steps: a training step timed from the
    # log is a different span, shifted by half a step, and the first steps after the warm-up
    # can still be slower (oneDNN creating kernels), so a share could exceed 1.
    window_s = (window_edges[warmup + steps - 1] - window_edges[warmup - 1]) / steps
    return {"profile": {**time_by_kind(events, device.type == "cuda", steps),
                        "step_s": window_s}}


# The resize-convolution's deep levels run as matrix products and col2im (models.py
# `resize_conv_by_taps`): convolution work too. The networks have no other matrix products.
TAP_PRODUCT_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::col2im", "aten::im2col"}


def time_by_kind(events, on_gpu, steps):
    """Seconds per step in convolutions (with the tap products) and in optimiser steps (GPU
    time on a GPU)."""
    seconds = {"convolution_s": 0.0, "optimizer_s": 0.0}
    for event in events:
        if "conv" in event.key or event.key in TAP_PRODUCT_OPS:  # mkldnn/cudnn convolutions...
            seconds["convolution_s"] += (event.self_device_time_total if on_gpu
                                         else event.self_cpu_time_total) / 1e6 / steps
        elif event.key.startswith("Optimizer.step#"):
            seconds["optimizer_s"] += (event.device_time_total if on_gpu
                                       else event.cpu_time_total) / 1e6 / steps
    return seconds


CHILDREN = {"train": child_train, "profile": child_profile, "loader": child_loader,
            "forward": child_forward, "inference": child_inference, "flops": child_flops}


def reset_peak(device):
    import torch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def synchronize(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_report(device):
    """Peak memory so far: this process's RSS (MiB) and, on CUDA, torch's allocations."""
    import torch
    report = {"maxrss_mib": maxrss_mib(resource.RUSAGE_SELF)}
    if device.type == "cuda":
        report["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return report


def maxrss_mib(who):
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(who).ru_maxrss * scale / 2 ** 20


def child_main(kind, spec_path):
    spec = json.loads(Path(spec_path).read_text())
    sys.path.insert(0, str(REPO))
    result = CHILDREN[kind](spec) or {}
    import torch
    device = torch.device(spec.get("device", "cpu"))
    result.update(maxrss_mib=maxrss_mib(resource.RUSAGE_SELF),
                  children_maxrss_mib=maxrss_mib(resource.RUSAGE_CHILDREN))
    if device.type == "cuda" and kind == "train":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    Path(spec["result"]).write_text(json.dumps(result))


# --- Running a child and watching its memory ----------------------------------------------------

def process_tree(root):
    """The pids of `root` and its descendants (Linux /proc; just `root` elsewhere)."""
    parents = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(
                        int(entry))
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = [root], [root]
    while frontier:
        children = parents.get(frontier.pop(), [])
        tree += children
        frontier += children
    return tree


def rss_mib(pid, private_only=False):
    """Resident memory of a process from /proc/PID/statm (cheap to read, unlike smaps, which
    would stall the measured process); `private_only` leaves out file-backed pages (the
    libraries every process maps), so that loader workers do not count them again."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            resident, shared = (int(v) for v in f.read().split()[1:3])
    except (OSError, ValueError):
        return 0.0
    return (resident - shared if private_only else resident) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_child(kind, spec, workdir, env=None, sample_every_s=0.2):
    """Run one measurement; returns its result with wall seconds and the process tree's peak
    resident memory, sampled: the child's RSS plus its loader workers' private RSS (an upper
    bound: pages a forked worker still shares with its parent are counted again)."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "result": str(workdir / "result.json")}
    (workdir / "spec.json").write_text(json.dumps(spec))
    with open(workdir / "output.log", "w") as log:
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()),
                                    kind, str(workdir / "spec.json")], cwd=workdir, stdout=log,
                                   stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        peak, samples = 0.0, 0
        while process.poll() is None:
            if samples % 10 == 0:  # scanning /proc for workers costs more than reading RSS
                tree = process_tree(process.pid)
            peak = max(peak, rss_mib(tree[0]) + sum(rss_mib(p, True) for p in tree[1:]))
            samples += 1
            time.sleep(sample_every_s)
        wall = time.perf_counter() - start
    if process.returncode != 0:
        tail = (workdir / "output.log").read_text()[-1500:]
        raise RuntimeError(f"{kind} measurement failed (exit {process.returncode}):\n{tail}")
    result = json.loads((workdir / "result.json").read_text())
    return {**result, "wall_s": wall, "tree_peak_rss_mib": peak}


def train_steps(log_file, warmup_steps):
    """(seconds of each step after the warm-up, seconds of the first logged interval) from
    train.py's log; a step of an interval of k steps counts 1/k of its seconds."""
    entries = json.loads(Path(log_file).read_text())["steps"]
    steps = []
    for a, b in itertools.pairwise(entries):
        if a["step"] >= warmup_steps:
            steps += [(b["seconds"] - a["seconds"]) / (b["step"] - a["step"])] * (
                b["step"] - a["step"])
    return steps, entries[0]["seconds"]


if __name__ == "__main__":
    child_main(sys.argv[1], sys.argv[2])
