#!/usr/bin/env bash
# The one test command of attnforge:  bash scripts/test.sh
#
# Runs, stopping at the first failure:
#   deps          install missing Debian packages (scripts/install_deps.sh)
#   release       configure + build the `release` preset (tests -march=native, benchmarks,
#                 examples)
#   ctest         the kernel variants the release tests run, then ctest --preset release:
#                 unit tests, the installed-package consumer test, and the consumer
#                 warnings tests (tests/warnings: every public entry point compiled by g++
#                 at -O2 and by clang++ at -O0, -Wall -Wextra -Wpedantic -march=native
#                 -Werror, and again without -march),
#                 and the MPI tests mpi.attention.P1..P4 (launched by scripts/mpirun.sh)
#   bench         every bench/bench_*.cpp binary once, briefly (*_mpi on 2 ranks); clang++
#                 parses each source (-fsyntax-only -Werror), as release builds them with g++
#   examples      every examples/*.cpp binary once, with --quick (*_mpi on 2 ranks); clang++
#                 parses each source as in `bench`
#   isa-baseline  the unit tests built for the x86-64 baseline (-march=x86-64, SSE2 packets)
#   portable      the unit tests without the x86 intrinsic kernels (ATTNFORGE_NO_BF16_DOT,
#                 ATTNFORGE_NO_INT8_DOT, no -march): the code an ARM or MSVC build compiles
#                 (these two, like isa-avx2, skip the compile-only and packaging tests: they
#                 check types and installation with the g++ that `ctest` already ran them
#                 with, and no instruction set changes what they find)
#   avx2-clang-eigen5
#                 installs Eigen 5.0.1 from its tarball into build/third_party and runs the
#                 unit tests built with clang++ for -mavx2 -mfma against it: one build
#                 covers the AVX2 instruction set, the second compiler and the current Eigen
#                 (ATTNFORGE_EIGEN5_TARBALL, default ../shared/third_party/eigen-5.0.1.tar.xz;
#                 without it the step runs the same tests against the system Eigen, prints
#                 NOT RUN for Eigen 5, and fails only when ATTNFORGE_REQUIRE_EIGEN5=1)
#   asan          configure + build + ctest the `asan` preset (ASan + UBSan, -march=native):
#                 the unit tests (the compile-only and packaging tests run in `ctest`)
#   tsan          configure + build the `tsan` preset (-march=native), run the unit tests
#                 under ThreadSanitizer (as JOBS gtest shards side by side)
#   fuzz          build the libFuzzer target (`fuzz` preset, clang, -march=native), replay
#                 its seed corpus, then fuzz for FUZZ_SECONDS (default 60)
# Every step that builds the unit tests prints the kernel variants they ran (Eigen's
# packet sizes, EIGEN_VECTORIZE_* macros, whether the AVX512-BF16 kernel is used), and
# the test KernelVariants.BuildHasTheRequestedInstructionSet fails if the build did not
# get the instruction set its preset asks for.
#
# `bash scripts/test.sh STEP...` runs only the named steps, e.g. `bash scripts/test.sh ctest`;
# besides the default steps there are `isa-avx2` (g++, -mavx2 -mfma), `clang` (clang++,
# native, against the system Eigen), `eigen5` (g++ against Eigen 5.0.1) and `clang-eigen5`
# (clang++, native, against Eigen 5.0.1).
# JOBS=<n> sets build parallelism (default 2). KEEP_GOING=1 runs every step even after a
# failure and lists the failed steps at the end (the exit status is still non-zero).
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
  [bench_paged]='^((paged_)?decode/Skv:4096/B:8/|fork_memory/)'  # prefill and ragged rows fill GBs of cache
  [bench_mpi]='^(ring_prefill/S:2048/|sharded_decode/|tensor_parallel_forward/S:256/)'  # S:16384 takes minutes
)
BENCH_MIN_TIME=0.01

# --- Plumbing ---------------------------------------------------------------

start_time=$SECONDS
current_step="(setup)"
KEEP_GOING="${KEEP_GOING:-0}"
step_times=()    # "name seconds status" per step run, for the summary
failed_steps=()
# Steps that could not run here (e.g. eigen5 without its tarball) append their name to
# this file (a file, because KEEP_GOING runs each step in a subshell).
not_run_file="$(mktemp)"

banner() {
  printf '\n==================== %s ====================\n' "$*"
}

