#!/usr/bin/env python3
"""Shrink the bitsandbytes wheel in `.whl/` to the native libraries the GPU machine uses, so that Prefect and its
dependencies fit next to it in the device tool's 64 MiB carry (a `python -m flows.finetune` run there).

The manylinux wheel holds one ~21-26 MB library per CUDA version (118 ... 132); the GPU machine's torch is built
for CUDA 13.0, so only `libbitsandbytes_cuda130.so` (and the CPU library) are kept. The wheel keeps its name and
version; RECORD lists only the files kept. Usage (after ../shared/tools/device-wheels.sh):

    python3 bench/slim_wheels.py .whl --cuda 130
"""
from __future__ import annotations

import argparse
import re
import zipfile
from pathlib import Path


def slim(wheel: Path, cuda: str) -> tuple[int, int]:
    keep = re.compile(rf"libbitsandbytes_(cpu|cuda{cuda})\.(so|dylib|dll)$")
    drop = re.compile(r"libbitsandbytes_\w+\.(so|dylib|dll)$")
    tmp = wheel.with_suffix(".slim")
    before = wheel.stat().st_size
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        dropped = {i.filename for i in src.infolist() if drop.search(i.filename) and not keep.search(i.filename)}
        if not any(keep.search(i.filename) and "cuda" in i.filename for i in src.infolist()):
            raise SystemExit(f"{wheel.name} has no libbitsandbytes_cuda{cuda}: keep which CUDA version?")
        for info in src.infolist():
            if info.filename in dropped:
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = [l for l in data.decode().splitlines() if l.split(",", 1)[0] not in dropped]
                data = ("\n".join(lines) + "\n").encode()
            dst.writestr(info, data)
    tmp.replace(wheel)
    return before, wheel.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--cuda", default="130", help="CUDA version of the GPU machine's torch, as in the library name")
    args = ap.parse_args()
    wheels = sorted(args.folder.glob("bitsandbytes-*.whl"))
    if not wheels:
        raise SystemExit(f"no bitsandbytes wheel in {args.folder}")
    for wheel in wheels:
        before, after = slim(wheel, args.cuda)
        print(f"{wheel.name}: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
