#!/usr/bin/env bash
# Weight panels packed once per step (kernels::panels) on vs off, in CPU seconds per training
# step, interleaved round by round in one binary (SCALETRAIN_NO_WEIGHT_PANELS=1 turns them off).
# CPU seconds (user + sys of every process of a run) hold up under other load better than wall
# time; each figure is (CPU of a run of 2+STEPS steps − CPU of a run of 2 steps) / STEPS, so
# start-up (data, model, the launcher) cancels. Variants: one process, global batch 8 as 4
# accumulated micro-batches of 2 (accum4), and `--pp 2` 1F1B (pp2, both processes), GPT-2 L4 H4
# C256 T128 vocab 32, 1 thread per process (bench/pp_bench.sh's model). Prints per round and the
# median over rounds of the per-round ratio off/on (> 1: panels faster), and the load average.
# Usage: bench/panels_ab.sh [ROUNDS] [STEPS]   (defaults 5, 20; BIN=target/release/scaletrain)
set -euo pipefail
rounds=${1:-5} steps=${2:-20} bin=${BIN:-target/release/scaletrain}
[[ -x "$bin" ]] || { echo "$bin: not an executable (cargo build --release)" >&2; exit 2; }
python3 - "$bin" "$rounds" "$steps" <<'PY'
import os, resource, statistics, subprocess, sys, tempfile
bin, rounds, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = ("--set model.n_layer=4 --set model.n_head=4 --set model.channels=256 "
         "--set model.seq_len=128 --set data.synthetic.vocab_size=32").split()
common = ("--threads 1 --no-progress --overwrite --set train.eval_every=0 "
          "--set train.checkpoint_every=0 --set train.eval_batches=1").split()
variants = {
    "accum4": ["--set", "train.batch_size=2", "--set", "train.grad_accum=4"],
    "pp2": ["--pp", "2", "--schedule", "1f1b", "--microbatches", "4", "--set", "train.batch_size=2"],
}
tmp = tempfile.mkdtemp()
def cpu(args, n, off):
    env = dict(os.environ)
    env.pop("SCALETRAIN_NO_WEIGHT_PANELS", None)
    if off:
        env["SCALETRAIN_NO_WEIGHT_PANELS"] = "1"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([bin, "train", *model, *args, *common, "--steps", str(n), "--out", f"{tmp}/run"],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
def per_step(args, off):
    return (cpu(args, 2 + steps, off) - cpu(args, 2, off)) / steps
print(f"load average at start: {open('/proc/loadavg').read().split()[0]}")
ratios = {v: [] for v in variants}
for r in range(1, rounds + 1):
    line = []
    for v, args in variants.items():
        off = per_step(args, True)
        on = per_step(args, False)
        ratios[v].append(off / on)
        line.append(f"{v} off {1e3 * off:.1f} on {1e3 * on:.1f} ms CPU/step ({off / on:.3f}x)")
    print(f"round {r}: " + "; ".join(line), flush=True)
for v, rs in ratios.items():
    print(f"{v}: off/on {statistics.median(rs):.3f}x (median of {rounds} per-round ratios: "
          + ", ".join(f"{x:.3f}" for x in rs) + ")")
print(f"load average at end: {open('/proc/loadavg').read().split()[0]}")
subprocess.run(["rm", "-rf", tmp])
PY
