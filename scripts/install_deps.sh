#!/usr/bin/env bash
# Installs the Debian packages attnforge needs to build, test and benchmark.
# Usage: scripts/install_deps.sh [extra-package ...]
# Idempotent: when every package is already installed it does nothing (no network).
set -euo pipefail

packages=(
  build-essential
  cmake
  libeigen3-dev
  libgtest-dev
  libgmock-dev
  googletest
  libbenchmark-dev
  # The fuzz and clang steps of scripts/test.sh: clang and its libFuzzer/sanitizer
  # runtimes (Debian 12 names: clang is clang 14 there, and its runtimes are only a
  # recommendation of it, which --no-install-recommends skips).
  clang
  libclang-rt-14-dev
  # The optional attnforge::mpi component (include/attnforge/mpi/) and its tests.
  libopenmpi-dev
  openmpi-bin
  # The eigen5 step unpacks the Eigen 5.0.1 tarball (.tar.xz); xz-utils is not in a
  # minimal Debian image.
  xz-utils
  "$@"
)

if ! command -v dpkg >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_deps: not a Debian-like system; install these yourself: ${packages[*]}" >&2
  exit 0
fi

is_installed() {
  dpkg -s "$1" 2>/dev/null | grep -q '^Status: install ok installed$'
}

missing=()
for pkg in "${packages[@]}"; do
  is_installed "$pkg" || missing+=("$pkg")
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "install_deps: all ${#packages[@]} packages already installed"
  exit 0
fi

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo_cmd=(sudo)
  else
    echo "install_deps: need root (or sudo) to install: ${missing[*]}" >&2
    exit 1
  fi
fi

echo "install_deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update
"${sudo_cmd[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
