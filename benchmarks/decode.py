"""Decode benchmarks for activation-sparse inference on CPU. Prints ONE JSON object.

Part (a), per-layer GEMV (default)::

    python benchmarks/decode.py                      # 3 shapes x fp32/bf16 x s = 0.3/0.5/0.7, 1 token
    python benchmarks/decode.py --crossover          # sparse vs dense path of SparseInferenceLinear by tokens

Part (b), end-to-end with TinyLlama-1.1B shapes in bf16 (random weights), dense vs all seven projections at
50 % vs MLP only at 50 %: prefill of a 512-token prompt (``--prefill-tokens``; the decoder blocks, without
the LM head that both models share) and greedy decoding, reported separately, plus peak memory (one fresh
process per model)::

    python benchmarks/decode.py --end-to-end         # about 4 minutes and 7 GB of RAM on 2 cores
    python benchmarks/decode.py --end-to-end --e2e-layers 2 --prefill-tokens 128 --decode-steps 4 \
        --e2e-rounds 3 --no-memory                   # a short check

A per-channel threshold (``[in_features]``, as weight-aware sparsification writes) against one value in the same
kernel, zeroing the same elements (``channel_vs_scalar``: scalar time / per-channel time, the raw C++ op and the
``sparse_linear`` op)::

    python benchmarks/decode.py --shapes 2048x5632 --dtypes bfloat16 --sparsity 0.5 --backends cpp --threads 1 \
        --channel-threshold --no-bandwidth

Part (d), the multi-token GEMMs on the stored ``W^T`` against ``F.linear(x, W)`` (prefill)::

    python benchmarks/decode.py --gemm --shapes 2048x2048,2048x5632,5632x2048,2048x256 --threads 1 --rounds 30

Part (c), where one decode token's time goes (projections, thresholding, attention, norms, LM head, the rest)::

    python benchmarks/decode.py --profile --decode-steps 4 --threads 1 --dtypes bfloat16

The JSON's ``meta`` holds the CPU's ISA flags (avx2, avx512f, avx512_bf16, amx...), the ISA the C++ kernel
uses (``kernel_isa``), the machine's read bandwidth before and after the run, and the measured
dense-method/crossover profiles of :mod:`pl_actsparse.kernels.dispatch`. Parts (a) and (b) also time a
bandwidth probe interleaved with the candidates and report the weight bytes read (per call, per token) and
the fraction of that bandwidth each candidate achieves (``--no-bandwidth`` skips it).

Method, because the numbers are easy to get wrong on a small shared machine:

* Weights are cold: every candidate cycles through enough copies of the layer that the bytes touched per
  cycle exceed the last-level cache several times over (``--cold-factor``), as in decoding, where each
  layer's weights are evicted by the other layers before they are read again.
* Candidates run interleaved (shuffled order in every round) and each round yields per-candidate times;
  speedups are medians over rounds of per-round ratios, so slow drifts cancel.
* Rounds during which *other* processes used more than ``--quiet`` of the CPUs (read from ``/proc/stat``)
  are dropped when enough quiet rounds exist; the JSON records how many rounds were kept.
* Inputs are Gaussian; the threshold is the ``s`` quantile of ``|x|`` (rounded to the dtype, as the layer
  compares), so each token has about ``s`` zeros at independent positions. (On stories260K the real masks
  of different tokens were only slightly more alike than independent ones; see docs/inference.md.)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pl_actsparse.export.linear import SparseInferenceLinear
from pl_actsparse.kernels import cpu as kcpu
from pl_actsparse.kernels.dispatch import cpu_isa_flags, cpu_profile

from _common import add_out_argument, emit, llc_bytes

DEFAULT_SHAPES = "4096x11008,11008x4096,2048x5632"


# ---------------------------------------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------------------------------------


def _cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks of this process); (0, 0) where /proc is missing."""
    try:
        with open("/proc/stat") as f:
            v = list(map(int, f.readline().split()[1:]))
        with open("/proc/self/stat") as f:
            s = f.read().rsplit(")", 1)[1].split()
        return sum(v) - v[3] - v[4], int(s[11]) + int(s[12])
    except (OSError, ValueError, IndexError):
        return 0, 0


def read_bandwidth(rounds: int = 5) -> dict:
    """The machine's read bandwidth now, with this process's threads: best of ``rounds`` reads of a buffer of
    twice the LLC (256 MiB..1 GiB) by the C++ kernel's ``read_probe`` (AVX2 loads, all threads), or
    ``uint8.max()`` where the kernel is not loaded. Measured in the same run as the figures it normalizes."""
    nbytes = max(256 << 20, min(2 * llc_bytes(), 1 << 30))
    buf = torch.ones(nbytes, dtype=torch.uint8)
    probe = torch.ops.pl_actsparse_ext.read_probe if kcpu.load_extension(build=False) else (lambda b: b.max())
    probe(buf)
    best = math.inf
    for _ in range(rounds):
        t0 = time.perf_counter()
        probe(buf)
        best = min(best, time.perf_counter() - t0)
    return {"gb_per_s": round(nbytes / best / 1e9, 2), "buffer_bytes": nbytes, "threads": torch.get_num_threads(),
            "method": "read_probe" if kcpu.EXTENSION.loaded else "uint8 max"}


def _probe_fn(buffers: list) -> Optional[Callable[[int], object]]:
    """A candidate for :func:`interleaved` reading one of ``buffers`` in full per call (cycled, so cold)."""
    if not kcpu.load_extension(build=False):
        return None
    return lambda i: torch.ops.pl_actsparse_ext.read_probe(buffers[i % len(buffers)])


def kernel_isa() -> str:
    """The instruction set the C++ kernel's one-token path uses on this CPU (chosen at run time)."""
    if not kcpu.load_extension(build=False):
        return "torch embedding_bag (C++ kernel not loaded)"
    return "avx512" if torch.ops.pl_actsparse_ext.has_avx512() else "avx2"