on_exit() {
  local rc=$?
  local elapsed=$((SECONDS - start_time))
  if [ "${#step_times[@]}" -gt 0 ]; then
    echo
    echo "step times (wall, and cpu = user + system of the step's processes):"
    printf '  %s\n' "${step_times[@]}"
  fi
  local note=""
  if [ -s "$not_run_file" ]; then
    note=" (NOT RUN: $(tr '\n' ' ' <"$not_run_file" | sed 's/ $//'))"
  fi
  rm -f "$not_run_file" "$cpu_file"
  if [ "$rc" -eq 0 ]; then
    banner "ALL PASSED in ${elapsed}s${note}"
  elif [ "${#failed_steps[@]}" -gt 0 ]; then
    banner "FAILED steps: ${failed_steps[*]} (exit ${rc}) after ${elapsed}s${note}"
  else
    banner "FAILED in step '${current_step}' (exit ${rc}) after ${elapsed}s${note}"
  fi
}
trap on_exit EXIT

# Sets child_cpu to the CPU seconds (user + system) used so far by finished child
# processes: with the wall time, it tells a slow step from a busy machine. (The `times`
# builtin must run in this shell, not in a pipe or $(...), which would be a subshell.)
cpu_file="$(mktemp)"
child_cpu=0
update_child_cpu() {
  times >"$cpu_file"
  child_cpu="$(tail -n 1 "$cpu_file" | awk '{
    total = 0
    for (i = 1; i <= 2; ++i) { split($i, t, /[ms]/); total += t[1] * 60 + t[2] }
    printf "%d", total
  }')"
}

run_step() {
  current_step="$1"
  local step_start=$SECONDS rc=0 cpu_start
  update_child_cpu
  cpu_start=$child_cpu
  banner "STEP ${current_step}"
  if [ "$KEEP_GOING" = 1 ]; then
    # A subshell with its own `set -e`, so the step still stops at its first failing
    # command while the script goes on. (Not `( step ) || ...`: bash ignores set -e
    # inside the left side of || and &&.)
    set +e
    (
      set -e
      "step_${current_step}"
    )
    rc=$?
    set -e
  else
    "step_${current_step}"  # set -e: a failure exits, on_exit names the step
  fi
  update_child_cpu
  local took=$((SECONDS - step_start)) cpu=$((child_cpu - cpu_start))
  if [ "$rc" -ne 0 ]; then
    step_times+=("${current_step} ${took}s (cpu ${cpu}s) FAILED (exit ${rc})")
    echo "---- step ${current_step} FAILED (exit ${rc}) after ${took}s (cpu ${cpu}s)"
    failed_steps+=("${current_step}")
    return 0
  fi
  step_times+=("${current_step} ${took}s (cpu ${cpu}s)")
  echo "---- step ${current_step} done in ${took}s (cpu ${cpu}s)"
}

# The kernel variants a unit-test binary runs (tests/test_kernel_variants.cpp), so the
# log of every build says which instruction set its tests exercised.
show_kernel_variants() {
  local exe="$1/tests/attnforge_tests"
  echo "---- kernel variants of ${exe}"
  "$exe" --gtest_filter='KernelVariants.*' --gtest_brief=1
}

# Configure and build one of the tests-only presets, show its kernel variants, run ctest.
run_test_preset() {
  local preset="$1"
  shift
  cmake --preset "$preset" "$@"
  cmake --build --preset "$preset" -j "$JOBS"
  show_kernel_variants "build/${preset}"
  ctest --preset "$preset"
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
  show_kernel_variants build/release
  ctest --preset release
}

# Runs NAME's binary: *_mpi programs (bench/bench_mpi, examples/long_context_mpi) through
# scripts/mpirun.sh on 2 ranks, pinned to this machine; they exist only when the release
# configure found MPI.
launcher_for() {
  local name="$1"
  shift
  if [[ "$name" == *_mpi ]]; then
    bash scripts/mpirun.sh 2 "$@"
  else
    "$@"
  fi
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
    launcher_for "$name" "$exe" --benchmark_min_time="$BENCH_MIN_TIME" --benchmark_repetitions=1 \
      --benchmark_filter="$filter"
  done
  [ "$found" -eq 1 ] || echo "no bench/bench_*.cpp sources; nothing to run"
  clang_check_programs bench/bench_*.cpp
}

