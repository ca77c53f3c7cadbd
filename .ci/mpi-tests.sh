#!/usr/bin/env bash
# The MPI transport's tests: install Open MPI and libclang (for the `mpi` crate's bindings), build
# scaletrain-comm with `--features mpi`, and run its MPI test binary under mpirun with 1-4 ranks.
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
