"""Can one stored copy of ``W^T`` give a bf16 prefill GEMM as fast as ``F.linear`` on ``W``? (issue 22 item 1)

The exported layers keep only ``W^T`` (``[in, out]``, the layout the sparse decode kernel needs). oneDNN's AMX
GEMM on ``W^T`` runs below ``F.linear(x, W)`` at 128 tokens. This study builds its own AMX kernel that reads
``W^T`` directly (``benchmarks/csrc/amx_wt_gemm.cpp``: chunks of ``--kc`` rows x ``--np`` columns repacked into
AMX's pair-interleaved (VNNI) layout in an L2-resident buffer, then multiplied with 2x2 tiles) and times, per shape,
interleaved in shuffled rounds of one process, every ratio against ``F.linear(x, W)`` in the same round:

* ``oneDNN_wt``: ``F.linear(x, W^T.t())``, what the default ``prefill="shared"`` path calls;
* ``amx_full``: the study kernel (its output checked against an fp32 reference);
* ``amx_pack_only``, ``amx_multiply_only`` (the chunk packed once), ``amx_tmul_only`` (no tile loads in the loop):
  the phases alone, to find where the time goes (wrong outputs by design);
* ``amx_prefetch_next`` (software prefetch of the next chunk into L2 while multiplying) and
  ``amx_interleaved_pack`` (the next chunk packed in slices between tile steps, double-buffered): the two ways
  tried to overlap reading ``W^T`` with the tile multiplies.

Needs a CPU with AMX-BF16 (else prints ``{"skipped": ...}``) and a C++ compiler (built on first run).

    python benchmarks/prefill_amx_study.py [--shapes 2048x2048,2048x5632,5632x2048,2048x256] [--tokens 128]
        [--threads 1] [--rounds 10] [--out benchmarks/results/issue22_prefill_amx_study_t1.json]
"""

from __future__ import annotations

import argparse
import pathlib
import random
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import load

from pl_actsparse.kernels.dispatch import cpu_isa_flags

from _common import add_out_argument, emit, llc_bytes

MODES = {"amx_full": 0, "amx_pack_only": 1, "amx_multiply_only": 2, "amx_tmul_only": 3,
         "amx_prefetch_next": 4, "amx_interleaved_pack": 5}


def _best_ms(fn, calls: int) -> float:
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def study_shape(ext, in_f: int, out_f: int, tokens: int, rounds: int, kc: int, np_: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(out_f, in_f, generator=gen) * 0.02).bfloat16()
    wt = w.t().contiguous()
    x = torch.randn(tokens, in_f, generator=gen).bfloat16()
    ref = F.linear(x.float(), w.float())
    errors = {}
    for name in ("amx_full", "amx_prefetch_next", "amx_interleaved_pack"):
        y = ext.amx_linear_wt(x, wt, kc, np_, MODES[name]).float()
        errors[name] = float((y - ref).abs().max() / ref.abs().max())
    errors["F.linear"] = float((F.linear(x, w).float() - ref).abs().max() / ref.abs().max())
    fns = {"F.linear": lambda: F.linear(x, w), "oneDNN_wt": lambda: F.linear(x, wt.t())}
    fns.update({name: (lambda m=m: ext.amx_linear_wt(x, wt, kc, np_, m)) for name, m in MODES.items()})
    for fn in fns.values():  # warm up (oneDNN primitive creation, page faults)
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    rng = random.Random(0)
    for _ in range(rounds):
        order = list(fns)
        rng.shuffle(order)
        for name in order:
            times[name].append(_best_ms(fns[name], 5))
    ratios = {k: round(statistics.median(b / a for a, b in zip(v, times["F.linear"])), 3) for k, v in times.items()}
    ms = {k: round(statistics.median(v), 4) for k, v in times.items()}
    return {"shape": f"{in_f}x{out_f}", "tokens": tokens, "weight_bytes": w.numel() * 2, "median_ms": ms,
            "speedup_vs_F.linear": ratios, "max_rel_error": {k: round(v, 6) for k, v in errors.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="2048x2048,2048x5632,5632x2048,2048x256", help="INxOUT,...")
    parser.add_argument("--tokens", type=int, default=128, help="rows of x (a multiple of 32)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--kc", type=int, default=256, help="rows of W^T per packed chunk (multiple of 32)")
    parser.add_argument("--np", type=int, default=512, help="columns of W^T per packed chunk (multiple of 32)")
    add_out_argument(parser, "issue22_prefill_amx_study_t1")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    meta = {"isa": cpu_isa_flags(), "torch": torch.__version__, "threads": args.threads, "llc_bytes": llc_bytes(),
            "kc": args.kc, "np": args.np}
    src = pathlib.Path(__file__).with_name("csrc") / "amx_wt_gemm.cpp"
    ext = load("pl_actsparse_amx_wt_study", [str(src)], extra_cflags=["-O3"], verbose=False)
    if not ext.amx_available():
        emit({"meta": meta, "skipped": "this CPU does not offer AMX-BF16 (or the kernel may not use it)"}, args.out)
        return
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    results = [study_shape(ext, i, o, args.tokens, args.rounds, args.kc, args.np) for i, o in shapes]
    emit({"meta": meta, "benchmark": "prefill_amx_study", "shapes": results}, args.out)


if __name__ == "__main__":
    main()
