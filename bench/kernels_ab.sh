#!/usr/bin/env bash
# Our AVX-512 matmul kernels against the previous ones, on a quiet machine.
#  1. `examples/gemm_bench` (one thread, per linear-layer product: our AVX-512F f32 kernel vs the
#     gemm crate, our AVX512_BF16 kernel vs bf16 converted to f32 panels), ROUNDS rounds.
#  2. The whole `bench train` step, fp32 and bf16-mixed, ROUNDS alternating runs of
#     "old" (SCALETRAIN_NO_AVX512=1 and --no-amx: the gemm crate, bf16 on f32 panels) and
#     "new" (defaults); with TORCH_PYTHON set, "new" also times the PyTorch peer each round.
# Prints every run and the medians with ratios new/old. Refuses to run while the 1-minute load
# average is 1.5 or more (FORCE=1 overrides; then say so next to the figures).
# Usage: bench/kernels_ab.sh [rounds] [threads] [steps]
set -euo pipefail
rounds=${1:-5} threads=${2:-2} steps=${3:-10}
cd "$(dirname "$0")/.."
load=$(cut -d' ' -f1 /proc/loadavg)
if [[ "${FORCE:-0}" != 1 ]] && python3 -c "import sys; sys.exit(float('$load') < 1.5)"; then
  echo "load average $load >= 1.5: not measuring (FORCE=1 to override)" >&2
  exit 2
fi
echo "load average at start: $load"
cargo build --release -q -p scaletrain-cli -p scaletrain-kernels --example gemm_bench
bin=target/release/scaletrain
target/release/examples/gemm_bench "$rounds"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
torch=()
[[ -n "${TORCH_PYTHON:-}" ]] && torch=(--torch "$TORCH_PYTHON")
for i in $(seq "$rounds"); do
  SCALETRAIN_NO_AVX512=1 "$bin" bench train --json --no-amx --threads "$threads" --steps "$steps" \
    --precision fp32,bf16-mixed > "$tmp/old$i.json"
  "$bin" bench train --json --threads "$threads" --steps "$steps" --precision fp32,bf16-mixed \
    "${torch[@]}" > "$tmp/new$i.json"
done
echo "load average at end: $(cut -d' ' -f1 /proc/loadavg)"
python3 - "$tmp" "$rounds" <<'PY'
import json, statistics, sys
tmp, rounds = sys.argv[1], int(sys.argv[2])
tps = {}
for side in ("old", "new"):
    for i in range(1, rounds + 1):
        r = json.load(open(f"{tmp}/{side}{i}.json"))
        for v in r["variants"]:
            tps.setdefault((side, v["precision"]), []).append(v["tokens_per_sec"])
        if side == "new" and r.get("torch"):
            tps.setdefault(("torch", "peer"), []).append(r["torch"]["tokens_per_sec"])
        print(f"round {i} {side}: " + ", ".join(f'{v["precision"]} {v["tokens_per_sec"]:.0f}' for v in r["variants"])
              + (f', bf16_matmul {r.get("bf16_matmul")}' if "bf16_matmul" in r else ""))
med = {k: statistics.median(v) for k, v in tps.items()}
for p in ("fp32", "bf16-mixed"):
    o, n = med[("old", p)], med[("new", p)]
    print(f"{p}: old {o:.0f}, new {n:.0f} tokens/s (median of {rounds}), new/old {n / o:.2f}")
if ("torch", "peer") in med:
    t = med[("torch", "peer")]
    print(f"PyTorch peer {t:.0f} tokens/s; new fp32 / torch {med[('new', 'fp32')] / t:.2f}")
PY
