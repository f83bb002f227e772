#!/usr/bin/env bash
# Regenerates the performance plots of README.md, docs/plots/prefill.svg and
# docs/plots/decode.svg:
#   1. builds bench_prefill and bench_decode (release preset, -O3 -march=native);
#   2. runs the rows the plots show, REPETITIONS times each (default 5), writing Google
#      Benchmark JSON to build/bench-json/bench_prefill.json and bench_decode.json;
#   3. draws the SVGs from the JSON with scripts/plot_bench.py (Debian's
#      python3-matplotlib, installed here when missing; CI does not need it).
#
#   bash scripts/bench_plots.sh              # all three steps; the sweep is long (see README)
#   bash scripts/bench_plots.sh --plot-only  # step 3 only, from the JSON already there
#
# Run it on an otherwise idle machine: the rows of one plot come from one run of one
# binary, and other load shows up in them. CPU=<name> overrides the CPU named in the
# titles (default: the model name the binaries read from /proc/cpuinfo).
# JOBS=<n> sets build parallelism (default 2).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

REPETITIONS="${REPETITIONS:-5}"
JSON_DIR=build/bench-json

# The plotted rows: prefill at D = 128 over every S, with the FMA peak; decode at B = 1
# over every Skv (prefill_forced is not drawn but costs little and completes the table).
PREFILL_FILTER='^(fma_peak/|(fused|reference|eigen_naive|gemm_yardstick)/S:[0-9]+/D:128/)'
DECODE_FILTER='^(decode|prefill_forced|stream_yardstick|reference)/Skv:[0-9]+/B:1/'

plot_only=0
case "${1:-}" in
  --plot-only) plot_only=1 ;;
  "") ;;
  *)
    echo "usage: bash scripts/bench_plots.sh [--plot-only]" >&2
    exit 2
    ;;
esac

bash scripts/install_deps.sh python3-matplotlib

run_bench() {
  local name="$1" filter="$2"
  local exe="build/release/bench/${name}" out="${JSON_DIR}/${name}.json"
  echo "---- ${exe} (filter '${filter}', ${REPETITIONS} repetitions) -> ${out}"
  local start=$SECONDS
  "$exe" --benchmark_filter="$filter" --benchmark_repetitions="$REPETITIONS" \
    --benchmark_report_aggregates_only=true \
    --benchmark_out="$out" --benchmark_out_format=json
  echo "---- ${name}: $((SECONDS - start)) s"
}

if [ "$plot_only" -eq 0 ]; then
  cmake --preset release
  cmake --build --preset release -j "${JOBS:-2}" --target bench_prefill bench_decode
  mkdir -p "$JSON_DIR"
  run_bench bench_prefill "$PREFILL_FILTER"
  run_bench bench_decode "$DECODE_FILTER"
fi

cpu_args=()
if [ -n "${CPU:-}" ]; then cpu_args=(--cpu "$CPU"); fi
# Debian's interpreter, where python3-matplotlib lives (not a python3 earlier in PATH).
/usr/bin/python3 scripts/plot_bench.py --prefill "${JSON_DIR}/bench_prefill.json" \
  --decode "${JSON_DIR}/bench_decode.json" --out-dir docs/plots "${cpu_args[@]}"
