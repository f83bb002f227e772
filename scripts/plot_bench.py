#!/usr/bin/python3
"""Draws the performance plots of README.md from Google Benchmark JSON.

    /usr/bin/python3 scripts/plot_bench.py \\
        --prefill build/bench-json/bench_prefill.json \\
        --decode build/bench-json/bench_decode.json --out-dir docs/plots [--cpu NAME]

writes docs/plots/prefill.svg (GFLOP/s against S) and docs/plots/decode.svg (GB/s
against Skv). scripts/bench_plots.sh builds the benchmarks, runs the plotted rows and
calls this script; see there for the benchmark command lines.

Input: bench_prefill and bench_decode run with --benchmark_out=<file>
--benchmark_out_format=json, normally with --benchmark_repetitions=5
--benchmark_report_aggregates_only=true. Each row is plotted at its `median` aggregate;
a file without aggregates (one repetition) is plotted at the median of its runs.

The CPU named in the titles is --cpu if given, else the `cpu_model` the benchmark
binaries write into the JSON context (bench/bench_util.hpp).

The output depends only on the JSON: a fixed SVG hash salt and no date in the metadata,
so redrawing from the same files gives the same bytes. Needs matplotlib (Debian:
python3-matplotlib); CI does not run this script, the SVGs are committed.
"""
import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("svg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

# The shapes bench_prefill.cpp and bench_decode.cpp use for these rows.
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128

THREAD_STYLE = {1: "-", 2: "--"}


def load_rows(path):
    """Returns (context, {run_name: {counter: value, ...}}) for one JSON file.

    Medians come from the `median` aggregates when the file has them; otherwise from the
    median of the repetitions of each row.
    """
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    medians, runs = {}, defaultdict(list)
    for row in data.get("benchmarks", []):
        name = row.get("run_name", row["name"])
        if row.get("run_type") == "aggregate":
            if row.get("aggregate_name") == "median":
                medians[name] = row
        elif "error_occurred" not in row or not row["error_occurred"]:
            runs[name].append(row)
    for name, reps in runs.items():
        if name not in medians:
            keys = set.intersection(*(set(r) for r in reps))
            medians[name] = {
                key: statistics.median(r[key] for r in reps)
                for key in keys
                if all(isinstance(r[key], (int, float)) for r in reps)
            }
            medians[name]["repetitions"] = len(reps)
    return data.get("context", {}), medians


def parse_name(run_name):
    """'fused/S:512/D:128/threads:2/real_time' -> ('fused', {'S': 512, 'D': 128, ...})."""
    family, *parts = run_name.split("/")
    fields = {}
    for part in parts:
        key, sep, value = part.partition(":")
        if sep and value.isdigit():
            fields[key] = int(value)
    return family, fields


def series(rows, family, counter, x_key, **match):
    """Sorted (x, y) of the rows of `family` whose fields equal `match`."""
    points = []
    for name, row in rows.items():
        row_family, fields = parse_name(name)
        if row_family != family or counter not in row or x_key not in fields:
            continue
        if all(fields.get(key) == value for key, value in match.items()):
            points.append((fields[x_key], row[counter]))
    points.sort()
    return [x for x, _ in points], [y for _, y in points]


def cpu_name(args, contexts):
    if args.cpu:
        return args.cpu
    names = sorted({c["cpu_model"] for c in contexts if c.get("cpu_model")})
    if len(names) > 1:
        print(f"plot_bench: the files name different CPUs: {names}", file=sys.stderr)
    return " / ".join(names) if names else "unknown CPU"


def repetitions(rows):
    counts = sorted({int(row["repetitions"]) for row in rows.values() if "repetitions" in row})
    return "/".join(str(c) for c in counts) or "?"


def new_axes(title, xlabel, ylabel, xs, xticklabels):
    fig, ax = plt.subplots(figsize=(8.0, 5.0))
    ax.set_title(title, fontsize=10.5)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels(xticklabels)
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", color="0.88", linewidth=0.8)
    ax.set_axisbelow(True)
    return fig, ax


def plot_line(ax, rows, label, family, counter, x_key, color, marker, threads=None, **match):
    if threads is not None:
        match["threads"] = threads
    xs, ys = series(rows, family, counter, x_key, **match)
    if not xs:
        print(f"plot_bench: no rows for {label}", file=sys.stderr)
        return
    ax.plot(xs, ys, THREAD_STYLE.get(threads, "-"), color=color, marker=marker, markersize=5,
            linewidth=1.6, label=label)


def finish(ax, legend_offset):
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, legend_offset), ncol=2, fontsize=8.5,
              frameon=False)


def save(fig, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="svg", bbox_inches="tight", pad_inches=0.1,
                metadata={"Date": None})
    plt.close(fig)
    print(f"plot_bench: wrote {path}")


