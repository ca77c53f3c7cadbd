#!/usr/bin/env bash
# Two scaletrain binaries A/B on `bench train` (fp32 and bf16-mixed), interleaved round by round
# (old, new, old, new, ...) so both see the same machine; prints every run and, per precision and
# thread count, the median over rounds of the per-round ratio new/old. Refuses to run while the
# 1-minute load average is 1.5 or more (FORCE=1 overrides; then say so next to the figures).
# Usage: bench/bf16_ab.sh OLD_BIN NEW_BIN [rounds] [steps]   (THREADS="1 2" by default)
# CPU=1: user + system CPU seconds per step instead of tokens/s, for a machine that is not
# quiet: each binary runs `bench train` with STEPS and with 2 timed steps, and the difference
# over STEPS - 2 steps cancels start-up, initialisation and the matmul probe; per round the
# ratio old/new (> 1: new is faster); runs at any load (the load is printed). CPU time still
# grows somewhat with contention (shared caches), so quiet tokens/s remain the final word.
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
if [[ "${CPU:-0}" == 1 ]]; then
  echo "CPU seconds per step, load average at start: $load"
  exec python3 - "$old" "$new" "$rounds" "$steps" "$threads" <<'PY'
import resource, statistics, subprocess, sys
old, new, rounds, steps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5].split()
if steps < 3:
    sys.exit("CPU=1 needs steps >= 3 (the difference against a 2-step run)")
def cpu(b, t, p, s):
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([b, "bench", "train", "--threads", t, "--precision", p, "--steps", str(s),
                    "--warmup", "1"], check=True, stdout=subprocess.DEVNULL)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
def per_step(b, t, p):
    return (cpu(b, t, p, steps) - cpu(b, t, p, 2)) / (steps - 2) * 1000
ratios, ms = {}, {}
for i in range(1, rounds + 1):
    for t in threads:
        for p in ("fp32", "bf16-mixed"):
            o, n = per_step(old, t, p), per_step(new, t, p)
            ratios.setdefault((t, p), []).append(o / n)
            ms.setdefault((t, p), []).append((o, n))
            load = open("/proc/loadavg").read().split()[0]
            print(f"round {i} threads {t} {p}: old {o:.1f}, new {n:.1f} ms CPU/step "
                  f"(old/new {o / n:.3f}; load {load})", flush=True)
for (t, p), rs in ratios.items():
    mo = statistics.median(o for o, _ in ms[(t, p)])
    mn = statistics.median(n for _, n in ms[(t, p)])
    print(f"threads {t} {p}: old {mo:.1f}, new {mn:.1f} ms CPU/step (medians); old/new "
          f"{statistics.median(rs):.3f} (median of {rounds} per-round ratios; "
          f"{', '.join(f'{r:.3f}' for r in rs)})")
PY
fi
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
