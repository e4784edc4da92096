#!/usr/bin/env bash
# Check that every command and library the build, the README's two commands,
# the tests, the benchmarks and the fuzz runs use is present, naming the
# Debian package (or toolchain) that brings each missing one. Run by .ci/run
# right after deploy/install-deps.sh; exits 1 if anything is missing.
set -uo pipefail

missing=0
need() { # need COMMAND PROVIDER WHY
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "check-deps: missing command '$1' ($3): install $2" >&2
    missing=1
  fi
}

# The build.
need cargo   "the Rust toolchain (rustup)"        "builds everything"
need rustc   "the Rust toolchain (rustup)"        "builds everything"
need cc      "apt package gcc"                    "RocksDB's and ring's C code"
need c++     "apt package g++"                    "RocksDB's C++ code"
need make    "apt package make"                   "C build scripts"
need clang   "apt package clang"                  "bindgen for librocksdb-sys"
need protoc  "apt package protobuf-compiler"      "proto/build.rs"
# The scripts, tests and benchmarks.
need python3 "apt package python3"                "deploy/extract-vmlinux.py"
need ip      "apt package iproute2"               "TAPs, bridges, network namespaces"
need ping    "apt package iputils-ping"           "tests ping guests"
need nft     "apt package nftables"               "the controller partition test"
need curl    "apt package curl"                   "netd's metadata test (IMDSv2 requests)"
need iperf3  "apt package iperf3"                 "cargo xtask bench netd"
need bridge  "apt package iproute2"               "netd tests (FDB entries)"
need ssh-keygen "apt package openssh-client"      "the key-pair unit test"
need openssl "apt package openssl"                "the TLS test's certificates"
need pgrep   "apt package procps"                 "leak checks in tests"
need lz4     "apt package lz4"                    "unpacking the guest kernel"
need zstd    "apt package zstd"                   "unpacking the guest kernel"
need xz      "apt package xz-utils"               "unpacking the guest kernel"
need gzip    "apt package gzip"                   "initramfs images of the Linux-guest harness"
need dpkg-deb "apt package dpkg"                  "unpacking the guest kernel package"
need apt-get "apt package apt"                    "fetching the guest kernel package"
need depmod  "apt package kmod"                   "modules.dep of the guest kernel"
need ldd     "apt package libc-bin"               "the Linux-guest harness copies binaries' libraries"
need qemu-system-x86_64 "apt package qemu-system-x86" "the Linux-guest harness (TCG with nested SVM)"
need debootstrap "apt package debootstrap"        "the Debian cloud-init guest image (tests/linux-guest/debian)"
need mkfs.ext4 "apt package e2fsprogs"            "the Debian guest's root disk and the cloud host's disks"
need kmod    "apt package kmod"                   "modprobe inside the Linux-guest cloud host"
need ssh     "apt package openssh-client"         "the Debian guest test logs in with the key pair"

# python3's venv module: the EC2 endpoint's test installs boto3 and the aws
# CLI from PyPI into a virtual environment (tests/ec2/venv.sh).
if ! python3 -c "import venv, ensurepip" 2>/dev/null; then
  echo "check-deps: python3 cannot make virtual environments: install apt package python3-venv" >&2
  missing=1
fi

# busybox must be the static one: it is copied into the guests' initramfs.
if [ -x /bin/busybox ]; then
  if file_out=$(LC_ALL=C ldd /bin/busybox 2>&1) && ! grep -q "not a dynamic executable" <<<"$file_out"; then
    echo "check-deps: /bin/busybox is dynamically linked: install apt package busybox-static" >&2
    missing=1
  fi
else
  echo "check-deps: missing /bin/busybox (the Linux-guest harness's userland): install apt package busybox-static" >&2
  missing=1
fi

# Libraries.
if ! compgen -G '/usr/lib/llvm-*/lib/libclang.so*' >/dev/null && ! compgen -G '/usr/lib/x86_64-linux-gnu/libclang*.so*' >/dev/null; then
  echo "check-deps: missing libclang.so (bindgen for librocksdb-sys): install apt package libclang-dev" >&2
  missing=1
fi
# QEMU's firmware for -kernel boots.
for f in bios-256k.bin linuxboot_dma.bin kvmvapic.bin; do
  if [ ! -e /usr/share/qemu/$f ] && [ ! -e /usr/share/seabios/$f ]; then
    echo "check-deps: missing QEMU firmware $f: install apt packages qemu-system-x86 (with seabios, qemu-system-data)" >&2
    missing=1
  fi
done

# Toolchains.
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "check-deps: missing the nightly Rust toolchain (cargo-fuzz needs it): rustup toolchain install nightly" >&2
  missing=1
fi

if [ "$missing" -ne 0 ]; then
  echo "check-deps: some dependencies are missing (see above); deploy/install-deps.sh installs the apt ones" >&2
  exit 1
fi
echo "check-deps: every command, library and toolchain the project uses is present" >&2
