"""The first run on a GPU: the CUDA tests, then a short speed benchmark, in under 8 minutes on
one GPU, ending with a one-screen summary.

    python -m benchmark.cuda_check                 # writes cuda_check.json beside the summary
    python -m benchmark.cuda_check --skip_tests    # the benchmark alone

The tests are tests/test_cuda.py (each precision, channels_last, compile, pinned memory, a
resume between CPU and GPU, NCCL DDP on two GPUs). The benchmark trains the default model at
256x256, batch 16, for a few steps per configuration: plain fp32, the default command (`auto`),
TF32, bf16, fp16, and bf16 with channels_last and compile.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = "fp32,default,tf32+fused+data,bf16+fused+data,fp16+fused+data,bf16+fused+cl+data," \
          "bf16+fused+cl+data+compile"


def run(command, timeout):
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout, check=False)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:
        output, code = f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {timeout} s", 124
    return code, output, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--skip_tests", action="store_true")
    parser.add_argument("--output", default="cuda_check.json")
    args = parser.parse_args(argv)
    summary = {}
    if not args.skip_tests:
        code, output, seconds = run([sys.executable, "-m", "pytest", "-q", "-rs",
                                     "tests/test_cuda.py"], timeout=240)
        summary["tests"] = {"exit": code, "seconds": round(seconds), "tail": output[-3000:]}
    results = REPO / "cuda_benchmark.json"
    code, output, seconds = run(
        [sys.executable, "-m", "benchmark.speed", "--device", "cuda", "--configs", CONFIGS,
         "--batch_sizes", "16", "--infer_batch_sizes", "16", "--steps", "10",
         "--warmup_steps", "5", "--repeats", "1", "--infer_images", "64",
         "--output", str(results)], timeout=300)
    summary["benchmark"] = {"exit": code, "seconds": round(seconds), "tail": output[-4000:]}
    if code == 0:
        summary["benchmark"]["results"] = json.loads(results.read_text())
    Path(args.output).write_text(json.dumps(summary, indent=1, default=str))

    print("=" * 78)
    if "tests" in summary:
        tests = summary["tests"]
        last = tests["tail"].strip().splitlines()[-1:] or ["(no output)"]
        print(f"CUDA tests: exit {tests['exit']} in {tests['seconds']} s: {last[0]}")
    bench = summary["benchmark"]
    print(f"benchmark: exit {bench['exit']} in {bench['seconds']} s")
    for row in bench.get("results", {}).get("train", []):
        peak = (row.get("cuda_peak_mib") or {}).get("median")
        print(f"  train {row['config']:<32} batch {row['batch_size']:>3}: "
              f"{row['img_s']['median']:8.1f} img/s  x{row['x_plain'] or float('nan'):.2f} "
              f"fp32, GPU peak {peak if peak is None else round(peak)} MiB")
    for row in bench.get("results", {}).get("inference", []):
        print(f"  infer {row['config']:<32}: {row['img_s']['median']:8.1f} img/s")
    if bench["exit"] != 0:
        print(bench["tail"][-1500:])
    print(f"details: {args.output}")
    return 0 if all(part["exit"] == 0 for part in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
