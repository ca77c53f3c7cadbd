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
cargo clippy -p scaletrain-comm --features mpi --all-targets --release -- -D warnings
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
