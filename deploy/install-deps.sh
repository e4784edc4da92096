#!/usr/bin/env bash
# Install (idempotently) the host packages Ferrocloud's build and tests need,
# and unpack Debian's stock cloud kernel for the Linux early-boot check.
set -euo pipefail
pkgs=(iproute2 iputils-ping nftables openssh-client openssl protobuf-compiler lz4 zstd xz-utils)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Debian's stock kernel, unpacked (not installed) under target/guest-kernel.
root=$(cd "$(dirname "$0")/.." && pwd)
kdir="$root/target/guest-kernel"
if ! ls "$kdir"/boot/vmlinuz-* >/dev/null 2>&1; then
  mkdir -p "$kdir/deb"
  [ -n "$(apt-cache policy linux-image-cloud-amd64 2>/dev/null | grep Candidate)" ] || apt-get update -qq
  pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  (cd "$kdir/deb" && apt-get download -qq "$pkg")
  dpkg-deb -x "$kdir"/deb/*.deb "$kdir"
fi
ln -sf "$(ls "$kdir"/boot/vmlinuz-* | head -1)" "$kdir/vmlinuz"
# ELF vmlinux: the bzImage decompressor is too slow where guest kernel mode
# is emulated (nested KVM); on real hosts either form boots.
[ -s "$kdir/vmlinux" ] || python3 "$root/deploy/extract-vmlinux.py" "$kdir/vmlinuz" "$kdir/vmlinux"
echo "guest kernel: $(readlink "$kdir/vmlinuz") and $kdir/vmlinux"
