#!/usr/bin/env bash
# Run each cargo-fuzz target for a bounded time (seconds, default 60).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
for t in $(cargo +nightly fuzz list); do
  echo "-- fuzz $t for ${secs}s"
  cargo +nightly fuzz run "$t" -- -max_total_time="$secs" -rss_limit_mb=2048
done