def interleaved(
    fns: dict[str, Callable[[int], object]],
    *,
    reps: int,
    min_quiet: int,
    max_seconds: float,
    quiet: float,
    seed: int = 0,
) -> tuple[dict[str, list[float]], list[float]]:
    """Run shuffled rounds of >= ``reps`` calls per candidate (more for fast ones, so that a block lasts
    ~10 ms and the CPU-share reading of a round means something); returns per-round seconds/call and noise.

    Stops after ``min_quiet`` quiet rounds (other processes below ``quiet`` of the CPUs) or ``max_seconds``.
    """
    rng = random.Random(seed)
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    noise: list[float] = []
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    ncpu = os.cpu_count() or 1
    counter = 0
    calls = {}
    for k in names:  # warm-up (allocations, lazy init), then enough calls per block for >= ~10 ms
        fns[k](counter)
        t0 = time.perf_counter()
        fns[k](counter + 1)
        counter += 2
        calls[k] = max(reps, min(10_000, int(0.01 / max(time.perf_counter() - t0, 1e-7))))
    start = time.perf_counter()
    while True:
        order = names[:]
        rng.shuffle(order)
        b0, m0 = _cpu_ticks()
        w0 = time.perf_counter()
        per: dict[str, float] = {}
        for k in order:
            f = fns[k]
            t0 = time.perf_counter()
            for _ in range(calls[k]):
                f(counter)
                counter += 1
            per[k] = (time.perf_counter() - t0) / calls[k]
        b1, m1 = _cpu_ticks()
        wall = time.perf_counter() - w0
        noise.append(max(0.0, ((b1 - b0) - (m1 - m0)) / tick / (wall * ncpu)) if b1 else 0.0)
        for k in names:
            times[k].append(per[k])
        n_quiet = sum(o <= quiet for o in noise)
        if n_quiet >= min_quiet or time.perf_counter() - start > max_seconds:
            return times, noise


