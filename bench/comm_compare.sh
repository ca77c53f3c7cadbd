#!/usr/bin/env bash
# Run scaletrain's all-reduce and its peers (PyTorch Gloo, OpenMPI) back to back on the same sizes,
# and print one table of bus bandwidth (GB/s) with ratios. Results land in target/comm-bench/.
#   bench/comm_compare.sh [NPROC] [SIZES] [FACTOR]
# Needs: a release build, a Python with torch (PYTHON=…, default /work/venv-torch/bin/python),
# mpicc/mpirun (apt-get install -y libopenmpi-dev openmpi-bin).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${1:-2}
SIZES=${2:-1K..256M}
FACTOR=${3:-4}
PYTHON=${PYTHON:-/work/venv-torch/bin/python}
OUT=target/comm-bench
mkdir -p "$OUT"
cargo build --release -q -p scaletrain-cli
ST=target/release/scaletrain
for t in tcp shm; do
  "$ST" bench comm --nproc "$NPROC" --transport "$t" --algo auto --sizes "$SIZES" --factor "$FACTOR" --json > "$OUT/scaletrain-$t.json"
done
"$ST" bench comm --nproc "$NPROC" --transport threads --algo auto --sizes "$SIZES" --factor "$FACTOR" --json > "$OUT/scaletrain-threads.json"
if "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" bench/gloo_allreduce.py --nproc "$NPROC" --sizes "$SIZES" --factor "$FACTOR" --json > "$OUT/gloo.json"
fi
if command -v mpicc >/dev/null; then
  if cargo build --release -q -p scaletrain-cli --features mpi 2>/dev/null; then
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun --oversubscribe -n "$NPROC" \
      "$ST" bench comm --transport mpi --worker --algo auto --sizes "$SIZES" --factor "$FACTOR" \
      | python3 -c 'import json,sys; print(json.dumps({"results": json.loads(sys.stdin.read().strip().splitlines()[-1])}))' \
      > "$OUT/scaletrain-mpi.json"
  fi
  mpicc -O2 -o "$OUT/mpi_allreduce" bench/mpi_allreduce.c
  OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun --oversubscribe -n "$NPROC" "$OUT/mpi_allreduce" "$SIZES" "$FACTOR" > "$OUT/openmpi.json"
fi
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
cols = [("scaletrain-tcp", "tcp"), ("scaletrain-shm", "shm"), ("scaletrain-threads", "threads"), ("scaletrain-mpi", "st-over-mpi"), ("gloo", "Gloo"), ("openmpi", "OpenMPI")]
data = {}
for f, name in cols:
    p = os.path.join(out, f + ".json")
    if os.path.exists(p):
        data[name] = {r["bytes"]: r["busbw_gbps"] for r in json.load(open(p))["results"]}
names = [n for _, n in cols if n in data]
sizes = sorted(next(iter(data.values())).keys())
def h(b):
    for u, m in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if b >= m and b % m == 0:
            return f"{b // m}{u}"
    return str(b)
hdr = "| bytes | " + " | ".join(names) + " | tcp / Gloo | shm / max(Gloo, OpenMPI) |"
print(hdr)
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
