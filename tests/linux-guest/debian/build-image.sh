#!/usr/bin/env bash
# Build a stock Debian 12 cloud guest image from apt packages: debootstrap
# with systemd, cloud-init (EC2 datasource, IMDSv2) and openssh-server,
# the modules of the project's guest kernel, as a raw ext4 disk image.
# Nothing Ferrocloud-specific runs inside: the guest's own DHCP client,
# cloud-init and sshd are Debian's.
#
#   build-image.sh OUT_DIR
#
# Writes OUT_DIR/rootfs.ext4 (the guest's root disk) and OUT_DIR/images.ext4
# (a filesystem holding rootfs.ext4, which a Linux-guest cloud host mounts
# read-only as its image store), and OUT_DIR/stamp; does nothing when the
# stamp matches this script and the kernel. Needs debootstrap and
# e2fsprogs (deploy/install-deps.sh) and deploy/fetch-guest-kernel.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
out=${1:?usage: build-image.sh OUT_DIR}
kdir="$root/target/guest-kernel"
kver=$(ls "$kdir/lib/modules" 2>/dev/null | head -1)
[ -n "$kver" ] || { echo "build-image: no guest kernel; run deploy/fetch-guest-kernel.sh" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "build-image: debootstrap missing (Debian package debootstrap)" >&2; exit 1; }
command -v mkfs.ext4 >/dev/null || { echo "build-image: mkfs.ext4 missing (Debian package e2fsprogs)" >&2; exit 1; }
stamp="$(sha256sum "$0" | cut -d' ' -f1) $kver"
if [ -s "$out/images.ext4" ] && [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ]; then
  echo "$out/rootfs.ext4"; exit 0
fi
mkdir -p "$out"
rm -rf "$out/rootfs" "$out/rootfs.ext4" "$out/images.ext4" "$out/images" "$out/stamp"
mirror=$(awk '/^URIs:/{print $2; exit} /^deb /{print $2; exit}' \
  /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -1)
mirror=${mirror:-http://deb.debian.org/debian}
echo "build-image: debootstrap bookworm from $mirror (a few minutes)" >&2
debootstrap --variant=minbase \
  --include=systemd,systemd-sysv,udev,dbus,cloud-init,openssh-server,iproute2,netbase,ifupdown,isc-dhcp-client,procps,sudo,kmod,python3-cffi-backend \
  bookworm "$out/rootfs" "$mirror" >"$out/debootstrap.log" 2>&1 \
  || { tail -20 "$out/debootstrap.log" >&2; exit 1; }
r="$out/rootfs"
# The guest kernel's modules (udev loads virtio_net, the rng… from here).
mkdir -p "$r/lib/modules"
cp -a "$kdir/lib/modules/$kver" "$r/lib/modules/"
# cloud-init: only the EC2 datasource, whatever the DMI says; the network
# comes from the image's own ifupdown + dhclient on eth0.
cat >"$r/etc/cloud/cloud.cfg.d/90-ferrocloud.cfg" <<'CFG'
datasource_list: [ Ec2, None ]
datasource:
  Ec2:
    strict_id: false
    timeout: 10
    max_wait: 120
    metadata_urls: [ "http://169.254.169.254" ]
network:
  config: disabled
CFG
printf 'policy: enabled\n' >"$r/etc/cloud/ds-identify.cfg"
mkdir -p "$r/etc/network/interfaces.d"
cat >"$r/etc/network/interfaces" <<'NET'
auto lo
iface lo inet loopback
auto eth0
iface eth0 inet dhcp
NET
# Predictable names off: the NIC is eth0 as in the interfaces file.
ln -sf /dev/null "$r/etc/systemd/network/99-default.link"
echo ferro-debian >"$r/etc/hostname"
# A serial console; no password for root anywhere: only the key works.
mkdir -p "$r/etc/systemd/system/serial-getty@ttyS0.service.d"
# Nothing waits for hardware this VM has not.
for u in systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer; do
  ln -sf /dev/null "$r/etc/systemd/system/$u"
done
printf '/dev/vda / ext4 rw,noatime 0 1\n' >"$r/etc/fstab"
# Smaller: no package lists or docs in the image.
rm -rf "$r/var/lib/apt/lists/"* "$r/usr/share/doc" "$r/usr/share/man" "$r/var/cache/apt/"*.bin
size=$(( $(du -sm "$r" | cut -f1) + 300 ))
mkfs.ext4 -q -F -L rootfs -d "$r" "$out/rootfs.ext4" "${size}M"
rm -rf "$r"
mkdir -p "$out/images"
ln "$out/rootfs.ext4" "$out/images/rootfs.ext4"
mkfs.ext4 -q -F -L images -d "$out/images" "$out/images.ext4" "$(( $(du -m --apparent-size "$out/rootfs.ext4" | cut -f1) + 200 ))M"
rm -rf "$out/images"
echo "$stamp" >"$out/stamp"
echo "$out/rootfs.ext4"
