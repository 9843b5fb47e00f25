"""The speed benchmark's report: medians and spreads of the raw measurements, ratios to the plain
baseline, achieved GFLOP/s and MFU, and the printed tables."""

import statistics

from benchmark.configs import model_of

# Dense peak TFLOP/s from the vendors' data sheets; --peak_tflops overrides. The first key
# found in the GPU's name wins, so the specific names come first.
PEAK_TFLOPS = {
    "H100 PCIe": {"fp32": 51.2, "tf32": 378, "bf16": 756, "fp16": 756},
    "H100": {"fp32": 66.9, "tf32": 495, "bf16": 989, "fp16": 989},
    "H200": {"fp32": 66.9, "tf32": 495, "bf16": 989, "fp16": 989},
    "A100": {"fp32": 19.5, "tf32": 156, "bf16": 312, "fp16": 312},
    "L40S": {"fp32": 91.6, "tf32": 183, "bf16": 362, "fp16": 362},
    "L4": {"fp32": 30.3, "tf32": 60, "bf16": 121, "fp16": 121},
    "A10": {"fp32": 31.2, "tf32": 62.5, "bf16": 125, "fp16": 125},
}



def peak_tflops(args, info, config_name):
    """The peak FLOP/s that MFU divides by, for this configuration's precision; None if unknown."""
    if args.peak_tflops:
        return args.peak_tflops
    precision = next((p for p in ("tf32", "bf16", "fp16") if p in config_name.split("+")), "fp32")
    for name, peaks in PEAK_TFLOPS.items():
        if name in info.get("gpu", ""):
            return peaks[precision]
    return None


