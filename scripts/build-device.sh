#!/usr/bin/env bash
# Builds what scripts/device-check.sh runs on a GPU machine that has no Rust
# toolchain: the weightstream binary and the CUDA test binaries, with the
# `cuda` feature, stripped, into device/ (ignored by git; carry it).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf device && mkdir -p device
cargo build --release --features cuda -p weightstream
cp target/release/weightstream device/
test_exe() { # cargo test arguments -> the test executable built
  cargo test --release "$@" --no-run --message-format=json 2>/dev/null | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]==["test"]: print(m["executable"])' | tail -1
}
cp "$(test_exe -p ws-cuda --test gpu)" device/cuda-gpu
cp "$(test_exe -p ws-train --features cuda --test gpu)" device/train-gpu
strip device/*
# The corpus as tokens, for `bench cuda --what large --data` (the device
# machine has no tokenizer cache); any `weightstream train` here makes it.
bin=$(ls .cache/weightstream/shakespeare-*.bin 2>/dev/null | head -1)
if [ -n "$bin" ]; then cp "$bin" device/shakespeare.bin; else echo "no tokenized corpus in .cache/weightstream: run weightstream train once"; fi
ls -la device