# The release preset builds benchmarks and examples with g++ only; clang++ parses them too
# (syntax only, seconds each), so code only one compiler accepts cannot land unseen.
clang_check_programs() {
  if ! command -v clang++ >/dev/null; then
    echo "clang++ not found; benchmarks and examples not checked with it"
    return 0
  fi
  local source extra
  for source in "$@"; do
    [ -e "$source" ] || continue
    extra=()
    if [[ "$(basename "$source" .cpp)" == *_mpi ]]; then
      if ! command -v mpicxx >/dev/null; then
        echo "mpicxx not found; ${source} not checked with clang++"
        continue
      fi
      read -r -a extra <<<"$(mpicxx --showme:compile)"
    fi
    echo "---- clang++ -fsyntax-only ${source}"
    clang++ -std=c++17 -Wall -Wextra -Wpedantic -Werror -fsyntax-only -march=native \
      -DEIGEN_USE_THREADS -Iinclude -Ibench -isystem /usr/include/eigen3 "${extra[@]}" "$source"
  done
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
    launcher_for "$name" "$exe" --quick
  done
  [ "$found" -eq 1 ] || echo "no examples/*.cpp sources; nothing to run"
  clang_check_programs examples/*.cpp
}

# The unit tests built for the other instruction sets users ship (tests only, so they
# build fast): the x86-64 baseline (SSE2 packets) and AVX2 + FMA (CI builds the latter
# with clang++ against Eigen 5: avx2-clang-eigen5). `release` covers native.
step_isa-baseline() {
  run_test_preset isa-baseline
}

# The unit tests as a compiler without our x86 intrinsic kernels builds them (ARM, MSVC):
# only the generic kernels over Eigen packets, so those paths compile and pass on their own.
step_portable() {
  run_test_preset portable
}

step_isa-avx2() {
  run_test_preset isa-avx2
}

# The whole unit-test suite built with clang++ (native ISA).
step_clang() {
  run_test_preset clang
}

# Eigen 5.0.1 from a source tarball (not part of the repository), installed into
# build/third_party/eigen-5.0.1; the `eigen5` and `clang-eigen5` presets point Eigen3_DIR
# there. Returns 3 (after noting NOT RUN) when there is no tarball and it is not required.
EIGEN5_TARBALL="${ATTNFORGE_EIGEN5_TARBALL:-../shared/third_party/eigen-5.0.1.tar.xz}"
install_eigen5() {
  local step="$1"
  if [ ! -f "$EIGEN5_TARBALL" ]; then
    echo "${step}: Eigen 5 NOT RUN: no Eigen 5.0.1 tarball at '${EIGEN5_TARBALL}'" \
      "(set ATTNFORGE_EIGEN5_TARBALL to its path)"
    if [ "${ATTNFORGE_REQUIRE_EIGEN5:-0}" = 1 ]; then
      echo "${step}: ATTNFORGE_REQUIRE_EIGEN5=1, so this is a failure" >&2
      return 1
    fi
    echo "${step} (Eigen 5)" >>"$not_run_file"
    return 3
  fi
  local root=build/third_party
  local src="${root}/eigen-5.0.1-src" ebuild="${root}/eigen-5.0.1-build"
  local prefix="${root}/eigen-5.0.1" log="${root}/eigen-5.0.1-install.log"
  local stamp="${root}/eigen-5.0.1.sha256" sum
  sum="$(sha256sum <"$EIGEN5_TARBALL" | cut -d' ' -f1)"
  # Reinstalling would touch every header and force a full rebuild, so an install from
  # the same tarball is kept.
  if [ -f "${prefix}/share/eigen3/cmake/Eigen3Config.cmake" ] && [ -f "$stamp" ] &&
     [ "$(cat "$stamp")" = "$sum" ]; then
    echo "---- Eigen 5.0.1 from ${EIGEN5_TARBALL} already installed in ${prefix}"
  else
    echo "---- installing Eigen 5.0.1 from ${EIGEN5_TARBALL} into ${prefix}"
    rm -rf "$src" "$ebuild" "$prefix" "$stamp"
    mkdir -p "$src"
    tar -xJf "$EIGEN5_TARBALL" -C "$src" --strip-components=1
    # CMAKE_EXPORT_PACKAGE_REGISTRY=OFF: Eigen's configure otherwise registers its build
    # tree in ~/.cmake/packages, where every later find_package(Eigen3) can find it.
    if ! { cmake -S "$src" -B "$ebuild" -DCMAKE_INSTALL_PREFIX="$(pwd)/${prefix}" \
             -DCMAKE_EXPORT_PACKAGE_REGISTRY=OFF -DBUILD_TESTING=OFF -DEIGEN_BUILD_BLAS=OFF \
             -DEIGEN_BUILD_LAPACK=OFF -DEIGEN_BUILD_DOC=OFF -DEIGEN_BUILD_DEMOS=OFF &&
           cmake --install "$ebuild"; } >"$log" 2>&1; then
      tail -n 40 "$log"
      echo "${step}: installing Eigen 5.0.1 failed (log: ${log})" >&2
      return 1
    fi
    echo "$sum" >"$stamp"
  fi
}

# Runs the unit tests of PRESET (built against build/third_party/eigen-5.0.1) and checks
# that find_package took that Eigen, not the system's 3.4.
run_eigen5_preset() {
  local preset="$1" prefix=build/third_party/eigen-5.0.1 found variants
  run_test_preset "$preset"
  found="$(grep '^Eigen3_DIR:' "build/${preset}/CMakeCache.txt")"
  echo "---- ${found}"
  case "$found" in
    *"/${prefix}/share/eigen3/cmake") ;;
    *) echo "${preset}: the build did not use ${prefix}" >&2; return 1 ;;
  esac
  variants="$(build/${preset}/tests/attnforge_tests --gtest_filter='KernelVariants.Prints*')"
  case "$variants" in
    *"; Eigen 5."*) ;;
    *) echo "${preset}: the test binary does not report Eigen 5" >&2; return 1 ;;
  esac
}

# The step of the same name as PRESET: installs Eigen 5.0.1 and runs PRESET's unit tests
# against it; without the tarball (not required), those of FALLBACK against the system
# Eigen, if one is named.
run_eigen5_step() {
  local preset="$1" fallback="${2:-}" rc=0
  install_eigen5 "$preset" || rc=$?
  if [ "$rc" -eq 3 ]; then
    [ -z "$fallback" ] || run_test_preset "$fallback"
    return 0
  fi
  [ "$rc" -eq 0 ] || return "$rc"
  run_eigen5_preset "$preset"
}

# CI's one build for three things: the unit tests built with clang++ for AVX2 + FMA
# against Eigen 5.0.1 (g++ builds the baseline and native ones against Eigen 3.4; the
# fuzz target and the consumer warnings test compile clang++ at the native ISA). Without
# the tarball: the same against the system Eigen.
step_avx2-clang-eigen5() {
  run_eigen5_step avx2-clang-eigen5 avx2-clang
}

# The release unit tests (g++, native ISA) against Eigen 5.0.1.
step_eigen5() {
  run_eigen5_step eigen5
}

# The unit tests built with clang++ (native ISA) against Eigen 5.0.1; without the
# tarball, against the system Eigen.
step_clang-eigen5() {
  run_eigen5_step clang-eigen5 clang
}

step_asan() {
  cmake --preset asan
  cmake --build --preset asan -j "$JOBS"
  show_kernel_variants build/asan
  ctest --preset asan
}

# ThreadSanitizer over the whole unit-test binary (in shards, below): the concurrency tests
# (several callers, one shared Eigen::ThreadPoolDevice), every thread-count test (pools of
# 2 and 3 threads) and everything else that runs on a pool. Eigen's ThreadPool is
# header-only, so it is instrumented as well (README.md, "Reliability").
step_tsan() {
  cmake --preset tsan
  cmake --build --preset tsan -j "$JOBS" --target attnforge_tests
  # One process under TSan keeps a single core busy for most of its run, so the tests
  # run as JOBS gtest shards side by side (each test in exactly one shard).
  local shards="$JOBS" shard rc=0 pids=()
  for ((shard = 0; shard < shards; ++shard)); do
    GTEST_TOTAL_SHARDS="$shards" GTEST_SHARD_INDEX="$shard" \
      TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1" \
      build/tsan/tests/attnforge_tests --gtest_brief=1 >"build/tsan/shard${shard}.log" 2>&1 &
    pids+=("$!")
  done
  for ((shard = 0; shard < shards; ++shard)); do
    wait "${pids[shard]}" || rc=$?
    echo "---- TSan shard ${shard} of ${shards}:"
    cat "build/tsan/shard${shard}.log"
  done
  return "$rc"
}

# The libFuzzer target (tests/fuzz): every checked-in seed once, then FUZZ_SECONDS of
# fuzzing from them on a scratch copy of the corpus (new inputs land in build/, not in the
# repository). A failed check, a sanitizer report or an input running over 20 s stops it
# and leaves the input in build/fuzz/artifacts/.
FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
step_fuzz() {
  cmake --preset fuzz
  cmake --build --preset fuzz -j "$JOBS"
  echo "---- fuzz_attention compiled with: $(grep -o -- '-march=[^ ]*\|-m[a-z0-9]*avx[a-z0-9]*' \
    build/fuzz/compile_commands.json | sort -u | tr '\n' ' ')"
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

ALL_STEPS=(deps release ctest bench examples isa-baseline portable avx2-clang-eigen5 asan tsan fuzz)

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
[ "${#failed_steps[@]}" -eq 0 ]
