#!/usr/bin/env python3
"""Extract the uncompressed ELF vmlinux from a bzImage, using the payload
offset and length from its setup header (Linux boot protocol >= 2.08)."""
import struct
import subprocess
import sys

src, dst = sys.argv[1], sys.argv[2]
data = open(src, "rb").read()
setup_sects = data[0x1F1] or 4
pm_start = (setup_sects + 1) * 512
off, length = struct.unpack_from("<II", data, 0x248)
payload = data[pm_start + off : pm_start + off + length]
tools = {b"\x02\x21\x4c\x18": ["lz4", "-dc"], b"\x28\xb5\x2f\xfd": ["zstd", "-dc"], b"\xfd7zXZ": ["xz", "-dc"], b"\x1f\x8b": ["gzip", "-dc"]}
for magic, cmd in tools.items():
    if payload.startswith(magic):
        # Trailing bytes (the appended size) make the tools complain; ignore
        # their exit status and check the result instead.
        out = subprocess.run(cmd, input=payload, capture_output=True).stdout
        break
else:
    sys.exit(f"{src}: unknown payload compression {payload[:4].hex()}")
if not out.startswith(b"\x7fELF"):
    sys.exit(f"{src}: payload did not decompress to an ELF")
open(dst, "wb").write(out)
print(f"{dst}: {len(out)} bytes")
