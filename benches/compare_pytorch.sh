#!/usr/bin/env bash
# weightstream vs PyTorch training throughput, side by side in one sitting:
# the same preset, batch, sequence and precision, 2 threads each, runs
# alternating so that machine noise hits both. Prints JSON lines (ours have
# "bench":"train", PyTorch's "impl":"pytorch"); quote medians of the repeats.
#
#   benches/compare_pytorch.sh [REPEATS] > results.jsonl
# Needs: cargo build --release, and Python with reference/requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
repeats=${1:-3}
bin=target/release/weightstream
for preset in tiny small; do
    for precision in fp32 bf16; do
        for _ in $(seq "$repeats"); do
            if [ "$preset" = tiny ]; then steps=10; else steps=3; fi
            "$bin" bench train --preset "$preset" --precision "$precision" --steps "$steps"
            python3 reference/bench_torch.py --preset "$preset" --precision "$precision"
        done
    done
done
