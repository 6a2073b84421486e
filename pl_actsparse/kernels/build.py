"""Build the C++ kernels ahead of time: :func:`build_all` and the ``pl-actsparse build-kernels`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

from pl_actsparse.kernels._extension import ExtensionStatus
from pl_actsparse.kernels.cpu import EXTENSION
from pl_actsparse.kernels.int8_cpu import INT8_EXTENSION

__all__ = ["build_all", "build_kernels_main", "measure_profiles"]

log = logging.getLogger(__name__)


def build_all() -> dict[str, ExtensionStatus]:
    """Build (or load the cached build of) both C++ CPU kernels now; returns ``{"float": status, "int8": status}``.

    Each kernel is built at most once per environment (see :mod:`pl_actsparse.kernels._extension`); a later
    process loads it without a compiler. Never raises for a failed build: the statuses say why.
    """
    out = {}
    for key, ext in (("float", EXTENSION), ("int8", INT8_EXTENSION)):
        ext.load(build=True)
        out[key] = ext.status()
        if out[key].loaded:
            log.info("pl_actsparse: %s ready (%s)", ext.description, out[key].build_directory)
        else:
            log.warning("pl_actsparse: %s could not be built: %s", ext.description, out[key].error)
    return out


def measure_profiles(dtypes: Sequence[str] = ("float32", "bfloat16", "float16")) -> dict[str, dict]:
    """Measure (or read from the cache) this machine's dense method and crossover for ``dtypes`` with the CPU
    backend in use (:func:`pl_actsparse.kernels.dispatch.cpu_profile`), so that no export pays for it later.

    Returns ``{dtype: profile dict}``. Raises ``ValueError`` for an unknown dtype name.
    """
    import torch

    from pl_actsparse.kernels.dispatch import cpu_profile

    out = {}
    for name in dtypes:
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"unknown floating-point dtype {name!r}")
        out[name] = cpu_profile(dtype).to_dict()
    return out


def build_kernels_main(argv: Optional[Sequence[str]] = None, prog: str = "pl-actsparse build-kernels") -> int:
    """``pl-actsparse build-kernels [--allow-failure] [--no-profile]``: build both kernels, measure this machine's
    sparse/dense crossover (unless ``--no-profile``), write one JSON line of statuses and profiles.

    Returns the exit status: 0 when both are loaded (or ``--allow-failure``), 1 otherwise.
    """
    parser = argparse.ArgumentParser(prog=prog, description=build_kernels_main.__doc__)
    parser.add_argument("--allow-failure", action="store_true", help="exit 0 even if a kernel cannot be built")
    parser.add_argument("--no-profile", action="store_true", help="do not measure the sparse/dense crossover now")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    statuses = build_all()
    result: dict = {k: {"loaded": s.loaded, "error": s.error, "build_directory": s.build_directory}
                    for k, s in statuses.items()}
    if not ns.no_profile:
        result["profiles"] = measure_profiles()
    sys.stdout.write(json.dumps(result) + "\n")
    ok = all(s.loaded for s in statuses.values())
    return 0 if ok or ns.allow_failure else 1