def summarize(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": values}


def report(args, info, raw, flops, loader_source, loader_options):
    """Rows per (part, configuration, batch size): medians, spreads, ratios to the plain fp32.

    `loader_source[name]`: the configuration whose loader measurement stands for `name`'s;
    `loader_options[name]`: its (cache, num_workers)."""
    base = args.configs[0]
    rows = {"train": [], "loader": [], "inference": [], "forward": [],
            "profile": profile_rows(args, raw)}
    for (name, batch_size), runs in raw["train"].items():
        step_s = statistics.median(r["step_s"] for r in runs)
        plain = raw["train"].get((base, batch_size))
        loader = raw["loader"].get((loader_source[name], batch_size))
        gflop_s = flops[model_of(name)]["train_step"][batch_size] / step_s / 1e9
        peak = peak_tflops(args, info, name)
        img_s = summarize([r["img_s"] for r in runs])
        rows["train"].append({
            "config": name, "batch_size": batch_size, "img_s": img_s,
            "x_plain": img_s["median"] / statistics.median(r["img_s"] for r in plain)
            if plain else None,
            "gflop_s": gflop_s, "mfu": gflop_s / (peak * 1e3) if peak else None,
            "first_step_s": summarize([r["first_step_s"] for r in runs]),
            "wall_s": summarize([r["wall_s"] for r in runs]),
            "peak_mib": summarize([r["peak_mib"] for r in runs]),
            "main_maxrss_mib": summarize([r["main_maxrss_mib"] for r in runs]),
            "cuda_peak_mib": summarize([r["cuda_peak_mib"] for r in runs]),
            "loader_img_s": statistics.median(loader) if loader else None,
            "loader_headroom": statistics.median(loader) / img_s["median"] if loader else None})
    for (name, batch_size), values in raw["loader"].items():
        cache, num_workers = loader_options[name]
        rows["loader"].append({"config": name, "cache": cache, "num_workers": num_workers,
                               "batch_size": batch_size, "img_s": summarize(values)})
    for part in ("inference", "forward"):
        plain = raw[part].get((base, 1))
        for (name, batch_size), runs in raw[part].items():
            rates = [r["img_s"] if part == "inference" else batch_size / r["seconds"]
                     for r in runs]
            img_s = summarize(rates)
            peak = peak_tflops(args, info, name)
            row = {"config": name, "batch_size": batch_size, "img_s": img_s,
                   "x_plain_batch1": img_s["median"] / statistics.median(
                       r["img_s"] if part == "inference" else 1 / r["seconds"] for r in plain)
                   if plain else None,
                   "gflop_s": flops[model_of(name)]["generator_forward"] * img_s["median"]
                   / 1e9,
                   "maxrss_mib": summarize([r["maxrss_mib"] for r in runs]),
                   "cuda_peak_mib": summarize([r.get("cuda_peak_mib") for r in runs])}
            row["mfu"] = row["gflop_s"] / (peak * 1e3) if peak else None
            row.update({"wall_s": summarize([r["wall_s"] for r in runs])} if part == "inference"
                       else {"first_call_s": summarize([r["first_s"] for r in runs])})
            rows[part].append(row)
    return rows


def profile_rows(args, raw):
    """Time by kind per configuration, and its ceiling: the speed-up over the plain baseline
    that this configuration would reach if everything but its convolutions took no time."""
    base, batch_size = args.configs[0], max(args.batch_sizes)
    plain = raw["train"].get((base, batch_size))
    plain_step = statistics.median(r["step_s"] for r in plain) if plain else \
        (raw["profile"].get(base) or {}).get("step_s")
    rows = []
    for name, times in raw["profile"].items():
        row = {"config": name, "batch_size": batch_size}
        if times:
            step, conv, optim = times["step_s"], times["convolution_s"], times["optimizer_s"]
            row.update(step_s=step, convolution_s=conv, convolution_share=conv / step,
                       optimizer_s=optim, optimizer_share=optim / step,
                       other_s=step - conv - optim,
                       ceiling_x_plain=plain_step / conv if plain_step and conv else None)
        rows.append(row)
    return rows


TABLES = {  # part -> (title, [(column, row key)])
    "train": ("Training: train.py at steady state", [
        ("img/s", "img_s"), ("x plain", "x_plain"), ("GFLOP/s", "gflop_s"), ("MFU", "mfu"),
        ("1st step s", "first_step_s"), ("RSS MiB", "main_maxrss_mib"),
        ("tree MiB", "peak_mib"), ("GPU MiB", "cuda_peak_mib"), ("loader x", "loader_headroom")]),
    "profile": ("Where a training step's time goes (torch.profiler, one run; ceiling: x plain "
                "if all but the convolutions took no time)", [
        ("step s", "step_s"), ("conv s", "convolution_s"), ("conv/step", "convolution_share"),
        ("optim s", "optimizer_s"), ("optim/step", "optimizer_share"), ("other s", "other_s"),
        ("ceiling x", "ceiling_x_plain")]),
    "inference": ("Folder inference: inference.py (decode, translate, write PNGs)", [
        ("img/s", "img_s"), ("x fp32 b1", "x_plain_batch1"), ("GFLOP/s", "gflop_s"),
        ("MFU", "mfu"), ("wall s", "wall_s"), ("RSS MiB", "maxrss_mib"),
        ("GPU MiB", "cuda_peak_mib")]),
    "forward": ("Bare generator forward", [
        ("img/s", "img_s"), ("x fp32 b1", "x_plain_batch1"), ("GFLOP/s", "gflop_s"),
        ("MFU", "mfu"), ("1st call s", "first_call_s"), ("RSS MiB", "maxrss_mib"),
        ("GPU MiB", "cuda_peak_mib")]),
}


def print_tables(results):
    info = results["machine"]
    print(f"\n{info.get('gpu') or info.get('cpu')} ({info['cores']} cores, torch "
          f"{info['torch']}); median [min-max] of {results['settings']['repeats']} runs")
    for part, (title, columns) in TABLES.items():
        if not results[part]:
            continue
        print(f"\n{title}\n{'config':<32}{'batch':>6}" + "".join(
            f"{name:>24}" if key == "img_s" else f"{name:>11}" for name, key in columns))
        for row in results[part]:
            print(f"{row['config']:<32}{row['batch_size']:>6}" + "".join(
                f"{cell(row.get(key), spread=True):>24}" if key == "img_s" else
                f"{cell(row.get(key)):>11}" for _, key in columns))
    if results["loader"]:
        print("\nTraining loader alone (img/s; 'loader x' above: loader img/s / step img/s)")
        for row in results["loader"]:
            print(f"{row['config']:<32}{row['batch_size']:>6}{cell(row['img_s'], True):>24}"
                  f"   cache {row['cache']}, workers {row['num_workers']}")
    for part, same in results.get("same_as", {}).items():
        for name, first in same.items():
            print(f"{part}: {name} " + (f"is measured as {first}" if first else "n/a"))


def cell(value, spread=False):
    if value is None:
        return "-"
    if isinstance(value, dict):
        if spread:
            return f"{number(value['median'])} [{number(value['min'])}-{number(value['max'])}]"
        value = value["median"]
    return number(value)


def number(value):
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
