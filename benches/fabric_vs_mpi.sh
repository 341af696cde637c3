#!/usr/bin/env bash
# The fabric against OpenMPI on this machine, one sitting per call, same
# byte counts and worker counts: `weightstream bench fabric` (TCP tree,
# with raw TCP between two processes) and MPI_Bcast / MPI_Reduce over TCP
# loopback (btl tcp,self). Needs Debian's openmpi-bin and libopenmpi-dev.
# Usage: [NS="1 2 4"] benches/fabric_vs_mpi.sh [BYTES] [REPEATS] [FANOUT] [EXTRA bench flags, e.g. --top-in-store]
# (NS: the worker counts, one fabric and one MPI run each.)
set -euo pipefail
cd "$(dirname "$0")/.."
BYTES=${1:-268435456}
REPEATS=${2:-5}
FANOUT=${3:-2}
EXTRA=${4:-}
command -v mpicc >/dev/null || { echo "needs mpicc (apt-get install openmpi-bin libopenmpi-dev)" >&2; exit 1; }
BIN=target/release/weightstream
[ -x "$BIN" ] || cargo build --release -p weightstream
OUT=$(mktemp -d /tmp/fabric-mpi.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
mpicc -O2 -o "$OUT/bcast_reduce" benches/mpi/bcast_reduce.c
for n in ${NS:-1 2 4}; do
    # shellcheck disable=SC2086
    "$BIN" bench fabric --workers "$n" --fanout "$FANOUT" --bytes "$BYTES" --repeats "$REPEATS" $EXTRA
    mpirun --allow-run-as-root --oversubscribe -np $((n + 1)) --mca btl tcp,self --mca btl_tcp_if_include lo \
        "$OUT/bcast_reduce" "$BYTES" "$REPEATS" 2>/dev/null
done
