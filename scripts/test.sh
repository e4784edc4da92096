#!/usr/bin/env bash
# The README's test command: builds the project's test guest and runs every
# test of the workspace. Tests that need KVM, root or network namespaces run
# here too and fail with a message naming what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
bash deploy/fetch-guest-kernel.sh
bash scripts/check-deps.sh
bash tests/guest/build.sh
# `cargo test --workspace` builds every binary the integration tests run
# before the first test starts; tests use those instead of building their own
# (see ferro_testkit::workspace_bin).
export FERRO_TEST_PREBUILT=1
cargo test --workspace --all-targets --no-fail-fast
