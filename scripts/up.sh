#!/usr/bin/env bash
# The README's first command: build Ferrocloud and run the all-in-one cloud
# on this machine with `ferro up --demo`: a single-node controller and an
# agent (state under a temporary data directory), the project's test guest
# registered as an image, one instance launched and shown running with its
# console, then the instance terminated and both daemons stopped.
# Extra arguments go to `ferro up` (e.g. drop --demo by running
# target/release/ferro up yourself to keep the cloud in the foreground).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
cargo build --release -p ferro-vmm -p ferro-agent -p ferro-controller -p ferro-cli
guest=$(bash tests/guest/build.sh)
# Short: the agent's state directory (<data>/agent) must fit 32 bytes.
data=$(mktemp -d /tmp/ferro-up.XXXXXX)
trap 'rm -rf "$data"' EXIT
target/release/ferro up --demo --data-dir "$data" --image-kernel "$guest" "$@"
