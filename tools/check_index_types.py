#!/usr/bin/env python3
"""Fail on 32-bit index variables in kernel code: every index is int64 in cnnext.

Flags, in csrc/ (the emulator itself excepted):
  - loop counters declared `int`, `unsigned` or `int32_t` (`for (int i = ...`);
  - `int`/`unsigned` variables initialised from threadIdx/blockIdx/blockDim/gridDim.
A line may opt out with a trailing `// int-ok: <reason>` (e.g. a warp lane in [0, 32)); a file
whose kernels index in 32 bits by design (bounds checked on the host) opts out as a whole with a
line `// int-ok-file: <reason>` (the reason is required).
Usage: tools/check_index_types.py [ROOT]; exit 1 and one line per finding when any.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

NARROW = r"(?:unsigned\s+int|unsigned|int|int32_t|uint32_t|short)"
LOOP = re.compile(rf"\bfor\s*\(\s*(?:const\s+)?{NARROW}\s+\w+")
FROM_THREAD = re.compile(
    rf"(?:^|[;{{(]\s*)(?:const\s+)?{NARROW}\s+\w+\s*=[^;]*\b(?:threadIdx|blockIdx|blockDim|gridDim)\b"
)
SUFFIXES = {".cu", ".cuh", ".cpp", ".h"}
FILE_OPT_OUT = re.compile(r"^// int-ok-file: \S.*$", re.MULTILINE)


def findings(root: Path) -> list[str]:
    out = []
    for path in sorted((root / "csrc").rglob("*")):
        if path.suffix not in SUFFIXES or "emu" in path.relative_to(root / "csrc").parts[:1]:
            continue
        text = path.read_text()
        if FILE_OPT_OUT.search(text):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            code = line.split("//")[0]
            if "int-ok:" in line:
                continue
            if LOOP.search(code) or FROM_THREAD.search(code.strip()):
                out.append(f"{path.relative_to(root)}:{number}: 32-bit index: {line.strip()}")
    return out


def main() -> int:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
    bad = findings(root)
    for line in bad:
        print(line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
