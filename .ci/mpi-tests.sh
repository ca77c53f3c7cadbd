#!/usr/bin/env bash
# The MPI transport's tests: install Open MPI and libclang (for the `mpi` crate's bindings), build
# scaletrain-comm with `--features mpi`, run its MPI test binary under mpirun with 1-4 ranks, then
# `scaletrain train --grad-sync mpi` under mpirun against the ring (below).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v mpicc >/dev/null || ! ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq libopenmpi-dev openmpi-bin libclang-dev >/dev/null
fi
# A separate target dir, so the default build's artifacts are not rebuilt with the feature flipped.
export CARGO_TARGET_DIR=target/mpi
cargo clippy -p scaletrain-comm -p scaletrain-cli --features scaletrain-cli/mpi --all-targets --release -- -D warnings
BIN=$(cargo test -p scaletrain-comm --features mpi --release --test mpi --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "mpi" and m.get("executable"):
        print(m["executable"])')
test -x "$BIN"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
for n in 1 2 3 4; do
  echo "== mpirun -n $n"
  timeout 300 mpirun -n "$n" "$BIN" --test-threads=1 --nocapture
done
echo "== scaletrain bench comm --transport mpi"
cargo build -q --release -p scaletrain-cli --features mpi
target/mpi/release/scaletrain bench comm --transport mpi --nproc 2 --sizes 4K,1M --iters 3 --json \
  | python3 -c 'import json,sys; r=json.load(sys.stdin)["results"]; assert [x["bytes"] for x in r]==[4096,1<<20] and all(x["busbw_gbps"]>0 for x in r), r; print("bench comm over MPI:", len(r), "rows")'

# `scaletrain train --grad-sync mpi` end to end: the same tiny run under mpirun (MPI's all-reduce)
# and self-launched over TCP (our ring/tree), compared step by step from metrics.jsonl.
# How close they must be: with 2 ranks every reduced element is one addition, g0 + g1, and IEEE
# addition is commutative, so whatever order MPI_Allreduce uses the sums are the same bits as
# ours; loss all-gather and broadcast move bits unchanged. So 2 ranks must agree bitwise (loss,
# grad_norm, val_loss), with ZeRO-1 too. With 3 ranks the order matters: our ring folds shard c
# over ranks c+1, c+2, … (mod n) and our tree (messages up to 64 KiB, as here) adds
# (g0 + g2) + g1, while Open MPI picks its own algorithm by size, so the sums may differ in the
# last bit and the runs only agree to a tolerance (relative 1e-5; measured: at most ~1e-7 over 20 steps).
echo "== scaletrain train --grad-sync mpi under mpirun vs --grad-sync ring"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
ST=target/mpi/release/scaletrain
TINY=(--steps 20 --set model.n_layer=1 --set model.channels=32 --set model.n_head=2
  --set model.seq_len=16 --set train.batch_size=4 --set train.eval_every=10 --set train.eval_batches=2
  --set optim.warmup_steps=1 --set optim.lr=1e-2
  --set data.synthetic.train_tokens=20000 --set data.synthetic.val_tokens=1000 --threads 1 --no-progress
  --bucket-mb 0.01) # several gradient buckets, reduced on the communication thread during backward
compare() { # compare RUN_A RUN_B TOLERANCE (0 = bitwise)
  python3 - "$@" <<'PY'
import json, sys
a, b, tol = sys.argv[1], sys.argv[2], float(sys.argv[3])
def rows(d):
    return [json.loads(l) for l in open(d + "/metrics.jsonl")]
ra, rb = rows(a), rows(b)
def pick(rs):
    steps = [(r["step"], r["loss"], r["grad_norm"]) for r in rs if "loss" in r]
    vals = [(r["step"], r["val_loss"]) for r in rs if "val_loss" in r]
    return steps, vals
(sa, va), (sb, vb) = pick(ra), pick(rb)
assert len(sa) == 20 and len(va) == 2, (a, sa, va)
assert [s[0] for s in sa] == [s[0] for s in sb] and [v[0] for v in va] == [v[0] for v in vb], (sa, sb, va, vb)
worst = 0.0
for x, y in [(p, q) for s, t in zip(sa, sb) for p, q in zip(s[1:], t[1:])] + [(v[1], w[1]) for v, w in zip(va, vb)]:
    worst = max(worst, abs(x - y) / max(abs(x), abs(y)))
    if tol == 0:
        assert x == y, f"{a} vs {b}: {x!r} != {y!r} (must be bitwise equal)"
    else:
        assert abs(x - y) <= tol * max(abs(x), abs(y)), f"{a} vs {b}: {x!r} vs {y!r} beyond relative {tol}"
# grad_norm is the norm of the all-reduced gradient: a reduction that dropped, doubled or averaged
# a rank's share would differ from step 1 on, far beyond the tolerance.
print(f"{a} vs {b}: {len(sa)} steps + {len(va)} validations agree (worst relative difference {worst:.2e}, tolerance {tol})")
PY
}
for n in 2 3; do
  timeout 300 mpirun -n "$n" "$ST" train --dp "$n" --grad-sync mpi --out "$TMP/mpi$n" "${TINY[@]}" | tee "$TMP/mpi$n.log"
  grep -q "data parallel: $n ranks" "$TMP/mpi$n.log"
  test "$(grep -c "^done: 20 steps, final train loss" "$TMP/mpi$n.log")" = $((n - 1)) # ranks 1.. report one line
  test -f "$TMP/mpi$n/step-00000020.json"
  timeout 300 "$ST" train --dp "$n" --grad-sync ring --out "$TMP/ring$n" "${TINY[@]}" >"$TMP/ring$n.log"
done
compare "$TMP/mpi2" "$TMP/ring2" 0
compare "$TMP/mpi3" "$TMP/ring3" 1e-5
timeout 300 mpirun -n 2 "$ST" train --dp 2 --grad-sync mpi --zero 1 --out "$TMP/mpi2z1" "${TINY[@]}" >"$TMP/mpi2z1.log"
timeout 300 "$ST" train --dp 2 --zero 1 --out "$TMP/ring2z1" "${TINY[@]}" >"$TMP/ring2z1.log"
compare "$TMP/mpi2z1" "$TMP/ring2z1" 0
# The same buckets reduced after backward on the training thread: the same bits.
timeout 300 mpirun -n 2 "$ST" train --dp 2 --grad-sync mpi --no-overlap --out "$TMP/mpi2seq" "${TINY[@]}" >"$TMP/mpi2seq.log"
compare "$TMP/mpi2seq" "$TMP/ring2" 0
# Bad input is an error, not a hang: a rank count that is not --dp.
if timeout 120 mpirun -n 2 "$ST" train --dp 3 --grad-sync mpi --out "$TMP/bad" "${TINY[@]}" 2>"$TMP/bad.err"; then
  echo "mpirun -n 2 with --dp 3 succeeded"; exit 1
fi
grep -qF "dp(3) * tp(1) * pp(1) = 3, but the job has 2 ranks (mpirun -n)" "$TMP/bad.err" || { cat "$TMP/bad.err"; exit 1; }
# The mesh under mpirun: pipeline stages exchange over MPI point-to-point (sendrecv) and tensor-
# parallel ranks meet in MPI collectives on split communicators. With 2 ranks every sum is one
# commutative addition and point-to-point moves bits unchanged, so each must equal the same
# layout self-launched over TCP bitwise.
TINY2=("${TINY[@]}" --set model.n_layer=2)
timeout 300 mpirun -n 2 "$ST" train --pp 2 --microbatches 2 --grad-sync mpi --out "$TMP/mpipp2" "${TINY2[@]}" >"$TMP/mpipp2.log"
timeout 300 "$ST" train --pp 2 --microbatches 2 --out "$TMP/ringpp2" "${TINY2[@]}" >"$TMP/ringpp2.log"
compare "$TMP/mpipp2" "$TMP/ringpp2" 0
timeout 300 mpirun -n 2 "$ST" train --tp 2 --grad-sync mpi --out "$TMP/mpitp2" "${TINY2[@]}" >"$TMP/mpitp2.log"
timeout 300 "$ST" train --tp 2 --out "$TMP/ringtp2" "${TINY2[@]}" >"$TMP/ringtp2.log"
compare "$TMP/mpitp2" "$TMP/ringtp2" 0
# An error on one rank only (here rank 1's --out already holds checkpoints, rank 0's is fresh)
# stops the job through MPI_Abort; without it rank 0 waited in its first collective forever and
# rank 1 in MPI_Finalize (seen: killed by this timeout).
if timeout 60 mpirun -n 2 sh -c "if [ \"\$OMPI_COMM_WORLD_RANK\" = 1 ]; then o=\"$TMP/mpi2\"; else o=\"$TMP/fresh\"; fi
    exec \"$ST\" train --dp 2 --grad-sync mpi --out \"\$o\" ${TINY[*]}" >/dev/null 2>"$TMP/inuse.err"; then
  echo "a rank whose run folder holds checkpoints did not stop the job"; exit 1
else
  rc=$?
  test "$rc" != 124 || { echo "mpirun hung after one rank failed"; exit 1; }
fi
grep -q "mpi2 already holds checkpoints" "$TMP/inuse.err" || { cat "$TMP/inuse.err"; exit 1; }
echo "train --grad-sync mpi: OK"
