"""Plot the JSON loss log written by train.py (works without a display).

    python plot_loss.py --log_file ./training_log.json            # -> ./training_log.png
    python plot_loss.py --log_file ./training_log.json --smooth 20 --output losses.png
"""

import argparse
import json
from pathlib import Path

import numpy as np

from utils import UserError, atomic_write, run_cli

PANELS = (  # the GAN terms share a scale; L1 (before lambda) gets its own panel
    ("adversarial losses", (("g_adv", "G adversarial"), ("d_real", "D real"),
                            ("d_fake", "D fake"))),
    ("generator L1", (("g_l1", "G L1"),)),
)


VALIDATION = ("val_l1", "val_psnr", "val_fid")


def read_log(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: log file not found (--log_file)")
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: not a readable JSON log ({e})") from None
    if not isinstance(document, dict) or not isinstance(document.get("steps"), list):
        raise UserError(f"{path}: not a pix2pix training log (no 'steps' list)")
    if not document["steps"]:
        raise UserError(f"{path}: the log has no step entries yet")
    check_entries(path, document)
    return document


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_entries(path, document):
    """Every entry a dict with a numeric step (epoch) and numeric values where numbers go:
    a log edited by hand or written by another program is named, not plotted into a
    traceback."""
    epochs = document.get("epochs", [])
    if not isinstance(epochs, list):
        raise UserError(f"{path}: 'epochs' is a {type(epochs).__name__}, not a list")
    numeric = {key for _, series in PANELS for key, _ in series} | set(VALIDATION)
    for kind, entries, counter in (("steps", document["steps"], "step"),
                                   ("epochs", epochs, "epoch")):
        for index, entry in enumerate(entries):
            where = f"{path}: {kind}[{index}]"
            if not isinstance(entry, dict):
                raise UserError(f"{where} is a {type(entry).__name__}, not an entry of the "
                                "log's format")
            if not is_number(entry.get(counter)):
                raise UserError(f"{where} has no numeric '{counter}' "
                                f"(got {str(entry.get(counter))[:40]!r})")
            bad = [k for k in numeric if k in entry and not is_number(entry[k])]
            if bad:
                raise UserError(f"{where}: '{bad[0]}' is not a number "
                                f"({str(entry[bad[0]])[:40]!r})")


def smooth(values, window):
    """Trailing moving average over `window` entries (the first ones average what exists)."""
    values = np.asarray(values, dtype=float)
    if window <= 1:
        return values
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def plot(document, output, window=1):
    import matplotlib
    matplotlib.use("Agg")  # headless: no display needed
    import matplotlib.pyplot as plt

    steps = [entry["step"] for entry in document["steps"]]
    epochs = document.get("epochs", [])
    metrics = [k for k in VALIDATION if any(k in e for e in epochs)]
    columns = len(PANELS) + len(metrics)
    figure, axes = plt.subplots(1, columns, figsize=(4.5 * columns, 3.6), squeeze=False)
    for ax, (title, series) in zip(axes[0], PANELS):
        for key, label in series:
            values = [entry.get(key, np.nan) for entry in document["steps"]]
            ax.plot(steps, smooth(values, window), label=label)
        ax.set(title=title, xlabel="step", ylabel="loss")
        ax.legend()
        ax.grid(alpha=0.3)
    for ax, key in zip(axes[0][len(PANELS):], metrics):
        points = [(e["epoch"] + 1, e[key]) for e in epochs if key in e]
        ax.plot(*zip(*points), marker="o")
        ax.set(title=f"validation {key[4:].upper()}", xlabel="epoch", ylabel=key[4:])
        ax.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write(output, lambda f: figure.savefig(f, format="png", dpi=100))
    plt.close(figure)
    return output


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--log_file", default="./training_log.json")
    parser.add_argument("--output", default=None, help="PNG path (default: next to the log)")
    parser.add_argument("--smooth", type=int, default=1,
                        help="moving average over N logged points (1: no smoothing)")
    args = parser.parse_args(argv)
    if args.smooth < 1:
        raise UserError(f"--smooth must be >= 1, got {args.smooth}")
    document = read_log(args.log_file)
    output = Path(args.output) if args.output else Path(args.log_file).with_suffix(".png")
    plot(document, output, args.smooth)
    print(f"wrote {output}")


if __name__ == "__main__":
    run_cli(main)
