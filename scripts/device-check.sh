#!/usr/bin/env bash
# The CUDA worker's checks and benchmarks on a GPU machine, in one call of
# a few minutes: run from the repository root with device/ built by
# scripts/build-device.sh. Writes logs and summary.json under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/ws-device-out}
mkdir -p "$OUT"
start=$(date +%s)
log() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/progress.log"; }

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

log "CUDA kernel and model tests"
timeout 60 device/cuda-gpu --test-threads=1 --nocapture > "$OUT/test-cuda.log" 2>&1
cuda_rc=$?
grep -E "^test |panicked|skipped" -A2 "$OUT/test-cuda.log" | head -60
log "GPU streamed vs resident tests"
timeout 100 device/train-gpu --test-threads=1 --nocapture > "$OUT/test-train.log" 2>&1
train_rc=$?
grep -E "^test |panicked|skipped" -A2 "$OUT/test-train.log" | head -40

log "benchmarks: GPT-2 small"
timeout 150 device/weightstream bench cuda --what all --model small --batch 16 --seq 1024 --steps 5 \
  > "$OUT/bench-small.jsonl" 2>> "$OUT/bench.err"
small_rc=$?
cat "$OUT/bench-small.jsonl"; tail -3 "$OUT/bench.err"
log "streaming at batch 32 (GPT-2 small)"
timeout 90 device/weightstream bench cuda --what streaming --model small --batch 32 --seq 1024 --steps 3 \
  >> "$OUT/bench-small.jsonl" 2>> "$OUT/bench.err"
tail -2 "$OUT/bench-small.jsonl"
left=$(( ${DEVICE_BUDGET_S:-420} - ($(date +%s) - start) ))
log "benchmarks: 1.1B ($left s left)"
if [ "$left" -gt 60 ]; then
  timeout "$left" device/weightstream bench cuda --what streaming --model 1b --batch 8 --seq 1024 --steps 3 \
    > "$OUT/bench-1b.jsonl" 2>> "$OUT/bench.err"
  big_rc=$?
  cat "$OUT/bench-1b.jsonl"; tail -3 "$OUT/bench.err"
else
  big_rc=skipped
fi
python3 - "$OUT" "$cuda_rc" "$train_rc" "$small_rc" "$big_rc" <<'PY'
import json, sys, re, os
out, cuda_rc, train_rc, small_rc, big_rc = sys.argv[1:]
def tests(path):
    t = open(path, errors="replace").read() if os.path.exists(path) else ""
    return {"passed": re.findall(r"^test (\S+) \.\.\. ok", t, re.M),
            "failed": re.findall(r"^test (\S+) \.\.\. FAILED", t, re.M),
            "skipped": "CUDA tests skipped" in t}
def jsonl(path):
    rows = []
    if os.path.exists(path):
        for l in open(path):
            try: rows.append(json.loads(l))
            except ValueError: pass
    return rows
s = {"exit": {"cuda_tests": cuda_rc, "train_tests": train_rc, "bench_small": small_rc, "bench_1b": big_rc},
     "cuda_tests": tests(f"{out}/test-cuda.log"), "train_tests": tests(f"{out}/test-train.log"),
     "bench": jsonl(f"{out}/bench-small.jsonl") + jsonl(f"{out}/bench-1b.jsonl")}
json.dump(s, open(f"{out}/summary.json", "w"), indent=1)
print(json.dumps({k: s[k] for k in ("exit",)}), "cuda failed:", s["cuda_tests"]["failed"], "train failed:", s["train_tests"]["failed"])
PY
log "done"
