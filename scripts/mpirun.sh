#!/usr/bin/env bash
# Launches an MPI program on this machine only: scripts/mpirun.sh NP PROGRAM [ARGS...]
# Pins Open MPI to shared memory (vader, no kernel single-copy: it needs ptrace rights
# containers lack) and to the loopback for its runtime, oversubscribes (CI has 2
# cores, the tests run up to 4 ranks), and allows root (CI runs as root).
set -euo pipefail
np="$1"
shift
export OMPI_ALLOW_RUN_AS_ROOT=1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl=self,vader
export OMPI_MCA_btl_vader_single_copy_mechanism=none
export OMPI_MCA_oob_tcp_if_include=lo
export OMPI_MCA_rmaps_base_oversubscribe=1
exec "${MPIEXEC:-mpiexec}" --oversubscribe --bind-to none -n "$np" "$@"