def plot_prefill(rows, cpu, out):
    xs = sorted({f["S"] for f in (parse_name(n)[1] for n in rows)
                 if f.get("D") == HEAD_DIM and "S" in f})
    title = (f"Causal prefill: fp32, B = 1, H = {HEADS}, Hkv = {KV_HEADS}, D = {HEAD_DIM}, "
             f"Sq = Skv = S\n{cpu}; medians of {repetitions(rows)} runs of bench_prefill")
    fig, ax = new_axes(title, "S (tokens)",
                       "GFLOP/s (effective: 4·H·D·allowed query-key pairs / time)", xs,
                       [str(x) for x in xs])
    common = dict(counter="GFLOP/s", x_key="S", D=HEAD_DIM)
    plot_line(ax, rows, "fused, 1 thread", "fused", color="C0", marker="o", threads=1, **common)
    plot_line(ax, rows, "fused, 2 threads", "fused", color="C0", marker="s", threads=2, **common)
    plot_line(ax, rows, "gemm_yardstick: one head's Q·Kᵀ as an Eigen GEMM\n"
              "(counts all 2·S²·D FLOPs), 1 thread", "gemm_yardstick", color="C4", marker="^",
              **common)
    plot_line(ax, rows, "eigen_naive: S×S scores with Eigen, 1 thread", "eigen_naive",
              color="C2", marker="D", **common)
    plot_line(ax, rows, "reference: scalar, double, 1 thread", "reference", color="C3",
              marker="v", **common)
    for threads in (1, 2):
        peak = rows.get(f"fma_peak/threads:{threads}/real_time", {}).get("GFLOP/s")
        if peak is None:
            print(f"plot_bench: no fma_peak row for {threads} thread(s)", file=sys.stderr)
            continue
        ax.axhline(peak, color="0.45", linestyle=THREAD_STYLE[threads], linewidth=1.1,
                   label=f"FMA peak, {threads} thread{'s' if threads > 1 else ''}: {peak:.0f}")
    finish(ax, -0.11)
    save(fig, out / "prefill.svg")


def kv_size(kv_len):
    mib = 2 * KV_HEADS * kv_len * HEAD_DIM * 4 / 2**20
    return f"{mib / 1024:.0f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"


def plot_decode(rows, cpu, out):
    xs = sorted({f["Skv"] for f in (parse_name(n)[1] for n in rows)
                 if f.get("B") == 1 and "Skv" in f})
    title = (f"Decode step: one query token, fp32 cache, B = 1, H = {HEADS}, Hkv = {KV_HEADS}, "
             f"D = {HEAD_DIM}\n{cpu}; medians of {repetitions(rows)} runs of bench_decode")
    fig, ax = new_axes(title, "Skv (cached tokens) and the bytes of K and V",
                       "GB/s (bytes of K and V / time)", xs,
                       [f"{x}\n{kv_size(x)}" for x in xs])
    common = dict(counter="GB/s", x_key="Skv", B=1)
    plot_line(ax, rows, "decode, 1 thread", "decode", color="C0", marker="o", threads=1,
              **common)
    plot_line(ax, rows, "decode, 2 threads", "decode", color="C0", marker="s", threads=2,
              **common)
    plot_line(ax, rows, "stream_yardstick: sum of as many bytes, 1 thread", "stream_yardstick",
              color="0.45", marker="o", threads=1, **common)
    plot_line(ax, rows, "stream_yardstick, 2 threads", "stream_yardstick", color="0.45",
              marker="s", threads=2, **common)
    plot_line(ax, rows, "reference: scalar, double, 1 thread", "reference", color="C3",
              marker="v", **common)
    finish(ax, -0.16)
    save(fig, out / "decode.svg")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefill", type=Path, help="bench_prefill JSON output")
    parser.add_argument("--decode", type=Path, help="bench_decode JSON output")
    parser.add_argument("--out-dir", type=Path, default=Path("docs/plots"))
    parser.add_argument("--cpu", help="CPU name for the titles (default: from the JSON)")
    args = parser.parse_args()
    if not args.prefill and not args.decode:
        parser.error("give --prefill and/or --decode")

    plt.rcParams.update({
        "svg.hashsalt": "attnforge",  # fixed ids, so the same input gives the same file
        "font.family": "DejaVu Sans",
        "font.size": 9,
    })
    loaded = {}
    for kind in ("prefill", "decode"):
        path = getattr(args, kind)
        if path:
            loaded[kind] = load_rows(path)
    cpu = cpu_name(args, [context for context, _ in loaded.values()])
    if "prefill" in loaded:
        plot_prefill(loaded["prefill"][1], cpu, args.out_dir)
    if "decode" in loaded:
        plot_decode(loaded["decode"][1], cpu, args.out_dir)


if __name__ == "__main__":
    main()
