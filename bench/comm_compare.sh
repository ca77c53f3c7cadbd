#!/usr/bin/env bash
# Run scaletrain's all-reduce and its peers (PyTorch Gloo, OpenMPI) back to back on the same sizes,
# REPEAT times in rotation, and print one table of bus bandwidth (GB/s, best of the repeats for every
# implementation alike) with ratios. Raw results land in target/comm-bench/runN/.
#   REPEAT=3 bench/comm_compare.sh [NPROC] [SIZES] [FACTOR]
# Needs: a Python with torch (PYTHON=…, default /work/venv-torch/bin/python) and mpicc/mpirun
# (apt-get install -y libopenmpi-dev openmpi-bin; libclang-dev too for the st-over-mpi column).
# A peer that is missing is left out of the table.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${1:-2}
SIZES=${2:-1K..256M}
FACTOR=${3:-4}
REPEAT=${REPEAT:-1}
PYTHON=${PYTHON:-/work/venv-torch/bin/python}
OUT=target/comm-bench
rm -rf "$OUT" && mkdir -p "$OUT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cargo build --release -q -p scaletrain-cli
ST=target/release/scaletrain
MPI_ST=""
if command -v mpicc >/dev/null; then
  mpicc -O2 -o "$OUT/mpi_allreduce" bench/mpi_allreduce.c
  if cargo build --release -q -p scaletrain-cli --features mpi --target-dir target/mpi 2>/dev/null; then
    MPI_ST=target/mpi/release/scaletrain
  fi
fi
HAVE_TORCH=0
"$PYTHON" -c "import torch" 2>/dev/null && HAVE_TORCH=1
for i in $(seq 1 "$REPEAT"); do
  R="$OUT/run$i"; mkdir -p "$R"
  for t in tcp shm threads; do
    "$ST" bench comm --nproc "$NPROC" --transport "$t" --algo auto --sizes "$SIZES" --factor "$FACTOR" --json > "$R/scaletrain-$t.json"
  done
  if [ "$HAVE_TORCH" = 1 ]; then
    "$PYTHON" bench/gloo_allreduce.py --nproc "$NPROC" --sizes "$SIZES" --factor "$FACTOR" --json > "$R/gloo.json"
  fi
  if [ -x "$OUT/mpi_allreduce" ]; then
    mpirun --oversubscribe -n "$NPROC" "$OUT/mpi_allreduce" "$SIZES" "$FACTOR" > "$R/openmpi.json"
  fi
  if [ -n "$MPI_ST" ]; then
    mpirun --oversubscribe -n "$NPROC" "$MPI_ST" bench comm --transport mpi --worker --algo auto --sizes "$SIZES" --factor "$FACTOR" \
      | python3 -c 'import json,sys; print(json.dumps({"results": json.loads(sys.stdin.read().strip().splitlines()[-1])}))' \
      > "$R/scaletrain-mpi.json"
  fi
done
python3 - "$OUT" "$REPEAT" <<'PY'
import glob, json, os, sys
out, repeat = sys.argv[1], int(sys.argv[2])
cols = [("scaletrain-tcp", "tcp"), ("scaletrain-shm", "shm"), ("scaletrain-threads", "threads"),
        ("scaletrain-mpi", "st-over-mpi"), ("gloo", "Gloo"), ("openmpi", "OpenMPI")]
data = {}
for f, name in cols:
    for p in glob.glob(os.path.join(out, "run*", f + ".json")):
        for r in json.load(open(p))["results"]:
            d = data.setdefault(name, {})
            d[r["bytes"]] = max(d.get(r["bytes"], 0.0), r["busbw_gbps"])
names = [n for _, n in cols if n in data]
sizes = sorted(next(iter(data.values())).keys())
def h(b):
    for u, m in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if b >= m and b % m == 0:
            return f"{b // m}{u}"
    return str(b)
print(f"bus bandwidth, GB/s, best of {repeat} run(s)")
print("| bytes | " + " | ".join(names) + " | tcp / Gloo | shm / max(Gloo, OpenMPI) |")
print("|" + "---|" * (len(names) + 3))
for b in sizes:
    v = {n: data[n].get(b) for n in names}
    cells = [f"{v[n]:.3f}" if v[n] is not None else "" for n in names]
    g, m = v.get("Gloo"), v.get("OpenMPI")
    r1 = f"{v['tcp'] / g:.2f}" if g and v.get("tcp") else ""
    best = max([x for x in (g, m) if x] or [0])
    r2 = f"{v['shm'] / best:.2f}" if best and v.get("shm") else ""
    print(f"| {h(b)} | " + " | ".join(cells) + f" | {r1} | {r2} |")
PY
