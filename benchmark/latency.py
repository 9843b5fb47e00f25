"""Request-to-PNG latency of app.py's page server, over real HTTP.

    python -m benchmark.latency          # default model, fresh weights: ~4 min on 2 cores
    python -m benchmark.latency --model_path checkpoints/generator.pth --requests 60
    python -m benchmark.latency --configs fp32,bf16,cl,bf16+cl,bf16+cl+compile

Each configuration starts `python app.py` on a free port with its flags (the start-up time,
model loading and warm-up included, is reported too). Then the page's own kind of request (a
PNG label map, POST /api/translate, on one kept-alive connection as the browser does) goes to
each server in turn, one request at a time, and each is timed from the first byte sent to the
last byte of the PNG received.
The label maps are the shipped examples (256x256) and the same stretched to 512x256, as the page
sends them. Without --model_path, a freshly initialised generator of the default size
(image_size 256, 64 channels) is saved and served: its weights are untrained, its speed is a
trained one's.
"""

import argparse
import http.client
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
OPTIONS = {"default": [], "fp32": ["--precision", "fp32"], "bf16": ["--precision", "bf16"],
           "cl": ["--channels_last", "on"],
           "nocl": ["--channels_last", "off"], "compile": ["--compile"]}
DEFAULT_CONFIGS = "default,fp32,bf16+cl,bf16+cl+compile"  # default: --precision auto
SIZES = ((256, 256), (512, 256))  # (width, height): the page's two canvas sizes


def flags_of(config):
    """`bf16+cl` -> app.py flags; an unknown name is refused listing the valid ones."""
    flags = []
    for name in config.split("+"):
        if name not in OPTIONS:
            raise SystemExit(f"--configs: unknown option {name!r}; valid: {', '.join(OPTIONS)}")
        flags += OPTIONS[name]
    return flags


def fresh_checkpoint(path, seed=0):
    """A freshly initialised generator of the default size, saved as generator.pth."""
    import torch

    from config import TrainConfig
    from models import build_generator
    from training_state import Progress, make_checkpoint
    from utils import save_checkpoint

    torch.manual_seed(seed)
    config = TrainConfig()
    generator = build_generator(config.model_config())
    save_checkpoint(make_checkpoint(config, generator, Progress()), path)
    return path


def label_bodies(width, height):
    """PNG bodies of the shipped example label maps at (width, height), nearest neighbour."""
    bodies = []
    for path in sorted((REPO / "web" / "examples").glob("*.png")):
        label = Image.open(path).convert("RGB").resize((width, height), Image.NEAREST)
        buffer = io.BytesIO()
        label.save(buffer, format="PNG")
        bodies.append(buffer.getvalue())
    if not bodies:
        raise SystemExit("no example label maps in web/examples; run python app.py "
                         "--write_examples")
    return bodies


def start_app(model_path, flags, log):
    """(process, host, port, seconds until it printed its address)."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--model_path",
                                str(model_path), "--port", "0", *flags], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=log,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in process.stdout:
        if line.startswith("serving on "):
            address = line.split()[2].removeprefix("http://").rstrip("/")
            host, port = address.rsplit(":", 1)
            return process, host, int(port), time.perf_counter() - started
    raise SystemExit(f"app.py {' '.join(flags)} exited with {process.wait()}; see {log.name}")


def timed_request(connection, body):
    """Seconds from sending one label map to having its whole PNG."""
    started = time.perf_counter()
    connection.request("POST", "/api/translate", body, {"Content-Type": "image/png"})
    response = connection.getresponse()
    png = response.read()
    elapsed = time.perf_counter() - started
    if response.status != 200 or not png.startswith(b"\x89PNG"):
        raise SystemExit(f"request failed: {response.status} {png[:200]!r}")
    return elapsed


def measure(servers, count, warmup):
    """{(config, size): [seconds, ...]}: the servers take turns, request by request, so that
    a changing load on the machine hits every configuration alike."""
    bodies = {size: label_bodies(*size) for size in SIZES}
    connections = {name: http.client.HTTPConnection(host, port, timeout=300)
                   for name, (host, port) in servers.items()}
    seconds = {(name, size): [] for name in servers for size in SIZES}
    try:
        for k in range(warmup + count):
            for name, connection in connections.items():
                for size in SIZES:
                    elapsed = timed_request(connection, bodies[size][k % len(bodies[size])])
                    if k >= warmup:
                        seconds[name, size].append(elapsed)
    finally:
        for connection in connections.values():
            connection.close()
    return seconds


def percentile(values, q):
    return float(np.percentile(values, q))


def machine_line():
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in
                   Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores, torch {torch.__version__}, Python {platform.python_version()}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model_path", default=None,
                        help="checkpoint to serve (default: fresh default-size weights)")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help=f"comma-separated, options joined by '+' from {list(OPTIONS)}")
    parser.add_argument("--requests", type=int, default=40, help="timed requests per size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed requests per size first")
    args = parser.parse_args(argv)
    configs = [(config, flags_of(config)) for config in args.configs.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        model_path = args.model_path or fresh_checkpoint(Path(folder) / "generator.pth")
        weights = args.model_path or "freshly initialised (untrained) default-size generator"
        print(f"machine: {machine_line()}\nweights: {weights}\n"
              f"{args.requests} timed requests per size, one at a time, request to PNG\n")
        print(f"{'config':<18}{'start-up':>9}" + "".join(
            f"{f'{w}x{h} median':>17}{'p95':>8}" for w, h in SIZES))
        servers, processes, startups = {}, [], {}
        log = open(Path(folder) / "app.log", "w")
        try:
            for name, flags in configs:  # one after another: start-up times are their own
                process, host, port, startups[name] = start_app(model_path, flags, log)
                processes.append(process)
                servers[name] = (host, port)
            seconds = measure(servers, args.requests, args.warmup)
        finally:
            for process in processes:
                process.terminate()
                process.wait(timeout=30)
            log.close()
        for name in servers:
            row = f"{name:<18}{startups[name]:>8.1f}s"
            for size in SIZES:
                row += f"{statistics.median(seconds[name, size]) * 1000:>14.0f} ms" \
                       f"{percentile(seconds[name, size], 95) * 1000:>5.0f} ms"
            print(row)

if __name__ == "__main__":
    main()
