#!/usr/bin/env bash
# Two scaletrain binaries A/B on `bench train` (fp32 and bf16-mixed), interleaved round by round
# (old, new, old, new, ...) so both see the same machine; prints every run and, per precision and
# thread count, the median over rounds of the per-round ratio new/old. Refuses to run while the
# 1-minute load average is 1.5 or more (FORCE=1 overrides; then say so next to the figures).
# Usage: bench/bf16_ab.sh OLD_BIN NEW_BIN [rounds] [steps]   (THREADS="1 2" by default)
# An old binary: git worktree add /tmp/old COMMIT && (cd /tmp/old && cargo build --release -p
# scaletrain-cli) && bench/bf16_ab.sh /tmp/old/target/release/scaletrain target/release/scaletrain
set -euo pipefail
old=${1:?usage: bench/bf16_ab.sh OLD_BIN NEW_BIN [rounds] [steps]}
new=${2:?usage: bench/bf16_ab.sh OLD_BIN NEW_BIN [rounds] [steps]}
rounds=${3:-5} steps=${4:-10} threads=${THREADS:-1 2}
for b in "$old" "$new"; do
  [[ -x "$b" ]] || { echo "$b: not an executable scaletrain binary" >&2; exit 2; }
done
load=$(cut -d' ' -f1 /proc/loadavg)
if [[ "${FORCE:-0}" != 1 ]] && python3 -c "import sys; sys.exit(float('$load') < 1.5)"; then
  echo "load average $load >= 1.5: not measuring (FORCE=1 to override)" >&2
  exit 2
fi
echo "load average at start: $load"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for i in $(seq "$rounds"); do
  for t in $threads; do
    for side in old new; do
      bin=$old
      [[ $side == new ]] && bin=$new
      "$bin" bench train --json --threads "$t" --steps "$steps" --precision fp32,bf16-mixed \
        > "$tmp/$side-t$t-r$i.json"
    done
  done
done
echo "load average at end: $(cut -d' ' -f1 /proc/loadavg)"
python3 - "$tmp" "$rounds" "$threads" <<'PY'
import json, statistics, sys
tmp, rounds, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
def tps(side, t, i):
    r = json.load(open(f"{tmp}/{side}-t{t}-r{i}.json"))
    return {v["precision"]: v["tokens_per_sec"] for v in r["variants"]}
for t in threads:
    ratios, seen = {}, {}
    for i in range(1, rounds + 1):
        o, n = tps("old", t, i), tps("new", t, i)
        print(f"threads {t} round {i}: " + ", ".join(
            f"{p} old {o[p]:.0f} new {n[p]:.0f}" for p in o))
        for p in o:
            ratios.setdefault(p, []).append(n[p] / o[p])
            seen.setdefault(p, []).append((o[p], n[p]))
    for p, rs in ratios.items():
        mo = statistics.median(x for x, _ in seen[p])
        mn = statistics.median(y for _, y in seen[p])
        print(f"threads {t} {p}: old {mo:.0f}, new {mn:.0f} tokens/s (medians); "
              f"new/old {statistics.median(rs):.2f} (median of {rounds} per-round ratios)")
PY
