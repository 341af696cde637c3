#!/usr/bin/env bash
# Data-parallel scaling on this machine: tokens/s of the tiny preset on the
# bundled corpus for one worker (the embedded default), two worker threads
# behind the fabric, and two worker processes (`cluster`), alternating, for
# SITTINGS sittings. Each figure is the median of the steps' own tokens/s
# (metrics.jsonl) after the first two. Usage: [BIN=path] benches/fabric_scaling.sh [SITTINGS] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
SITTINGS=${1:-3}
STEPS=${2:-20}
BIN=${BIN:-target/release/weightstream}
[ -x "$BIN" ] || cargo build --release -p weightstream
OUT=$(mktemp -d /tmp/fabric-scaling.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
median_tps() {
    python3 -c "import json,statistics,sys; r=[json.loads(l)['tokens_per_s'] for l in open(sys.argv[1])][2:]; print(round(statistics.median(r)))" "$1"
}
SETS=(--set train.steps=$STEPS --set train.eval_interval=0 --set train.eval_batches=1 --set train.export_hf=false)
for s in $(seq 1 "$SITTINGS"); do
    for mode in one threads2 processes2; do
        dir=$OUT/$mode-$s
        case $mode in
            one) $BIN train "${SETS[@]}" --set run_dir="$dir" >/dev/null 2>&1 ;;
            threads2) $BIN train --workers 2 "${SETS[@]}" --set run_dir="$dir" >/dev/null 2>&1 ;;
            processes2) $BIN cluster --workers 2 "${SETS[@]}" --set run_dir="$dir" >/dev/null 2>&1 ;;
        esac
        echo "{\"bench\": \"fabric-scaling\", \"sitting\": $s, \"mode\": \"$mode\", \"tokens_per_s\": $(median_tps "$dir/metrics.jsonl")}"
    done
done
