#!/usr/bin/env bash
# The CUDA worker's checks and benchmarks on a GPU machine, in one call of
# a few minutes: run from the repository root with device/ built by
# scripts/build-device.sh. Writes logs and summary.json under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/ws-device-out}
mkdir -p "$OUT"
start=$(date +%s)
log() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/progress.log"; }
# take MIN KIND LINE: splits a list line into $label and $rest and sets $left
# (seconds of the call's budget left); fails, saying so, under MIN seconds.
take() {
  label=${3%%:*}; rest=${3#*:}
  left=$(( ${DEVICE_BUDGET_S:-420} - ($(date +%s) - start) ))
  if [ "$left" -lt "$1" ]; then log "skipped ($left s left): $2 $label"; return 1; fi
}

# CUDA 13 libraries: the toolkit's, else the Python wheels'.
for lib in libcublas.so.13 libnvrtc.so.13 libcublasLt.so.13; do
  d=$(find /usr/local/cuda* /usr/lib /opt -name "$lib" -print -quit 2>/dev/null | xargs -r dirname)
  [ -n "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
log "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv 2>&1 | tee -a "$OUT/progress.log"
ldconfig -p 2>/dev/null | grep -E "libcuda.so|libcublas|libnvrtc" | head -8 | tee -a "$OUT/progress.log"
# The test binaries find the fixtures where they were built.
mkdir -p /work && [ -e /work/main ] || ln -s "$PWD" /work/main

# TESTS=0 skips the CUDA test binaries (a call that only measures the CPU).
cuda_rc=skipped; train_rc=skipped
if [ "${TESTS:-1}" != 0 ]; then
  log "CUDA kernel and model tests"
  timeout 60 device/cuda-gpu --test-threads=1 --nocapture > "$OUT/test-cuda.log" 2>&1
  cuda_rc=$?
  grep -E "^test |panicked|skipped" -A2 "$OUT/test-cuda.log" | head -60
  log "GPU streamed vs resident tests"
  timeout 100 device/train-gpu --test-threads=1 --nocapture > "$OUT/test-train.log" 2>&1
  train_rc=$?
  grep -E "^test |panicked|skipped" -A2 "$OUT/test-train.log" | head -40
fi

# Each benchmark: a label, then `weightstream bench cuda` arguments, which
# may start with VAR=value settings for the run (WS_CUDA_ATTENTION=materialized
# keeps attention as a T x T matrix, WS_CUDA_GEMM=cublas leaves cuBLASLt
# out; BIN=path runs another weightstream binary, e.g. the last commit's
# built beside this one: comparisons in one sitting). Runs while the call's
# budget (DEVICE_BUDGET_S, seconds) lasts.
BENCHES=${BENCHES-"small-b64:--what all --model small --batch 64 --micro-batch 64 --seq 1024 --steps 4
small-b16:--what train --model small --batch 16 --seq 1024 --steps 5
small-b128-stream:--what streaming --model small --batch 128 --micro-batch 64 --seq 1024 --steps 3
1b:--what train --model 1b --batch 16 --seq 1024 --steps 3
1b-b64-stream:--what streaming --model 1b --batch 64 --micro-batch 32 --seq 1024 --steps 3
large:--what large --batch 4 --seq 1024 --steps 10 --data device/shakespeare.bin"}
bench_rc=0
while IFS= read -r line; do
  [ -z "$line" ] && continue
  label=${line%%:*}; rest=${line#*:}; settings=""
  while [[ "$rest" =~ ^([A-Z_]+=[^ ]+)\ (.*)$ ]]; do
    settings="$settings ${BASH_REMATCH[1]}"; rest=${BASH_REMATCH[2]}
  done
  settings=${settings# }
  bin=device/weightstream
  if [[ " $settings " =~ \ BIN=([^ ]+)\  ]]; then
    bin=${BASH_REMATCH[1]}; settings=$(echo " $settings " | sed "s| BIN=[^ ]* | |; s|^ *||; s| *$||")
  fi
  left=$(( ${DEVICE_BUDGET_S:-420} - ($(date +%s) - start) ))
  if [ "$left" -lt 45 ]; then log "skipped ($left s left): $label $settings $rest"; continue; fi
  log "bench $label ${settings:+($settings) }[$bin] $rest"
  # shellcheck disable=SC2086
  env $settings timeout "$left" "$bin" bench cuda $rest \
    2>> "$OUT/bench.err" | sed "s|^{|{\"label\": \"$label\", \"settings\": \"$settings\", \"bin\": \"$bin\", |" >> "$OUT/bench.jsonl"
  rc=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] && bench_rc=$rc
  tail -n 3 "$OUT/bench.jsonl"; tail -n 2 "$OUT/bench.err"
done <<< "$BENCHES"
# Training runs on the bundled corpus (device/shakespeare.bin): a label, then
# `weightstream train` arguments. Their output goes to $OUT/train.log and
# their per-step metrics, tagged with the label, to $OUT/train-metrics.jsonl
# (the device tool returns at most 8 files).
m1b="--set model.n_layer=20 --set model.n_head=16 --set model.n_embd=2048 --set model.block_size=1024 --set train.seq_len=1024 --set train.batch_size=8 --set train.steps=40 --set train.warmup_steps=10 --set train.lr=2e-4 --set train.min_lr=2e-5 --set train.precision=bf16 --set train.eval_batches=2 --set train.export_hf=false"
TRAINS=${TRAINS-"1b-resident:$m1b --set stream.mode=resident
1b-streamed:$m1b --set stream.mode=streaming --set stream.dtype=bf16"}
while IFS= read -r line; do
  [ -z "$line" ] && continue
  take 30 train "$line" || continue
  log "train $label: $rest"
  dir=/tmp/ws-train-$label
  rm -rf "$dir"
  echo "== $label" >> "$OUT/train.log"
  # shellcheck disable=SC2086
  timeout "$left" device/weightstream train --set train.device=cuda --set data.path=device/shakespeare.bin \
    --set data.cache_dir= --set run_dir=$dir $rest >> "$OUT/train.log" 2>&1
  echo "exit $?" >> "$OUT/train.log"
  [ -f "$dir/metrics.jsonl" ] && sed "s/^{/{\"label\": \"$label\", /" "$dir/metrics.jsonl" >> "$OUT/train-metrics.jsonl"
  rm -rf "$dir"
  python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1]) if l.strip()]; print(sys.argv[2], [round(x['train_loss'],4) for x in r if x.get('label')==sys.argv[2] and 'train_loss' in x])" \
    "$OUT/train-metrics.jsonl" "$label" 2>/dev/null | tee -a "$OUT/progress.log"
  tail -n 2 "$OUT/train.log"
done <<< "$TRAINS"
# The fabric on the device machine's 16 cores (issue 4): the tree on
# loopback against raw TCP in the same run, where every edge's copies have
# cores of their own (on the 2-core development VM they share two). A
# label, then `weightstream bench fabric` arguments; JSON lines to
# $OUT/fabric.jsonl. A few seconds each.
# Both lists run SITTINGS times, alternating (quote medians); each JSON line
# gets a "sitting" field.
# The default list is session 12's (BENCHMARKS.md), so that a rerun
# compares line for line.
FABRIC=${FABRIC-"f1:--workers 1 --fanout 2 --repeats 5
f2x2:--workers 2 --fanout 2 --repeats 5
f4x2:--workers 4 --fanout 2 --repeats 5
f4x4-top:--workers 4 --fanout 4 --top-in-store --repeats 5
f8x2:--workers 8 --fanout 2 --repeats 5
f8x4-top:--workers 8 --fanout 4 --top-in-store --repeats 5
f8x8-top:--workers 8 --fanout 8 --top-in-store --repeats 5
latency:--workers 64 --fanout 4 --latency"}
# The CPU streaming efficiency on the device machine's 16 cores (issue 3):
# `weightstream bench streaming` arguments, the page cache dropped before
# each run where this machine lets us (the line says whether it did).
STREAMING=${STREAMING-}
for sitting in $(seq "${SITTINGS:-1}"); do
  while IFS= read -r line; do
    [ -z "$line" ] && continue
    take 20 fabric "$line" || continue
    log "fabric $label (sitting $sitting): $rest"
    # shellcheck disable=SC2086
    timeout "$left" device/weightstream bench fabric $rest 2>> "$OUT/bench.err" \
      | sed "s|^{|{\"label\": \"$label\", \"sitting\": $sitting, |" | tee -a "$OUT/fabric.jsonl" | cut -c1-220
  done <<< "$FABRIC"
  while IFS= read -r line; do
    [ -z "$line" ] && continue
    take 60 streaming "$line" || continue
    sync; dropped=false
    if echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then dropped=true; fi
    log "streaming $label (sitting $sitting, page cache dropped: $dropped): $rest"
    # shellcheck disable=SC2086
    timeout "$left" device/weightstream bench streaming $rest 2>> "$OUT/bench.err" \
      | sed "s|^{|{\"label\": \"$label\", \"sitting\": $sitting, \"cache_dropped\": $dropped, |" \
      | tee -a "$OUT/streaming.jsonl" | cut -c1-400
  done <<< "$STREAMING"
done
python3 - "$OUT" "$cuda_rc" "$train_rc" "$bench_rc" <<'PY'
import json, sys, re, os
out, cuda_rc, train_rc, bench_rc = sys.argv[1:]
def tests(path):
    t = open(path, errors="replace").read() if os.path.exists(path) else ""
    # With --nocapture a test's "ok" may land after its output: count from the summary line.
    return {"result": re.findall(r"^test result: .*", t, re.M),
            "failed": re.findall(r"^    (\S+)$", t.split("failures:")[-1], re.M) if "FAILED" in t else [],
            "skipped": "CUDA tests skipped" in t}
def jsonl(path):
    rows = []
    if os.path.exists(path):
        for l in open(path):
            try: rows.append(json.loads(l))
            except ValueError: pass
    return rows
s = {"exit": {"cuda_tests": cuda_rc, "train_tests": train_rc, "bench": bench_rc},
     "cuda_tests": tests(f"{out}/test-cuda.log"), "train_tests": tests(f"{out}/test-train.log"),
     "bench": jsonl(f"{out}/bench.jsonl"), "fabric": jsonl(f"{out}/fabric.jsonl"),
     "streaming": jsonl(f"{out}/streaming.jsonl")}
json.dump(s, open(f"{out}/summary.json", "w"), indent=1)
print(json.dumps({k: s[k] for k in ("exit",)}), "cuda failed:", s["cuda_tests"]["failed"], "train failed:", s["train_tests"]["failed"])
PY
log "done"
