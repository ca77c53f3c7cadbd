#!/usr/bin/env bash
# The planner page in a real browser: install Debian's chromium and chromium-driver (when
# missing), then run crates/cli/tests/page.rs with SCALETRAIN_BROWSER_TESTS=1, which makes a
# missing browser a failure instead of a skip. It drives headless Chromium over WebDriver
# against `scaletrain serve`.
#
# Screenshots of the main views: SCALETRAIN_SCREENSHOTS=DIR bash .ci/browser-tests.sh
# (docs/img/planner-page.png in the README is one of them).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromedriver >/dev/null || ! command -v chromium >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium chromium-driver >/dev/null
fi
export SCALETRAIN_BROWSER_TESTS=1
if [ -n "${SCALETRAIN_SCREENSHOTS:-}" ]; then
  mkdir -p "$SCALETRAIN_SCREENSHOTS"
  SCALETRAIN_SCREENSHOTS=$(cd "$SCALETRAIN_SCREENSHOTS" && pwd)
  export SCALETRAIN_SCREENSHOTS
fi
cargo test --release -p scaletrain-cli --test page -- --nocapture
