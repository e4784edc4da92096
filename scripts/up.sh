#!/usr/bin/env bash
# The README's first command: build Ferrocloud and run the all-in-one cloud
# on this machine with `ferro up --demo`: a single-node controller and an
# agent (state under a temporary data directory), the project's test guest
# registered as an image, one instance launched and shown running with its
# console, then the instance terminated and both daemons stopped.
# Extra arguments go to `ferro up` (e.g. drop --demo by running
# target/debug/ferro up yourself to keep the cloud in the foreground).
#
# It builds the dev profile, the one the test command (scripts/test.sh)
# uses, so running the tests afterwards reuses this build (RocksDB's C++
# included) instead of compiling everything again; the VMM's hot crates
# are optimised in that profile too (Cargo.toml). Release binaries for an
# install: see docs/operations.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
cargo build --workspace --bins
guest=$(bash tests/guest/build.sh)
# Short: the agent's state directory (<data>/agent) must fit 32 bytes.
data=$(mktemp -d /tmp/ferro-up.XXXXXX)
trap 'rm -rf "$data"' EXIT
target/debug/ferro up --demo --listen 127.0.0.1:0 --data-dir "$data" --image-kernel "$guest" "$@"
