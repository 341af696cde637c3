#!/usr/bin/env bash
# Runs a command and traces its memory: every 0.5 s the resident set and
# its peak (VmRSS, VmHWM from /proc/PID/status), and every 20 s the
# mappings by size from /proc/PID/smaps (allocator arenas of 900 MB and
# more, 60-900 MB: the store's page buffers, the rest), all in MiB.
# Usage: scripts/rss-trace.sh OUT_PREFIX command [args...] (the command
# itself: a wrapper such as /usr/bin/time would be the process traced)
# Writes OUT_PREFIX.rss (seconds since start, VmRSS KiB, VmHWM KiB),
# OUT_PREFIX.maps and OUT_PREFIX.log (the command's output, timestamped).
set -uo pipefail
out=$1; shift
start=$(date +%s.%N)
since() { echo "$(date +%s.%N) - $start" | bc; }
"$@" > >(while IFS= read -r l; do echo "$(since) $l"; done > "$out.log") 2>&1 &
pid=$!
: > "$out.rss"; : > "$out.maps"; n=0
while kill -0 "$pid" 2>/dev/null; do
  st=$(awk '/^VmRSS|^VmHWM/ {printf "%s ", $2}' "/proc/$pid/status" 2>/dev/null) && echo "$(since) $st" >> "$out.rss"
  if [ $((n % 40)) -eq 0 ]; then
    python3 - "$pid" "$(since)" >> "$out.maps" 2>/dev/null <<'PY'
import re, sys
pid, t = sys.argv[1], sys.argv[2]
sums, size = {"all": 0, "arenas": 0, "pages": 0, "rest": 0}, 0
for line in open(f"/proc/{pid}/smaps"):
    m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
    if m:
        size = (int(m.group(2), 16) - int(m.group(1), 16)) >> 20
    elif line.startswith("Rss:"):
        r = int(line.split()[1]) >> 10
        sums["all"] += r
        sums["arenas" if size >= 900 else "pages" if size >= 60 else "rest"] += r
print(t, " ".join(f"{k} {v}" for k, v in sums.items()))
PY
  fi
  n=$((n + 1)); sleep 0.5
done
wait "$pid"; rc=$?
echo "peak VmHWM $(awk '{print $3}' "$out.rss" | sort -n | tail -1) KiB, exit $rc" | tee -a "$out.log"
exit $rc
