#!/usr/bin/env bash
# Launches an MPI program on this machine only: scripts/mpirun.sh NP PROGRAM [ARGS...]
# Pins Open MPI to shared memory (vader, no kernel single-copy: it needs ptrace rights
# containers lack) and to the loopback for its runtime, oversubscribes (CI has 2
# cores, the tests run up to 4 ranks), and allows root (CI runs as root).
# Each launch gets a session directory of its own: two launches that start together
# race to create the shared default (/tmp/ompi.HOST.UID), and the loser fails in
# orte_init ("mkdir ... File exists"); CTest runs the MPI tests in parallel.
set -euo pipefail
np="$1"
shift
export OMPI_ALLOW_RUN_AS_ROOT=1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl=self,vader
export OMPI_MCA_btl_vader_single_copy_mechanism=none
export OMPI_MCA_oob_tcp_if_include=lo
export OMPI_MCA_rmaps_base_oversubscribe=1
session_dir="$(mktemp -d "${TMPDIR:-/tmp}/attnforge-mpi.XXXXXX")"
trap 'rm -rf "$session_dir"' EXIT
export OMPI_MCA_orte_tmpdir_base="$session_dir"
status=0
"${MPIEXEC:-mpiexec}" --oversubscribe --bind-to none -n "$np" "$@" || status=$?
exit "$status"
