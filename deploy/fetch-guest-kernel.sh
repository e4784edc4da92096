#!/usr/bin/env bash
# Download Debian's stock cloud kernel package and unpack it (not install it)
# under target/guest-kernel: vmlinuz (bzImage), an extracted ELF vmlinux and
# lib/modules/<version> (the virtio and kvm modules the Linux-guest harness
# loads). Only the tests and benchmarks that boot Linux need it; the
# all-in-one cloud does not.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
kdir="$root/target/guest-kernel"
if ! ls "$kdir"/boot/vmlinuz-* >/dev/null 2>&1; then
  mkdir -p "$kdir/deb"
  [ -n "$(apt-cache policy linux-image-cloud-amd64 2>/dev/null | grep Candidate)" ] || apt-get update -qq
  pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  [ -n "$pkg" ] || { echo "fetch-guest-kernel: apt knows no linux-image-cloud-amd64 package" >&2; exit 1; }
  (cd "$kdir/deb" && apt-get download -qq "$pkg")
  dpkg-deb -x "$kdir"/deb/*.deb "$kdir"
fi
ln -sf "$(ls "$kdir"/boot/vmlinuz-* | head -1)" "$kdir/vmlinuz"
# modules.dep, which the package leaves to depmod at install time: the
# Linux-guest harness resolves module dependencies from it.
ver=$(ls "$kdir/lib/modules" | head -1)
[ -s "$kdir/lib/modules/$ver/modules.dep" ] || depmod -b "$kdir" "$ver"
# ELF vmlinux: the bzImage decompressor is too slow where guest kernel mode
# is emulated (nested KVM); on real hosts either form boots.
[ -s "$kdir/vmlinux" ] || python3 "$root/deploy/extract-vmlinux.py" "$kdir/vmlinuz" "$kdir/vmlinux"
echo "guest kernel: $(readlink "$kdir/vmlinuz") and $kdir/vmlinux" >&2
