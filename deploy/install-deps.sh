#!/usr/bin/env bash
# Install (idempotently) every Debian package that Ferrocloud's build, the
# README's two commands, the tests, the benchmarks and the fuzz runs need on
# a fresh machine. What a fresh machine of the supported image already has
# (gcc/g++, make, python3, iproute2, openssh-client, openssl, procps, lz4,
# zstd, xz-utils, the stable and nightly Rust toolchains) is not repeated
# here; scripts/check-deps.sh verifies the whole list afterwards.
set -euo pipefail

# package          why
pkgs=(
  clang            # bindgen (librocksdb-sys) needs libclang and clang's own headers
  libclang-dev     # libclang.so for bindgen
  protobuf-compiler # protoc for tonic/prost code generation (proto/build.rs)
  iproute2         # ip: TAPs, bridges, network namespaces (agent, tests)
  iputils-ping     # ping: tests reach guests over TAPs
  nftables         # nft: netd's security groups and anti-spoofing; the controller partition test
  openssh-client   # ssh-keygen: the key-pair unit test checks our OpenSSH keys
  openssl          # openssl: the TLS test makes its CA and certificates
  procps           # pgrep: tests check no ferro-vmm is left behind
  lz4 zstd xz-utils # unpacking the stock guest kernel's payload
  qemu-system-x86  # the Linux-guest harness: TCG with nested SVM (L1 host)
  busybox-static   # the Linux-guest harness: L1 and L2 userland
  kmod             # depmod: modules.dep of the unpacked guest kernel
  curl             # netd's metadata test: IMDSv2 requests (PUT with headers) from instance namespaces
  iperf3           # cargo xtask bench netd: TCP throughput over the overlay and the raw underlay
  debootstrap      # the Debian cloud-init guest image of the Linux-guest cloud-host test
  e2fsprogs        # mkfs.ext4: that image's root disk and the cloud host's disks
  python3-venv     # tests/ec2/venv.sh: the AWS clients (boto3, awscli from PyPI) for the EC2 endpoint's test
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
