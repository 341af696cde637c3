#!/usr/bin/env bash
# Quality of sparse training: validation loss after the same number of steps
# on the bundled corpus, dense vs 50/75/90% static vs 90% dynamic (SET and
# RigL), attention and MLP matrices at the same level. One JSON line per run.
#   benches/sparsity_quality.sh [STEPS] [PRESET]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-200}
preset=${2:-tiny}
out=$(mktemp -d)
run() {
    local name=$1; shift
    target/release/weightstream train --set preset="$preset" --set train.steps="$steps" \
        --set run_dir="$out/$name" --set train.export_hf=false "$@" >/dev/null 2>"$out/$name.log" \
        || { cat "$out/$name.log" >&2; exit 1; }
    local val
    val=$(grep -o '"val_loss":[0-9.]*' "$out/$name/metrics.jsonl" | tail -1 | cut -d: -f2)
    echo "{\"bench\":\"sparsity_quality\",\"preset\":\"$preset\",\"steps\":$steps,\"run\":\"$name\",\"val_loss\":$val}"
}
run dense
for s in 0.5 0.75 0.9; do
    run "static-$s" --set sparsity.attention=$s --set sparsity.mlp=$s
done
for d in set rigl; do
    run "dynamic-$d-0.9" --set sparsity.attention=0.9 --set sparsity.mlp=0.9 --set sparsity.dynamic=$d \
        --set sparsity.update_every=25 --set sparsity.update_until=$((steps * 3 / 4))
done
rm -rf "$out"
