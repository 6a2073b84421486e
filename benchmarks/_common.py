"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<name>.py``, so this folder is on
``sys.path``)."""

from __future__ import annotations

import os


def llc_bytes() -> int:
    """Size of the largest CPU cache in bytes (32 MiB if unknown): cold-weight benchmarks cycle through
    several times this many weight bytes so that every read comes from memory."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    txt = f.read().strip()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
            best = max(best, int(txt.rstrip("KMG")) * mult)
    except OSError:
        pass
    return best or (32 << 20)
