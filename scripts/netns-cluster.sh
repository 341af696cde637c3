#!/usr/bin/env bash
# Issue 4's multi-host test on one machine: network namespaces as separate
# hosts (one per process, each with its own address on a bridge, optionally
# rate-limited with tc), a store, three fabric nodes and four workers
# (fan-out 2) across them, talking over real interfaces. The run's weights
# must equal, byte for byte, the same run's in one process.
#
#   scripts/netns-cluster.sh [RATE]      # RATE: e.g. 1gbit (tc tbf per host); default none
#
# Needs root (ip netns, a bridge, veth pairs); says why and exits 0 where it
# cannot create them. Builds target/release/weightstream first if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-}
skip() { echo "netns-cluster: skipped: $*"; exit 0; }
[ "$(id -u)" -eq 0 ] || skip "needs root"
command -v ip >/dev/null || skip "needs iproute2 (ip)"
[ -x target/release/weightstream ] || cargo build --release -p weightstream
BIN=$PWD/target/release/weightstream

TAG=ws$$
BR=br-$TAG
HOSTS=8 # store, 3 nodes, 4 workers
WORK=$(mktemp -d /tmp/netns-cluster.XXXXXX)
cleanup() {
    for i in $(seq 0 $((HOSTS - 1))); do ip netns del "$TAG-h$i" 2>/dev/null || true; done
    ip link del "$BR" 2>/dev/null || true
    [ -n "${PIDS:-}" ] && kill $PIDS 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
ip link add "$BR" type bridge 2>/dev/null || skip "cannot create a bridge here"
ip link set "$BR" up
for i in $(seq 0 $((HOSTS - 1))); do
    ns=$TAG-h$i
    ip netns add "$ns" 2>/dev/null || skip "cannot create network namespaces here"
    ip link add "v$TAG$i" type veth peer name eth0 netns "$ns"
    ip link set "v$TAG$i" master "$BR" up
    ip -n "$ns" addr add "10.77.0.$((i + 1))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    if [ -n "$RATE" ]; then
        ip netns exec "$ns" tc qdisc add dev eth0 root tbf rate "$RATE" burst 256kb latency 50ms
    fi
done

SETS=(--set model.n_layer=2 --set model.n_head=2 --set model.n_embd=64 --set model.block_size=64
      --set train.steps=4 --set train.batch_size=8 --set train.micro_batch=1 --set train.warmup_steps=1
      --set train.eval_interval=2 --set train.eval_batches=2
      --set data.path=$PWD/fixtures/shakespeare_excerpt.txt --set data.cache_dir=)
export WEIGHTSTREAM_SECRET
WEIGHTSTREAM_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
STORE=10.77.0.1:7070
export RAYON_NUM_THREADS=1

start=$(date +%s.%N)
ip netns exec "$TAG-h0" "$BIN" store --listen "$STORE" --workers 4 --fanout 2 "${SETS[@]}" \
    --set run_dir="$WORK/hosts" >"$WORK/store.log" 2>&1 &
STORE_PID=$!
PIDS=""
for i in 1 2 3; do
    ip netns exec "$TAG-h$i" "$BIN" fabric --store "$STORE" --bind "10.77.0.$((i + 1)):0" --timeout 60 \
        >"$WORK/node$i.log" 2>&1 &
    PIDS="$PIDS $!"
done
for i in 4 5 6 7; do
    ip netns exec "$TAG-h$i" "$BIN" worker --store "$STORE" --timeout 60 >"$WORK/worker$i.log" 2>&1 &
    PIDS="$PIDS $!"
done
if ! wait "$STORE_PID"; then
    echo "netns-cluster: FAILED: the store exited with an error" >&2
    tail -n 20 "$WORK"/*.log >&2
    exit 1
fi
end=$(date +%s.%N)
wait $PIDS || true
PIDS=""

"$BIN" train --workers 4 --fanout 2 "${SETS[@]}" --set run_dir="$WORK/one" >"$WORK/one.log" 2>&1
if ! cmp -s "$WORK/hosts/checkpoint-000004/model.safetensors" "$WORK/one/checkpoint-000004/model.safetensors"; then
    echo "netns-cluster: FAILED: the weights across hosts differ from the same run in one process" >&2
    exit 1
fi
TPS=$(grep -o '[0-9]* tok/s' "$WORK/store.log" | tail -n 1)
echo "netns-cluster: ok: 8 hosts (store, 3 fabric nodes, 4 workers${RATE:+, $RATE each}), weights equal the one-process run;" \
     "$(awk "BEGIN { printf \"%.1f\", $end - $start }") s, $TPS"