def _select_rounds(noise: list[float], quiet: float, min_keep: int) -> list[int]:
    idx = [i for i, o in enumerate(noise) if o <= quiet]
    if len(idx) >= min_keep:
        return idx
    # Not enough quiet rounds: keep the quietest quarter (at least min_keep).
    keep = max(min_keep, len(noise) // 4)
    return sorted(sorted(range(len(noise)), key=lambda i: noise[i])[:keep])


def _median_ratio(num: list[float], den: list[float], idx: list[int]) -> float:
    return statistics.median(num[i] / den[i] for i in idx)


def _make_inputs(in_f: int, dtype: torch.dtype, sparsity: float, n: int, tokens: int, gen: torch.Generator):
    xs = torch.randn(n, tokens, in_f, generator=gen)
    if sparsity <= 0:
        thr = float("-inf")
    else:
        flat = xs.abs().flatten()
        thr = float(torch.quantile(flat[: min(flat.numel(), 1 << 24)], sparsity))
    xs = xs.to(dtype)
    t = torch.tensor(thr)
    achieved = float((xs.abs() <= t).float().mean())
    return [x.squeeze(0) if tokens == 1 else x for x in xs], t, achieved


class _Layers:
    """Copies of one layer shape (random weights), enough of them to keep every candidate's weights cold."""

    def __init__(self, in_f: int, out_f: int, dtype: torch.dtype, cold_factor: float, gen: torch.Generator):
        elem = torch.empty((), dtype=dtype).element_size()
        nbytes = in_f * out_f * elem
        self.n = max(2, -(-int(cold_factor * llc_bytes()) // nbytes))
        self.weights = []
        self.modules = []
        for _ in range(self.n):
            w = (torch.randn(out_f, in_f, generator=gen) * in_f**-0.5).to(dtype)
            lin = nn.Linear(in_f, out_f, bias=False, dtype=dtype)
            lin.weight = nn.Parameter(w, requires_grad=False)
            lin.register_buffer("activation_threshold", torch.tensor(0.0))
            self.weights.append(w)
            self.modules.append(SparseInferenceLinear.from_linear(lin))
        self.weight_t = [m.weight_t for m in self.modules]

    def set_threshold(self, threshold: torch.Tensor, max_sparse_tokens: int) -> None:
        for m in self.modules:
            m.activation_threshold.copy_(threshold)
            m.max_sparse_tokens = max_sparse_tokens


def _probe(f: Callable[[int], object], calls: int = 2) -> float:
    f(0)
    t0 = time.perf_counter()
    for i in range(calls):
        f(i + 1)
    return (time.perf_counter() - t0) / calls


# ---------------------------------------------------------------------------------------------------------
# Part (a): per-layer sparse GEMV vs dense
# ---------------------------------------------------------------------------------------------------------


def gemv_benchmark(args: argparse.Namespace) -> dict:
    """Single-token (``--tokens``) sparse kernels vs ``F.linear`` and the best dense option, per config."""
    gen = torch.Generator().manual_seed(args.seed)
    results = []
    backends = _available_backends(args.backends)
    for shape in args.shapes.split(","):
        in_f, out_f = (int(v) for v in shape.lower().split("x"))
        for dname in args.dtypes.split(","):
            dtype = getattr(torch, dname)
            layers = _Layers(in_f, out_f, dtype, args.cold_factor, gen)
            n = layers.n
            for s in (float(v) for v in args.sparsity.split(",")):
                xs, thr, achieved = _make_inputs(in_f, dtype, s, 64, args.tokens, gen)
                nx = len(xs)
                fns: dict[str, Callable[[int], object]] = {
                    "linear": lambda i: F.linear(xs[i % nx], layers.weights[i % n]),
                    "x@Wt": lambda i: torch.matmul(xs[i % nx], layers.weight_t[i % n]),
                }
                for b in backends:
                    fns[f"sparse_{b}"] = _sparse_fn(b, xs, thr, layers.weight_t)
                if args.channel_threshold and "cpp" in backends:  # the same value per channel: the same rows read
                    vec = torch.full((in_f,), kcpu.effective_threshold(thr, dtype))
                    fns["sparse_cpp_channel"] = _sparse_fn("cpp", xs, vec, layers.weight_t)
                    gemv = torch.ops.pl_actsparse_ext.sparse_gemv  # the raw op: no Python around the kernel
                    fns["sparse_cpp_raw"] = lambda i: gemv(xs[i % nx], thr, layers.weight_t[i % n], None, 0)
                    fns["sparse_cpp_raw_channel"] = lambda i: gemv(xs[i % nx], vec, layers.weight_t[i % n], None, 0)
                probe = _probe_fn([w.view(-1) for w in layers.weight_t]) if not args.no_bandwidth else None
                _check(fns, xs[0], thr, layers.weights[0], [k for k in fns if k.startswith("sparse_")])
                excluded = {}
                base = _probe(fns["linear"])
                for k in ("x@Wt",):
                    t = _probe(fns[k])
                    if t > 4 * base:  # e.g. bf16 GEMV against W^T on CPUs without native bf16 (30-50x slower)
                        excluded[k] = {"probe_ms": round(t * 1e3, 2), "reason": "slower than 4x F.linear in a probe"}
                        del fns[k]
                if probe is not None:  # the bandwidth, interleaved with the kernels, on the same cold weights
                    fns["read_probe"] = probe
                times, noise = interleaved(
                    fns, reps=args.reps, min_quiet=args.rounds, max_seconds=args.max_seconds, quiet=args.quiet
                )
                probe_t = times.pop("read_probe", None)
                fns.pop("read_probe", None)
                idx = _select_rounds(noise, args.quiet, min(5, len(noise)))
                dense = [k for k in ("linear", "x@Wt") if k in fns]
                best_dense = [min(times[k][i] for k in dense) for i in range(len(noise))]
                rec = {
                    "shape": f"{in_f}x{out_f}",
                    "dtype": dname,
                    "sparsity": s,
                    "achieved_sparsity": round(achieved, 4),
                    "tokens": args.tokens,
                    "ms": {k: round(statistics.median(times[k][i] for i in idx) * 1e3, 3) for k in fns},
                    "speedup_vs_linear": {},
                    "speedup_vs_best_dense": {},
                    "rounds_kept": len(idx),
                    "rounds_total": len(noise),
                    "other_cpu_load_median": round(statistics.median(noise), 3),
                }
                # Secondary, robust to interference (which only ever adds time): ratios of the fastest calls.
                rec["best_ms"] = {k: round(min(times[k]) * 1e3, 3) for k in fns}
                rec["speedup_of_best_times"] = {}
                for k in fns:
                    if k.startswith("sparse_") or k == "x@Wt":
                        rec["speedup_vs_linear"][k] = round(_median_ratio(times["linear"], times[k], idx), 3)
                    if k.startswith("sparse_"):
                        rec["speedup_vs_best_dense"][k] = round(_median_ratio(best_dense, times[k], idx), 3)
                        rec["speedup_of_best_times"][k] = {
                            "vs_linear": round(min(times["linear"]) / min(times[k]), 3),
                            "vs_best_dense": round(min(best_dense) / min(times[k]), 3),
                        }
                if excluded:
                    rec["excluded"] = excluded
                if "sparse_cpp_channel" in fns:
                    rec["channel_vs_scalar"] = {
                        "sparse_linear": round(_median_ratio(times["sparse_cpp"], times["sparse_cpp_channel"], idx), 4),
                        "sparse_gemv": round(_median_ratio(times["sparse_cpp_raw"], times["sparse_cpp_raw_channel"], idx), 4)}
                dense_bytes = in_f * out_f * dtype.itemsize * args.tokens
                sparse_bytes = (1 - achieved) * dense_bytes if args.tokens == 1 else None
                rec["weight_bytes_read"] = {"dense": dense_bytes, "sparse": None if sparse_bytes is None else round(sparse_bytes)}
                if sparse_bytes is not None and probe_t is not None:  # per round: (bytes / t) / (bytes / t_probe)
                    wb = in_f * out_f * dtype.itemsize
                    rec["read_bandwidth_gb_per_s"] = round(wb / statistics.median(probe_t[i] for i in idx) / 1e9, 2)
                    rec["fraction_of_bandwidth"] = {
                        k: round(statistics.median(
                            (sparse_bytes if k.startswith("sparse_") else dense_bytes) / wb * probe_t[i] / times[k][i]
                            for i in idx), 3) for k in fns}
                results.append(rec)
                print(json.dumps(rec), file=sys.stderr, flush=True)
            del layers
    return {"results": results, "summary": _summary(results)}


def _available_backends(spec: str) -> list[str]:
    out = []
    for b in spec.split(","):
        b = b.strip()
        if b == "cpp" and not kcpu.load_extension(build=True):
            print(f"skipping backend cpp: {kcpu.extension_status().error}", file=sys.stderr)
            continue
        out.append(b)
    return out


def _sparse_fn(backend: str, xs, thr, weight_t) -> Callable[[int], object]:
    nx, n = len(xs), len(weight_t)

    def f(i: int):
        kcpu.set_backend(backend)
        return kcpu.sparse_linear(xs[i % nx], thr, weight_t[i % n])

    return f


def _check(fns, x, thr, w, names) -> None:
    ref = kcpu.masked_linear(x.float(), kcpu.effective_threshold(thr, x.dtype), w.float())
    scale = ref.abs().max().clamp_min(1e-6)
    for k in names:
        err = float((fns[k](0).float() - ref).abs().max() / scale)
        tol = 1e-4 if x.dtype == torch.float32 else 2e-2
        if err > tol:
            raise AssertionError(f"{k} disagrees with the masked reference: rel. error {err:.2e}")


def _summary(results: list[dict]) -> dict:
    """Median speedups per dtype and sparsity over shapes (the numbers quoted in docs/inference.md)."""
    out: dict[str, dict] = {}
    for rec in results:
        key = f"{rec['dtype']}@s={rec['sparsity']}"
        d = out.setdefault(key, {})
        for kind in ("speedup_vs_linear", "speedup_vs_best_dense"):
            for k, v in rec[kind].items():
                if k.startswith("sparse_"):
                    d.setdefault(f"{k} {kind}", []).append(v)
        for k, v in rec.get("speedup_of_best_times", {}).items():
            d.setdefault(f"{k} best-times vs_linear", []).append(v["vs_linear"])
    return {
        key: {k: {"median": round(statistics.median(v), 3), "min": min(v), "max": max(v)} for k, v in d.items()}
        for key, d in out.items()
    }


# ---------------------------------------------------------------------------------------------------------
# Crossover: sparse vs dense path of SparseInferenceLinear by number of tokens
# ---------------------------------------------------------------------------------------------------------


def crossover_benchmark(args: argparse.Namespace) -> dict:
    """Time the layer's two paths (forced) and ``F.linear`` for several token counts."""
    gen = torch.Generator().manual_seed(args.seed)
    results = []
    backends = _available_backends(args.backends)
    tokens = [int(v) for v in args.token_counts.split(",")]
    for shape in args.shapes.split(","):
        in_f, out_f = (int(v) for v in shape.lower().split("x"))
        for dname in args.dtypes.split(","):
            dtype = getattr(torch, dname)
            layers = _Layers(in_f, out_f, dtype, args.cold_factor, gen)
            n = layers.n
            for s in (float(v) for v in args.sparsity.split(",")):
                for ntok in tokens:
                    xs, thr, achieved = _make_inputs(in_f, dtype, s, 16, ntok, gen)
                    nx = len(xs)
                    layers.set_threshold(thr, max_sparse_tokens=1 << 30)
                    mods = layers.modules
                    union = float((~(torch.stack(xs).reshape(nx, ntok, in_f).abs() <= thr)).any(1).float().mean())
                    fns = {
                        "linear": lambda i: F.linear(xs[i % nx], layers.weights[i % n]),
                        "dense_path": lambda i: mods[i % n].dense_forward(xs[i % nx]),
                    }
                    for b in backends:
                        fns[f"sparse_{b}"] = (
                            lambda b: lambda i: (kcpu.set_backend(b), mods[i % n](xs[i % nx]))[1]
                        )(b)
                    times, noise = interleaved(
                        fns, reps=1, min_quiet=args.rounds, max_seconds=args.max_seconds, quiet=args.quiet
                    )
                    idx = _select_rounds(noise, args.quiet, min(5, len(noise)))
                    rec = {
                        "shape": f"{in_f}x{out_f}",
                        "dtype": dname,
                        "sparsity": s,
                        "tokens": ntok,
                        "union_of_rows": round(union, 4),
                        "achieved_sparsity": round(achieved, 4),
                        "ms": {k: round(statistics.median(times[k][i] for i in idx) * 1e3, 3) for k in fns},
                        "sparse_vs_dense_path": {
                            k: round(_median_ratio(times["dense_path"], times[k], idx), 3)
                            for k in fns
                            if k.startswith("sparse_")
                        },
                        "sparse_vs_linear": {
                            k: round(_median_ratio(times["linear"], times[k], idx), 3)
                            for k in fns
                            if k.startswith("sparse_")
                        },
                        "dense_path_vs_linear": round(_median_ratio(times["linear"], times["dense_path"], idx), 3),
                        "rounds_kept": len(idx),
                        "rounds_total": len(noise),
                    }
                    results.append(rec)
                    print(json.dumps(rec), file=sys.stderr, flush=True)
            del layers
    kcpu.set_backend(None)
    return {"results": results, "crossover": _crossover_summary(results)}


def _crossover_summary(results: list[dict]) -> dict:
    """Per backend/dtype/sparsity: the largest token count up to which sparse beats the dense path."""
    out: dict[str, dict] = {}
    for rec in results:
        for k, v in rec["sparse_vs_dense_path"].items():
            key = f"{k} {rec['dtype']} s={rec['sparsity']}"
            d = out.setdefault(key, {})
            d.setdefault(rec["shape"], []).append((rec["tokens"], v))
    summary = {}
    for key, per_shape in out.items():
        summary[key] = {}
        for shape, pts in per_shape.items():
            pts.sort()
            last = 0
            for ntok, v in pts:
                if v >= 1.0:
                    last = ntok
                else:
                    break
            summary[key][shape] = last
    return summary


# =========================================================================================================
# Part (b): end-to-end greedy decoding, TinyLlama-1.1B shapes
# =========================================================================================================

E2E_VARIANTS = {
    # name: (patterns sparsified at --e2e-sparsity, or None for the dense model)
    "dense": None,
    "mlp": [r".*mlp\.(gate|up|down)_proj"],
    "all": [r".*_proj"],  # q, k, v, o, gate, up, down: the seven projections
    "prepacked": [r".*_proj"],  # the same, exported with prefill="prepacked" (a packed copy where it races faster)
}


def _e2e_config(args: argparse.Namespace):
    from pl_actsparse.demos.llama2c import Llama2cConfig

    cfg = Llama2cConfig.tinyllama_1b()
    if args.e2e_layers:
        cfg = dataclasses.replace(cfg, n_layers=args.e2e_layers)
    return cfg


def _build_e2e_model(args: argparse.Namespace, variant: str):
    """The ``--e2e-dtype`` model (same random weights for every variant), sparsified and exported unless dense."""
    from pl_actsparse import TargetScope, activation_sparsity_report, sparsify_activations
    from pl_actsparse.export.convert import export_for_inference, exported_layers
    from pl_actsparse.demos.llama2c import Llama2cModel

    cfg = _e2e_config(args)
    torch.manual_seed(args.seed)
    model = Llama2cModel(cfg, dtype=getattr(torch, args.e2e_dtype)).eval()
    info: dict = {}
    patterns = E2E_VARIANTS[variant]
    if patterns is not None:
        gen = torch.Generator().manual_seed(args.seed + 1)
        calib = [torch.randint(0, cfg.vocab_size, (1, args.calib_tokens), generator=gen) for _ in range(args.calib_prompts)]
        sparsify_activations(model, calib, {TargetScope(patterns=patterns): args.e2e_sparsity}, calibration={"progress": False})
        rep = activation_sparsity_report(model)
        info["sparsified_layers"] = len(rep.layers)
        info["calibration_sparsity"] = None if rep.mean_sparsity is None else round(rep.mean_sparsity, 4)
        export_for_inference(model, prefill="prepacked" if variant == "prepacked" else "shared")
        layers = exported_layers(model)
        info["extra_weight_bytes"] = sum(e.extra_weight_bytes for e in layers)
        info["prepacked_layers"] = sum(e.prefill == "prepacked" for e in layers)
    info["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    return model, info


def _prompt(args: argparse.Namespace, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(args.seed + 2)
    return torch.randint(0, vocab, (1, args.prompt_tokens), generator=gen)


def _decoder(model, prompt: torch.Tensor, steps: int, max_len: int) -> Callable[[int], object]:
    """A function that greedily decodes ``steps`` tokens per call, continuing one KV cache (prefill untimed).

    The cache restarts after the prompt when full, so every call decodes at similar context lengths.
    """
    cache = model.new_cache(1, max_len=max_len)
    T = prompt.shape[1]
    with torch.inference_mode():
        logits = model(prompt, cache=cache, start_pos=0)
    first = logits[:, -1].argmax(-1, keepdim=True)
    state = {"pos": T, "tok": first}

    def run(_: int):
        if state["pos"] + steps > max_len:
            state["pos"], state["tok"] = T, first
        with torch.inference_mode():
            for _ in range(steps):
                logits = model(state["tok"], cache=cache, start_pos=state["pos"])
                state["tok"] = logits[:, -1].argmax(-1, keepdim=True)
                state["pos"] += 1

    return run


def _prefiller(model, prompt: torch.Tensor) -> Callable[[int], object]:
    """A function that runs the prompt through the decoder blocks once per call (a fresh KV cache each time).

    The LM head is left out: it is the same unsparsified [vocab, dim] GEMM in every variant and would only
    dilute the comparison (for 512 tokens it costs more than two TinyLlama blocks).
    """
    T = prompt.shape[1]

    def run(_: int):
        cache = model.new_cache(1, max_len=T)
        with torch.inference_mode():
            cos, sin = model.rope_cos[:T], model.rope_sin[:T]
            x = model.embed_tokens(prompt)
            for layer in model.layers:
                x = layer(x, cos, sin, cache, 0)
            return model.norm(x)

    return run


def _with_backend(model, backend: str, fn: Callable[[int], object]) -> Callable[[int], object]:
    from pl_actsparse.export.linear import SparseInferenceLinear

    layers = [m for m in model.modules() if isinstance(m, SparseInferenceLinear)]

    def run(i: int):
        kcpu.set_backend(backend)
        for m in layers:  # the crossover defaults depend on the backend (tiny layers stay dense with "torch")
            m.backend = backend
        return fn(i)

    return run


def _decode_reads(model, prompt: torch.Tensor, steps: int) -> dict:
    """Over ``steps`` single-token decode calls: the fraction of inputs at or below the threshold in the sparse
    layers (``decode_sparsity``) and the weight bytes read per token (``weight_bytes_per_token``: every dense
    Linear's whole weight, LM head included; of a sparse layer, the rows of its kept inputs)."""
    from pl_actsparse.export.linear import SparseInferenceLinear

    counts, nbytes = [0, 0], [0]

    def hook(mod, inp):
        x = inp[0]
        if x.numel() != x.shape[-1]:
            return
        if isinstance(mod, SparseInferenceLinear):
            zero = int((x.abs() <= mod.activation_threshold.to(x.dtype)).sum())
            counts[0] += zero
            counts[1] += x.numel()
            nbytes[0] += mod.weight_nbytes * (x.numel() - zero) // x.numel()
        else:
            nbytes[0] += mod.weight.numel() * mod.weight.element_size()

    run = _decoder(model, prompt, steps, prompt.shape[1] + steps)  # the prompt's prefill, before the hooks
    hs = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, (SparseInferenceLinear, nn.Linear))]
    try:
        run(0)  # ``steps`` single-token forward passes
    finally:
        for h in hs:
            h.remove()
    return {"decode_sparsity": round(counts[0] / counts[1], 4) if counts[1] else None,
            "weight_bytes_per_token": nbytes[0] // steps}


def decode_profile(args: argparse.Namespace) -> dict:
    """Where one decode token's time goes, per variant: ms per token in the projections (sparse kernel or
    F.linear, thresholding included), the thresholding alone (the kernel called with every input zeroed: the
    row-selection pass and the output), attention (RoPE, KV cache, SDPA), the MLP's activation, norms, the LM
    head, and the rest (per-layer Python, residual adds, hooks). Forward hooks time each module (inclusive)."""
    out = {}
    for variant in ("dense", "all"):
        model, _ = _build_e2e_model(args, variant)
        prompt = _prompt(args, model.config.vocab_size)
        marks: dict = {}
        spent: dict = {}

        def pre(mod, inp):
            marks[id(mod)] = time.perf_counter()

        def post(mod, inp, outp):
            dt = time.perf_counter() - marks.pop(id(mod))
            spent[mod.__dict__["_prof"]] = spent.get(mod.__dict__["_prof"], 0.0) + dt

        kinds = []
        for name, m in model.named_modules():
            kind = ("lm_head" if name == "lm_head" else "mlp_projections" if ".mlp." in name and name.endswith("_proj")
                    else "attention_projections" if name.endswith("_proj") else
                    "attention_total" if name.endswith("self_attn") else "mlp_total" if name.endswith(".mlp") else
                    "norms" if "norm" in name.split(".")[-1] else "embedding" if name == "embed_tokens" else None)
            if kind is not None:
                m.__dict__["_prof"] = kind
                kinds += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
        steps = args.decode_steps
        step = _decoder(model, prompt, steps, args.prompt_tokens + steps)
        step(0)
        spent.clear()
        t0 = time.perf_counter()
        step(1)
        total = time.perf_counter() - t0
        for h in kinds:
            h.remove()
        ms = {k: v / steps * 1e3 for k, v in spent.items()}
        ms["attention_excl_projections"] = ms.pop("attention_total") - ms["attention_projections"]
        ms["mlp_activation"] = ms.pop("mlp_total") - ms["mlp_projections"]
        ms["total"] = total / steps * 1e3
        ms["other_python_residual"] = ms["total"] - sum(v for k, v in ms.items() if k != "total")
        if variant == "all":  # thresholding alone: the kernel with nothing kept, at each sparse layer's shape
            layers = [m for m in model.modules() if isinstance(m, SparseInferenceLinear)]
            inf = torch.tensor(math.inf)
            xs = {m.in_features: torch.randn(1, m.in_features).to(torch.bfloat16) for m in layers}
            for m in layers:
                kcpu.sparse_linear_cpu(xs[m.in_features], inf, m.weight_t)
            t0 = time.perf_counter()
            for m in layers:
                kcpu.sparse_linear_cpu(xs[m.in_features], inf, m.weight_t)
            ms["thresholding_within_projections"] = (time.perf_counter() - t0) * 1e3
        out[variant] = {k: round(v, 3) for k, v in ms.items()}
        del model, step
        gc.collect()
    return {"ms_per_token": out, "decode_steps": args.decode_steps, "note": "one timed pass of --decode-steps tokens with forward hooks on"}


def _rss_bytes(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:  # Linux: writing 5 resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _load_the_code() -> None:
    """Sparsify, export and decode a tiny model, so that every variant's process has imported (and built)
    the same code before its baseline is read: the calibration and export paths import ~900 modules
    (torch.library, cpp_extension, ...), ~100 MB that do not grow with the model."""
    from pl_actsparse import TargetScope, sparsify_activations
    from pl_actsparse.export.convert import export_for_inference
    from pl_actsparse.demos.llama2c import Llama2cConfig, Llama2cModel

    kcpu.set_backend("cpp" if kcpu.load_extension() else "torch")
    toy = Llama2cModel(Llama2cConfig.stories260k(), dtype=torch.bfloat16).eval()
    sparsify_activations(toy, [torch.randint(0, 512, (1, 16))], {TargetScope(patterns=[r".*_proj"]): 0.5}, calibration={"progress": False})
    export_for_inference(toy)
    with torch.inference_mode():
        toy.generate(torch.ones(1, 2, dtype=torch.long), 2)
    del toy
    gc.collect()


def e2e_memory_child(args: argparse.Namespace) -> dict:
    """One variant in a fresh process: peak RSS of the whole run and of decoding alone."""
    variant = args.e2e_memory_child
    _load_the_code()
    baseline = _rss_bytes("VmRSS")
    _reset_peak_rss()
    model, info = _build_e2e_model(args, variant)
    gc.collect()
    after_build = _rss_bytes("VmRSS")
    run_peak = _rss_bytes("VmHWM")
    reset = _reset_peak_rss()
    prompt = _prompt(args, model.config.vocab_size)
    _decoder(model, prompt, args.decode_steps, args.prompt_tokens + args.decode_steps)(0)
    return {
        "variant": variant,
        "model_bytes": sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]),
        "rss_baseline": baseline,
        "rss_after_build": after_build,
        "peak_rss_build": run_peak,
        "peak_rss_decode": _rss_bytes("VmHWM") if reset else None,
        "peak_rss_total": max(run_peak or 0, _rss_bytes("VmHWM") or 0),
        **info,
    }


def _memory_figures(args: argparse.Namespace) -> dict:
    out: dict = {}
    for variant in args.e2e_variants.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--e2e-memory-child", variant] + _e2e_child_args(args)
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"memory child {variant} failed:\n{res.stderr[-4000:]}")
        out[variant] = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"[e2e] memory {variant}: {out[variant]}", file=sys.stderr, flush=True)
    return out


def _e2e_child_args(args: argparse.Namespace) -> list[str]:
    return [
        f"--e2e-sparsity={args.e2e_sparsity}",
        f"--e2e-layers={args.e2e_layers}",
        f"--calib-prompts={args.calib_prompts}",
        f"--calib-tokens={args.calib_tokens}",
        f"--prompt-tokens={args.prompt_tokens}",
        f"--decode-steps={args.decode_steps}",
        f"--seed={args.seed}",
    ] + ([f"--threads={args.threads}"] if args.threads else [])


def end_to_end_benchmark(args: argparse.Namespace) -> dict:
    """Tokens/s of greedy decoding: dense vs sparse (all seven projections, MLP only), interleaved rounds."""
    t0 = time.perf_counter()
    backends = _available_backends(args.backends)
    models = {}
    info = {}
    variants = args.e2e_variants.split(",")
    for variant in variants:
        models[variant], info[variant] = _build_e2e_model(args, variant)
        print(f"[e2e] built {variant} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    cfg = models["dense"].config
    prompt = _prompt(args, cfg.vocab_size)
    max_len = args.prompt_tokens + args.decode_steps
    for variant in variants:
        kcpu.set_backend(backends[0])
        info[variant].update(_decode_reads(models[variant], prompt, args.decode_steps))
    fns = {"dense": _decoder(models["dense"], prompt, args.decode_steps, max_len)}
    for variant in variants[1:]:
        for b in backends:
            fns[f"{variant}_{b}"] = _with_backend(models[variant], b, _decoder(models[variant], prompt, args.decode_steps, max_len))
    probe_buf = torch.ones(max(256 << 20, min(2 * llc_bytes(), 1 << 30)), dtype=torch.uint8) if not args.no_bandwidth else None
    probe = _probe_fn([probe_buf]) if probe_buf is not None else None
    if probe is not None:  # the bandwidth in every round, interleaved with the decoders
        fns["read_probe"] = probe
    times, noise = interleaved(
        fns, reps=1, min_quiet=args.e2e_rounds, max_seconds=args.e2e_max_seconds, quiet=args.quiet, seed=args.seed
    )
    probe_t = times.pop("read_probe", None)
    fns.pop("read_probe", None)
    kcpu.set_backend(None)
    idx = _select_rounds(noise, args.quiet, min_keep=3)
    per_token = {k: statistics.median(v[i] for i in idx) / args.decode_steps for k, v in times.items()}
    out: dict = {
        "model": f"TinyLlama-1.1B shapes ({cfg.n_layers} layers, dim {cfg.dim}, hidden {cfg.hidden_dim}, "
        f"{cfg.n_heads}/{cfg.n_kv_heads} heads), random {args.e2e_dtype} weights",
        "sparsity_target": args.e2e_sparsity,
        "calibration": f"{args.calib_prompts} random prompts x {args.calib_tokens} tokens",
        "decode": f"prompt {args.prompt_tokens} tokens (prefill untimed), {args.decode_steps} greedy tokens per round",
        "rounds_kept": f"{len(idx)}/{len(noise)}",
        "variants": info,
        "tokens_per_s": {k: round(1 / v, 3) for k, v in per_token.items()},
        "speedup_vs_dense": {
            k: round(_median_ratio(times["dense"], times[k], idx), 3) for k in fns if k != "dense"
        },
    }
    if probe_t is not None:  # per round: (weight bytes per token / time per token) / (probe bytes / probe time)
        nb = probe_buf.numel()
        out["read_bandwidth_gb_per_s"] = round(nb / statistics.median(probe_t[i] for i in idx) / 1e9, 2)
        out["fraction_of_bandwidth"] = {
            k: round(statistics.median(info[k.split("_")[0]]["weight_bytes_per_token"] * args.decode_steps
                                       / times[k][i] * probe_t[i] / nb for i in idx), 3) for k in per_token}
        del probe_buf
    if args.prefill_tokens:
        gen = torch.Generator().manual_seed(args.seed + 3)
        long_prompt = torch.randint(0, cfg.vocab_size, (1, args.prefill_tokens), generator=gen)
        pfns = {"dense": _prefiller(models["dense"], long_prompt)}
        for variant in variants[1:]:
            for b in backends:
                pfns[f"{variant}_{b}"] = _with_backend(models[variant], b, _prefiller(models[variant], long_prompt))
        ptimes, pnoise = interleaved(
            pfns, reps=1, min_quiet=args.prefill_rounds, quiet=args.quiet,
            max_seconds=args.e2e_max_seconds if args.prefill_max_seconds is None else args.prefill_max_seconds,
            seed=args.seed,
        )
        kcpu.set_backend(None)
        pidx = _select_rounds(pnoise, args.quiet, min_keep=min(3, len(pnoise)))
        out["prefill"] = {
            "prompt_tokens": args.prefill_tokens,
            "scope": "embedding + decoder blocks + final norm (the shared LM head excluded)",
            "rounds_kept": f"{len(pidx)}/{len(pnoise)}",
            "ms": {k: round(statistics.median(v[i] for i in pidx) * 1e3, 2) for k, v in ptimes.items()},
            "best_ms": {k: round(min(v) * 1e3, 2) for k, v in ptimes.items()},
            "speedup_vs_dense": {
                k: round(_median_ratio(ptimes["dense"], ptimes[k], pidx), 3) for k in pfns if k != "dense"
            },
            "speedup_of_best_times": {
                k: round(min(ptimes["dense"]) / min(ptimes[k]), 3) for k in pfns if k != "dense"
            },
        }
        del pfns
    if not args.no_memory:
        del models, fns
        gc.collect()
        mem = _memory_figures(args)
        dense_peak = mem["dense"]["peak_rss_total"]
        out["memory"] = mem
        out["peak_rss_vs_dense"] = {
            k: {
                "total": round(mem[k]["peak_rss_total"] / dense_peak, 4),
                "decode": None
                if mem[k]["peak_rss_decode"] is None
                else round(mem[k]["peak_rss_decode"] / mem["dense"]["peak_rss_decode"], 4),
            }
            for k in variants[1:]
        }
    best_all = max((v for k, v in out["speedup_vs_dense"].items() if k.startswith("all_")), default=0.0)
    out["targets"] = {"all_projections_speedup_ge_1.5": best_all >= 1.5}
    if "prefill" in out:
        out["targets"]["prefill_ge_1x_dense"] = {k: v >= 1.0 for k, v in out["prefill"]["speedup_vs_dense"].items()}
    if "peak_rss_vs_dense" in out:
        out["targets"]["peak_memory_le_dense_plus_5pct"] = all(
            v["total"] <= 1.05 for v in out["peak_rss_vs_dense"].values()
        )
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def prefill_gemm_benchmark(args: argparse.Namespace) -> dict:
    """Part (d): the multi-token GEMMs an exported layer could use on its stored ``W^T``, against ``F.linear(x, W)``
    at ``--gemm-tokens`` tokens: the three dense methods, oneDNN's linear on ``W^T.T``, a weight prepacked once
    for oneDNN (bf16; a second copy) or MKL (fp32), and the masking pass (``hardshrink`` / ``mask_small``).
    Medians of per-round ratios (``F.linear`` time / candidate time: > 1 is faster), interleaved shuffled rounds."""
    from pl_actsparse.kernels.dispatch import dense_linear_t, packed_linear, prepack_weight, sparse_token_crossover

    rng, out = random.Random(args.seed), {}
    gen = torch.Generator().manual_seed(args.seed)
    thr = torch.tensor(0.6745)
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for shape in args.shapes.split(","):
            in_f, out_f = map(int, shape.split("x"))
            w = torch.randn(out_f, in_f, generator=gen).to(dtype)
            wt, x = w.t().contiguous(), torch.randn(args.gemm_tokens, in_f, generator=gen).to(dtype)
            c = {"F.linear(x, W)": lambda: F.linear(x, w)}
            c["F.linear(x, W^T.T) (linear)"] = lambda: F.linear(x, wt.t())
            c["x @ W^T (matmul)"] = lambda: torch.matmul(x, wt)
            sparse_token_crossover(dtype, weight_t=wt)  # measures this shape's dense method, as a layer's first call
            c["dense_linear_t (the method measured for this shape)"] = lambda: dense_linear_t(x, wt)
            c["mkldnn._linear_pointwise(x, W^T.T)"] = lambda: torch.ops.mkldnn._linear_pointwise(x, wt.t(), None, "none", [], "")
            if dtype == torch.bfloat16:
                packed = torch.ops.mkldnn._reorder_linear_weight(w, args.gemm_tokens)
                c["oneDNN prepacked W (second copy)"] = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            else:
                mkl = torch.ops.mkl._mkl_reorder_linear_weight(w, args.gemm_tokens)
                c["MKL prepacked W (second copy)"] = lambda: torch.ops.mkl._mkl_linear(x, mkl, w, None, args.gemm_tokens)
            pw = prepack_weight(wt)  # what prefill="prepacked" keeps
            c["packed_linear (oneDNN prepacked W^T, prefill='prepacked')"] = lambda: packed_linear(x, pw)
            nbytes = w.numel() * w.element_size()
            packed_bytes = {"packed_linear": pw.numel() * pw.element_size() / nbytes}
            if dtype == torch.float32:
                packed_bytes["MKL"] = mkl.numel() * mkl.element_size() / nbytes
            c["hardshrink(x)"] = lambda: F.hardshrink(x, 0.6745)
            if kcpu.load_extension(build=False):
                c["mask_small(x)"] = lambda: torch.ops.pl_actsparse_ext.mask_small(x, thr)
            times = {k: [] for k in c}
            for f in c.values():
                f()
            for _ in range(args.rounds):
                order = list(c)
                rng.shuffle(order)
                for k in order:
                    t0 = time.perf_counter()
                    c[k]()
                    times[k].append(time.perf_counter() - t0)
            base = times["F.linear(x, W)"]
            out[f"{dtype_name} {shape}"] = {
                "F.linear_ms": round(statistics.median(base) * 1e3, 3),
                "speed_vs_F.linear": {k: round(statistics.median(b / t for b, t in zip(base, v)), 3) for k, v in times.items()},
                "packed_bytes_vs_weight": {k: round(v, 3) for k, v in packed_bytes.items()},
            }
    return {"prefill_gemm": out, "tokens": args.gemm_tokens, "rounds": args.rounds}


def _meta(args: argparse.Namespace) -> dict:
    return {
        "command": "python benchmarks/decode.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "llc_bytes": llc_bytes(),
        "cold_factor": args.cold_factor,
        "quiet_threshold": args.quiet,
        "platform": platform.platform(),
        "isa": cpu_isa_flags(),
        "kernel_isa": kernel_isa(),
        "extension": repr(kcpu.extension_status()),
        "cpu_profiles": {
            name: cpu_profile(getattr(torch, name)).to_dict() for name in args.dtypes.split(",")
        },
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated INxOUT")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--sparsity", default="0.3,0.5,0.7")
    p.add_argument("--backends", default="cpp,torch", help="sparse kernels to time (cpp, torch)")
    p.add_argument("--tokens", type=int, default=1, help="tokens per call in part (a)")
    p.add_argument("--crossover", action="store_true", help="sparse vs dense path by token count instead")
    p.add_argument("--token-counts", default="1,2,4,8,16,32", help="token counts for --crossover")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=15, help="quiet rounds wanted per configuration")
    p.add_argument("--reps", type=int, default=3, help="calls per candidate per round")
    p.add_argument("--max-seconds", type=float, default=30.0, help="time cap per configuration")
    p.add_argument("--quiet", type=float, default=0.05, help="max CPU share of other processes in a kept round")
    p.add_argument("--cold-factor", type=float, default=3.0, help="weights cycled per candidate, in LLC sizes")
    p.add_argument("--seed", type=int, default=0)
    e2e = p.add_argument_group("part (b): end-to-end decoding (--end-to-end)")
    e2e.add_argument("--end-to-end", action="store_true", help="run part (b) instead of part (a)")
    e2e.add_argument("--e2e-sparsity", type=float, default=0.5)
    e2e.add_argument("--e2e-variants", default="dense,mlp,all", help="dense first, then any of mlp, all, prepacked")
    e2e.add_argument("--e2e-dtype", default="bfloat16", help="the models' dtype (bfloat16, float32)")
    e2e.add_argument("--e2e-layers", type=int, default=0, help="decoder layers (0: TinyLlama's 22)")
    e2e.add_argument("--calib-prompts", type=int, default=4)
    e2e.add_argument("--calib-tokens", type=int, default=32)
    e2e.add_argument("--prompt-tokens", type=int, default=8)
    e2e.add_argument("--decode-steps", type=int, default=16, help="tokens decoded per model per round")
    e2e.add_argument("--e2e-rounds", type=int, default=5, help="quiet rounds wanted")
    e2e.add_argument("--e2e-max-seconds", type=float, default=300.0)
    e2e.add_argument("--prefill-tokens", type=int, default=512, help="prompt length of the prefill timing (0: skip)")
    e2e.add_argument("--prefill-rounds", type=int, default=3, help="quiet prefill rounds wanted")
    e2e.add_argument("--prefill-max-seconds", type=float, default=None, help="time cap of the prefill rounds (default: --e2e-max-seconds)")
    e2e.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    e2e.add_argument("--e2e-memory-child", choices=list(E2E_VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true", help="where a decode token's time goes (TinyLlama shapes)")
    p.add_argument("--gemm", action="store_true", help="part (d): multi-token GEMMs on W^T vs F.linear (--shapes, --dtypes)")
    p.add_argument("--gemm-tokens", type=int, default=128, help="tokens per call in --gemm")
    p.add_argument("--no-bandwidth", action="store_true", help="skip the read-bandwidth measurement")
    p.add_argument("--channel-threshold", action="store_true", help="part (a): also time a per-channel threshold (cpp)")
    add_out_argument(p, "decode")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.e2e_memory_child:
        print(json.dumps(e2e_memory_child(args)))
        return
    bandwidth = None
    if not args.no_bandwidth:
        bandwidth = read_bandwidth()
    if args.profile:
        body = {"decode_profile": decode_profile(args)}
    elif args.gemm:
        with torch.inference_mode():
            body = prefill_gemm_benchmark(args)
    elif args.end_to_end:
        body = {"end_to_end": end_to_end_benchmark(args)}
    else:
        with torch.inference_mode():
            body = crossover_benchmark(args) if args.crossover else gemv_benchmark(args)
    kcpu.set_backend(None)
    meta = _meta(args)
    meta["read_bandwidth"] = bandwidth
    if bandwidth is not None:  # measured again after the timings: the spread says how steady the machine was
        meta["read_bandwidth_after_gb_per_s"] = read_bandwidth()["gb_per_s"]
    emit({"meta": meta, **body}, args.out)


if __name__ == "__main__":
    main()
