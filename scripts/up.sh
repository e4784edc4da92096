#!/usr/bin/env bash
# The README's first command. Today: build ferro-vmm and the project's test
# guest and boot it with 2 vCPUs, a disk and a NIC on this machine, showing
# its console. (Later issues turn this into the all-in-one cloud.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
cargo build --release -p ferro-vmm
guest=$(bash tests/guest/build.sh)
work=$(mktemp -d /tmp/ferro-up.XXXXXX)
head -c $((16 << 20)) /dev/urandom > "$work/data.img"
ip tuntap add dev ferro-up0 mode tap vnet_hdr 2>/dev/null || true
ip addr replace 169.254.77.1/30 dev ferro-up0
ip link set ferro-up0 up
trap 'ip link del ferro-up0 2>/dev/null || true; rm -rf "$work"' EXIT
echo "== booting $guest under ferro-vmm (console follows)"
status=0
target/release/ferro-vmm --vcpus 2 --memory 128 --kernel "$guest" \
  --cmdline "console=ttyS0 ferro.ip=169.254.77.2/30 ferro.write=data ferro.exit=reboot" \
  --disk "path=$work/data.img,id=data" --net tap=ferro-up0 --serial stdout || status=$?
echo "== ferro-vmm exited with status $status (0: the guest rebooted)"
exit "$status"
