# Shared by bench/{pp,tp,fsdp,precision}_bench.sh (sourced, not run). Runs scaletrain and its
# PyTorch peers round by round into $OUT and summarises with bench/bench_summary.py.
#
# Environment:
#   TORCH_PYTHON   a Python with torch and safetensors (a venv outside the repository, e.g.
#                  `python3 -m venv ~/venv-torch && ~/venv-torch/bin/pip install torch safetensors`);
#                  default python3. Without PyTorch only our side runs.
#   SCALETRAIN_BIN our binary (default target/release/scaletrain; build it first)
#   OUT            where logs and results.tsv go (default bench/<name>-results)
#   WARMUP         untimed steps at the start of every run (default 2)

BIN=${SCALETRAIN_BIN:-target/release/scaletrain}
PY=${TORCH_PYTHON:-python3}
WARMUP=${WARMUP:-2}
SUMMARY="python3 bench/bench_summary.py"
RUNS_TMP=$(mktemp -d "${TMPDIR:-/tmp}/scaletrain-bench.XXXXXX")
trap 'rm -rf "$RUNS_TMP"' EXIT
trap 'exit 130' INT TERM HUP PIPE   # a signal ends the script through the EXIT trap

if [ ! -f Cargo.toml ] || [ ! -d bench ]; then
  echo "run this from the repository root (bench/$(basename "$0"))" >&2
  exit 2
fi
mkdir -p "$OUT"
RESULTS=$OUT/results.tsv
: > "$RESULTS"

OURS_OK=1
if [ ! -x "$BIN" ]; then
  echo "!! no $BIN: build it with 'cargo build --release -p scaletrain-cli' (or set SCALETRAIN_BIN); skipping our runs"
  OURS_OK=0
fi
TORCH_OK=1
if ! "$PY" -c 'import torch, safetensors' >/dev/null 2>&1; then
  echo "!! '$PY' cannot import torch and safetensors: set TORCH_PYTHON to a Python that can (pip install torch safetensors); skipping the PyTorch runs"
  TORCH_OK=0
else
  echo "PyTorch: $("$PY" -c 'import torch; print(torch.__version__)') ($PY)"
fi

# has_flag SUBCOMMAND FLAG: whether `scaletrain SUBCOMMAND --help` lists FLAG.
has_flag() {
  [ "$OURS_OK" = 1 ] && $BIN $1 --help 2>/dev/null | grep -q -- "$2"
}

# ours NAME TOKENS_PER_STEP ARGS...: `scaletrain ARGS` (a train command) for WARMUP + STEPS steps;
# records the median step time of the steps after WARMUP.
ours() {
  name=$1; tokens=$2; shift 2
  [ "$OURS_OK" = 1 ] || return 0
  log=$OUT/$name-r$ROUND.txt
  run_dir=$RUNS_TMP/$name
  echo "  \$ scaletrain $* --steps $((WARMUP + STEPS)) ..." > "$log"
  if $BIN "$@" --steps $((WARMUP + STEPS)) --threads 1 --no-progress --overwrite \
      --set train.eval_every=0 --set train.checkpoint_every=0 --set train.eval_batches=1 \
      --out "$run_dir" >> "$log" 2>&1; then
    $SUMMARY ours "$RESULTS" "$ROUND" "$name" "$run_dir" "$log" "$tokens" "$WARMUP" \
      || echo "  $name: could not read its step times (log: $log)"
  else
    echo "  $name: FAILED (log: $log):"
    tail -n 3 "$log" | sed 's/^/      /'
  fi
}

# torch_peer NAME SCRIPT ARGS...: one PyTorch peer run with WARMUP + STEPS steps.
torch_peer() {
  name=$1; script=$2; shift 2
  [ "$TORCH_OK" = 1 ] || return 0
  log=$OUT/$name-r$ROUND.txt
  if "$PY" "bench/$script" "$@" --steps "$STEPS" --warmup "$WARMUP" > "$log" 2>&1; then
    $SUMMARY torch "$RESULTS" "$ROUND" "$name" "$log"
  else
    rc=$?
    # A peer that printed its whole result line (every timed step) and then crashed while
    # shutting down (seen: Gloo's teardown aborting FSDP2's processes) still measured the run:
    # count it, and say so.
    if head -n 1 "$log" | grep -q "\"steps_timed\": $STEPS,"; then
      echo "  $name: exited with status $rc after printing its complete result (a crash in its shutdown); counted (log: $log)"
      $SUMMARY torch "$RESULTS" "$ROUND" "$name" "$log"
    else
      echo "  $name: FAILED (log: $log):"
      tail -n 3 "$log" | sed 's/^/      /'
    fi
  fi
}

load_note() {
  echo "load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || uptime)"
}
