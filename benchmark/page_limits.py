"""What one hostile label map costs the page's server: peak memory and seconds of decoding and
palette snapping (the stage before the generator's lock) for a 2048x2048 PNG whose pixels are
all different colours (~34 KB on the wire).

    python -m benchmark.page_limits

Each measurement runs in a fresh subprocess, so that its peak resident memory (ru_maxrss) is
its own: `chunked` is app.py's decoding and snapping as served (cityscapes.nearest_colors takes
distinct colours in chunks), `unchunked` the same with all distinct colours in one distance
matrix, as before the chunks.
"""

import argparse
import io
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def hostile_png(side=2048):
    """A PNG of side x side pixels, every one a different colour."""
    codes = np.arange(side * side, dtype=np.uint32).reshape(side, side) * (2**24 // side**2)
    array = np.stack([(codes >> 16) & 255, (codes >> 8) & 255, codes & 255], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def measure(mode, side):
    """In this process: seconds and peak memory of decoding and snapping one hostile PNG."""
    import app
    body = hostile_png(side)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    label = app.decode_label_map(body, "image/png", max_pixels=side * side)
    chunk = 1 << 40 if mode == "unchunked" else app.nearest_colors.__defaults__[0]
    app.PALETTE[app.nearest_colors(label, chunk=chunk)[0]]
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "bytes": len(body), "seconds": round(seconds, 2),
            "peak_mib": round(peak / 1024), "added_mib": round((peak - before) / 1024)}


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--side", type=int, default=2048)
    parser.add_argument("--_measure", choices=("chunked", "unchunked"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._measure:
        print(json.dumps(measure(args._measure, args.side)))
        return
    print(f"{cpu_model()}; a {args.side}x{args.side} PNG of all-different colours")
    for mode in ("unchunked", "chunked"):
        result = subprocess.run([sys.executable, "-m", "benchmark.page_limits", "--side",
                                 str(args.side), "--_measure", mode], cwd=REPO,
                                capture_output=True, text=True, check=True)
        r = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"{mode:>9}: {r['bytes'] / 1024:.0f} KB body, decode + snap {r['seconds']:.2f} s, "
              f"peak {r['peak_mib']} MiB (+{r['added_mib']} MiB over the loaded modules)")


if __name__ == "__main__":
    main()
