#!/usr/bin/env bash
# Streaming efficiency (streamed / resident tokens/s, same model and batch,
# measured in one run) at a DRAM budget of 100% and 25% of the model state,
# repeated; quote medians.   benches/streaming.sh [REPEATS] [PRESET]
set -euo pipefail
cd "$(dirname "$0")/.."
repeats=${1:-3}
preset=${2:-small}
for _ in $(seq "$repeats"); do
    for fraction in 1.0 0.25; do
        target/release/weightstream bench streaming --preset "$preset" --steps 3 --dram-fraction "$fraction"
    done
done
