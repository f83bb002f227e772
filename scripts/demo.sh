#!/usr/bin/env bash
# Builds and runs the `generate` example. Arguments go to the example (e.g. --quick).
# Usage: bash scripts/demo.sh [args...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install_deps.sh
cmake --preset release
cmake --build --preset release --target generate -j "${JOBS:-2}"
exec build/release/examples/generate "$@"
