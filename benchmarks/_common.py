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


def add_out_argument(parser, name: str) -> None:
    """``--out PATH``: also write the printed JSON there (the figures in README.md and docs/ come from
    ``benchmarks/results/<name>.json`` written this way, with the command line recorded in it)."""
    parser.add_argument("--out", default=None, help=f"also write the JSON here (e.g. benchmarks/results/{name}.json)")


def emit(result: dict, out=None, indent=1) -> None:
    """Print ``result`` as JSON on stdout; with ``out``, write it there too, with the command that made it."""
    import json
    import pathlib
    import sys

    print(json.dumps(result, indent=indent))
    if out:
        path = pathlib.Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), **result}, indent=1) + "\n")
