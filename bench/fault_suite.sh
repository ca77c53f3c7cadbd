#!/usr/bin/env bash
# The fault-injection suite (crates/cli/tests/fault_suite.rs): real training jobs with one fault
# each (kill -9 / SIGSTOP of a rank, kill during a checkpoint write, kill of the launcher, a
# restart, a corrupted checkpoint) over data-parallel layouts and pp/tp meshes, every check
# asserted, a tally printed at the end.
#
#   bench/fault_suite.sh                 30 cases (what CI runs)
#   bench/fault_suite.sh --long          300 cases
#   bench/fault_suite.sh --cases N       N cases
#   SCALETRAIN_FAULT_SEED=S bench/fault_suite.sh ...   replays a run (the seed is printed)
#   SCALETRAIN_FAULT_LAYOUTS=pp2,tp2 bench/fault_suite.sh ...   those layouts only
#
# The tally line is also written to $SCALETRAIN_FAULT_TALLY when set.
set -euo pipefail
cd "$(dirname "$0")/.."
cases=30
while [ $# -gt 0 ]; do
  case "$1" in
    --long) cases=300 ;;
    --cases) cases="$2"; shift ;;
    *) echo "usage: $0 [--long | --cases N]" >&2; exit 2 ;;
  esac
  shift
done
SCALETRAIN_FAULT_CASES=$cases cargo test --release -p scaletrain-cli --test fault_suite -- \
  --ignored --nocapture
