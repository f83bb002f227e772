#!/usr/bin/env bash
# The one test command of attnforge:  bash scripts/test.sh
#
# Runs, stopping at the first failure:
#   deps        install missing Debian packages (scripts/install_deps.sh)
#   release     configure + build the `release` preset (tests, benchmarks, examples)
#   ctest       ctest --preset release (unit tests + installed-package consumer test)
#   bench       every bench/bench_*.cpp binary once, briefly
#   examples    every examples/*.cpp binary once, with --quick
#   asan        configure + build + ctest the `asan` preset (ASan + UBSan)
#   tsan        configure + build the `tsan` preset, run the unit tests under ThreadSanitizer
#   fuzz        build the libFuzzer target (`fuzz` preset, clang), replay its seed corpus,
#               then fuzz for FUZZ_SECONDS (default 60)
#
# `bash scripts/test.sh STEP...` runs only the named steps, e.g. `bash scripts/test.sh ctest`.
# JOBS=<n> sets build parallelism (default 2).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

JOBS="${JOBS:-2}"

# Benchmark filter per binary for the brief run (default '.' = everything).
# Narrow a binary here when its full sweep is too slow for CI, e.g.
#   [bench_prefill]='/(128|512)/'
declare -A BENCH_FILTER=(
  [bench_prefill]='^(fma_peak/|(fused|eigen_naive|gemm_yardstick)/S:512/)'  # reference/S:2048 takes ~8 s a call
  [bench_decode]='^(decode|prefill_forced|stream_yardstick)/Skv:4096/B:1/'
  [bench_packed]='^(packed|separate|metadata)/'  # dense/ and mixed/ take seconds per call
)
BENCH_MIN_TIME=0.01

# --- Plumbing ---------------------------------------------------------------

start_time=$SECONDS
current_step="(setup)"

banner() {
  printf '\n==================== %s ====================\n' "$*"
}

on_exit() {
  local rc=$?
  local elapsed=$((SECONDS - start_time))
  if [ "$rc" -eq 0 ]; then
    banner "ALL PASSED in ${elapsed}s"
  else
    banner "FAILED in step '${current_step}' (exit ${rc}) after ${elapsed}s"
  fi
}
trap on_exit EXIT

run_step() {
  current_step="$1"
  local step_start=$SECONDS
  banner "STEP ${current_step}"
  "step_${current_step}"
  echo "---- step ${current_step} done in $((SECONDS - step_start))s"
}

# --- Steps ------------------------------------------------------------------

step_deps() {
  bash scripts/install_deps.sh
}

step_release() {
  cmake --preset release
  cmake --build --preset release -j "$JOBS"
}

step_ctest() {
  ctest --preset release
}

step_bench() {
  local found=0 source name exe filter
  for source in bench/bench_*.cpp; do
    [ -e "$source" ] || continue
    found=1
    name="$(basename "$source" .cpp)"
    exe="build/release/bench/${name}"
    if [ ! -x "$exe" ]; then
      echo "missing benchmark binary ${exe} (was the release step run?)" >&2
      return 1
    fi
    filter="${BENCH_FILTER[$name]:-.}"
    echo "---- ${exe} (filter '${filter}')"
    "$exe" --benchmark_min_time="$BENCH_MIN_TIME" --benchmark_repetitions=1 \
      --benchmark_filter="$filter"
  done
  [ "$found" -eq 1 ] || echo "no bench/bench_*.cpp sources; nothing to run"
}

step_examples() {
  local found=0 source name exe
  for source in examples/*.cpp; do
    [ -e "$source" ] || continue
    found=1
    name="$(basename "$source" .cpp)"
    exe="build/release/examples/${name}"
    if [ ! -x "$exe" ]; then
      echo "missing example binary ${exe} (was the release step run?)" >&2
      return 1
    fi
    echo "---- ${exe} --quick"
    "$exe" --quick
  done
  [ "$found" -eq 1 ] || echo "no examples/*.cpp sources; nothing to run"
}

step_asan() {
  cmake --preset asan
  cmake --build --preset asan -j "$JOBS"
  ctest --preset asan
}

# ThreadSanitizer over the whole unit-test binary in one process: the concurrency tests
# (several callers, one shared Eigen::ThreadPoolDevice), every thread-count test (pools of
# 2 and 3 threads) and everything else that runs on a pool. Eigen's ThreadPool is
# header-only, so it is instrumented as well (README.md, "Reliability").
step_tsan() {
  cmake --preset tsan
  cmake --build --preset tsan -j "$JOBS" --target attnforge_tests
  TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1" \
    build/tsan/tests/attnforge_tests --gtest_brief=1
}

# The libFuzzer target (tests/fuzz): every checked-in seed once, then FUZZ_SECONDS of
# fuzzing from them on a scratch copy of the corpus (new inputs land in build/, not in the
# repository). A failed check, a sanitizer report or an input running over 20 s stops it
# and leaves the input in build/fuzz/artifacts/.
FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
step_fuzz() {
  cmake --preset fuzz
  cmake --build --preset fuzz -j "$JOBS"
  local exe=build/fuzz/tests/fuzz/fuzz_attention
  local corpus=build/fuzz/corpus-run artifacts=build/fuzz/artifacts log=build/fuzz/fuzz.log
  echo "---- seed corpus replay ($(ls tests/fuzz/corpus | wc -l) inputs)"
  ctest --preset fuzz
  rm -rf "$corpus" && mkdir -p "$corpus" "$artifacts" && cp tests/fuzz/corpus/* "$corpus"/
  echo "---- fuzzing for ${FUZZ_SECONDS} s (log: ${log})"
  if ! ATTNFORGE_FUZZ_STATS=1 "$exe" "$corpus" -max_total_time="$FUZZ_SECONDS" -max_len=512 \
      -len_control=0 -timeout=20 -artifact_prefix="$artifacts/" -print_final_stats=1 \
      >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz: FAILED; the input is in ${artifacts}/ (replay: ${exe} <file>)" >&2
    return 1
  fi
  grep -E '^(Done|stat::number_of_executed_units|stat::new_units_added|fuzz_attention)' "$log"
  echo "fuzz: $(awk '/^stat::number_of_executed_units/ {print $2}' "$log") inputs executed" \
    "in ${FUZZ_SECONDS} s, no failure"
}

# --- Main -------------------------------------------------------------------

ALL_STEPS=(deps release ctest bench examples asan tsan fuzz)

steps=("$@")
if [ "${#steps[@]}" -eq 0 ]; then
  steps=("${ALL_STEPS[@]}")
fi
for step in "${steps[@]}"; do
  if ! declare -F "step_${step}" >/dev/null; then
    echo "unknown step '${step}'; known steps: ${ALL_STEPS[*]}" >&2
    exit 2
  fi
done

for step in "${steps[@]}"; do
  run_step "$step"
done
