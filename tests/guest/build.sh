#!/usr/bin/env bash
# Build the project's test guest (a no_std kernel for the host target) and
# print the path of its ELF.
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release --quiet
echo "${CARGO_TARGET_DIR:-$(pwd)/target}/x86_64-unknown-linux-gnu/release/ferro-test-guest"
