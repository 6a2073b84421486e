"""Weight-only INT8 + activation sparsity: accuracy and CPU decode speed. Prints ONE JSON object on stdout.

    python benchmarks/int8.py                       # all three parts (about 6-9 minutes on 2 busy cores)
    python benchmarks/int8.py --parts gemv,decode   # skip the perplexity part

(a) ``ppl``: stories260K perplexity on the 194 windows of stories 0-149 (calibration: stories 500-599,
    256-token windows, batches of 8): dense, sparse (seed recipe: up/gate 30%, down 50%), int8 (ours; and
    NNCF's ``compress_weights`` INT8_ASYM when nncf is installed), int8 + sparse (compress, then sparsify).
(b) ``gemv``: one token through Llama-7B MLP shapes with cold weights (each candidate cycles through enough
    copies to exceed the last-level cache): int8 + 50% sparse against bf16 dense ``F.linear``, int8 dense
    (the same kernel with no threshold) and bf16 50% sparse (``pl_actsparse.kernels.cpu.sparse_linear``).
(c) ``decode``: tokens/s of KV-cache decoding on the TinyLlama-1.1B-shaped random bf16 model: int8 (all
    Linear layers) + 50% activation sparsity on all 7 projections per block, exported with
    ``export_for_inference``, against the bf16 dense model.

Timing method: candidates run interleaved in shuffled order within each round; speedups are medians over
rounds of per-round ratios (slow drifts of a shared machine cancel). Each part runs at every thread count of
``--threads``: on a machine shared with other jobs, 2 threads per call suffer scheduling stalls that a single
thread does not, so both are reported.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import platform
import random
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from pl_actsparse import TargetScope, activation_sparsity_report, sparsify_activations
from pl_actsparse.kernels import cpu as kcpu
from pl_actsparse.kernels import int8_cpu as k8
from pl_actsparse.kernels.dispatch import cpu_isa_flags
from pl_actsparse.core.int8 import quantize_weights_int8
from pl_actsparse.export.convert import export_for_inference
from pl_actsparse.demos import SEED_RECIPE, calibration_batches

from _common import add_out_argument, emit, llc_bytes

def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def interleaved(fns: dict[str, Callable[[int], object]], rounds: int, reps: int, seed: int = 0) -> dict[str, list[float]]:
    """Per-round seconds per call of each candidate, candidates shuffled within every round."""
    rng = random.Random(seed)
    times: dict[str, list[float]] = {k: [] for k in fns}
    c = 0
    for f in fns.values():  # warm-up
        f(c)
        c += 1
    for _ in range(rounds):
        order = list(fns)
        rng.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            for _ in range(reps):
                fns[k](c)
                c += 1
            times[k].append((time.perf_counter() - t0) / reps)
    return times


def ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of time(num) / time(den): the speedup of ``den`` over ``num``."""
    return round(statistics.median(a / b for a, b in zip(times[num], times[den])), 3)


# ----------------------------------------------------------------------------------------------- (a)


def ppl_part(args) -> dict:
    from pl_actsparse.demos.tinystories import TokenWindows, load_stories
    from pl_actsparse.tuning.objectives import perplexity
    from pl_actsparse.demos.llama2c import Llama2cTokenizer, load_llama2c_checkpoint

    tok = Llama2cTokenizer.from_file()
    ev = TokenWindows(load_stories(start=args.eval_stories[0], stop=args.eval_stories[1]), tok, seq_len=256)
    batches = calibration_batches(args.calibration_stories[0], args.calibration_stories[1], seq_len=256, batch_size=8, tokenizer=tok)
    base = load_llama2c_checkpoint()
    out: dict = {"eval_windows": len(ev), "calibration_batches": len(batches)}

    def run(label: str, model) -> float:
        t = time.perf_counter()
        p = perplexity(model, ev)
        log(f"[ppl] {label}: {p:.4f} ({time.perf_counter() - t:.0f} s)")
        return round(p, 4)

    out["dense"] = run("dense", base)
    m = sparsify_activations(copy.deepcopy(base), batches, SEED_RECIPE, calibration={"progress": False})
    out["sparse"] = run("sparse", m)
    for mode in args.modes.split(","):
        for gran in args.granularities.split(","):
            key = f"int8_{mode}" + ("" if gran == "output" else f"_{gran}")  # per-output-channel: int8_<mode>
            m = copy.deepcopy(base)
            rep = quantize_weights_int8(m, mode=mode, granularity=gran)
            out[key] = run(f"int8 {mode}/{gran}", m)
            out[f"{key}_max_rel_weight_error"] = round(rep.max_relative_error, 5)
            sparsify_activations(m, batches, SEED_RECIPE, calibration={"progress": False})
            out[f"{key}_sparse"] = run(f"int8 {mode}/{gran} + sparse", m)
    try:
        import nncf
    except ImportError:
        out["nncf"] = "not installed"
    else:
        import logging

        # NNCF logs its bit-width table through a handler bound to the original stdout
        logging.getLogger("nncf").setLevel(logging.WARNING)
        for mode in args.nncf_modes.split(","):
            with contextlib.redirect_stdout(sys.stderr):
                m = nncf.compress_weights(
                    copy.deepcopy(base), mode=getattr(nncf.CompressWeightsMode, mode), dataset=nncf.Dataset(batches)
                )
            key = f"nncf_{mode.lower()}"
            out[key] = run(key, m)
            with contextlib.redirect_stdout(sys.stderr):
                sparsify_activations(m, batches, SEED_RECIPE, calibration={"progress": False})
            out[key + "_sparse"] = run(key + " + sparse", m)
    first = next(k for k in out if k.startswith("int8_") and k.endswith("_sparse"))  # the first mode/granularity
    out["int8_sparse_vs_sparse_pct"] = round(100 * (out[first] / out["sparse"] - 1), 3)
    return out


# ----------------------------------------------------------------------------------------------- (b)


def gemv_part(args) -> dict:
    llc = llc_bytes()
    res: dict = {"llc_bytes": llc, "sparsity": 0.5, "shapes": {}}
    gen = torch.Generator().manual_seed(0)
    for shape in args.shapes.split(","):
        in_f, out_f = map(int, shape.split("x"))

        def copies(nbytes: int) -> int:
            return max(2, math.ceil(3 * llc / nbytes))

        w = torch.randn(out_f, in_f, generator=gen) * in_f**-0.5
        nb = copies(out_f * in_f * 2)
        wb = [(w + 1e-3 * i).to(torch.bfloat16) for i in range(nb)]
        wtb = [kcpu.to_kernel_layout(x) for x in wb]
        q = k8.quantize_weight_t(w)
        nq = copies(out_f * in_f // 2)  # bytes read at 50% sparsity
        qs = [(q[0].clone(), q[1].clone(), q[2].clone()) for _ in range(nq)]
        del w
        xs = torch.randn(16, 1, in_f, generator=gen)
        thr = torch.tensor(float(xs.abs().flatten().quantile(0.5)))
        xb = xs.to(torch.bfloat16)
        ninf = torch.tensor(-math.inf)
        fns = {
            "bf16_dense": lambda i: F.linear(xb[i % 16], wb[i % nb]),
            "bf16_sparse": lambda i: kcpu.sparse_linear(xb[i % 16], thr, wtb[i % nb]),
            "int8_dense": lambda i: k8.int8_sparse_linear(xb[i % 16], ninf, *qs[i % nq]),
            "int8_sparse": lambda i: k8.int8_sparse_linear(xb[i % 16], thr, *qs[i % nq]),
        }
        ref = F.linear(xb[0].float().masked_fill(xb[0].abs() <= thr.to(torch.bfloat16), 0), k8.dequantize_weight_t(*q).t())
        got = fns["int8_sparse"](0).float()
        rel_err = float((got - ref).norm() / ref.norm())
        entry: dict = {"rel_err_vs_dequant_masked_dense": round(rel_err, 5), "threads": {}}
        for nt in args.thread_list:
            torch.set_num_threads(nt)
            t = interleaved(fns, rounds=args.gemv_rounds, reps=4)
            entry["threads"][str(nt)] = {
                "ms": {k: round(statistics.median(v) * 1e3, 3) for k, v in t.items()},
                "int8_sparse_vs_bf16_dense": ratio(t, "bf16_dense", "int8_sparse"),
                "int8_sparse_vs_int8_dense": ratio(t, "int8_dense", "int8_sparse"),
                "int8_sparse_vs_bf16_sparse": ratio(t, "bf16_sparse", "int8_sparse"),
                "int8_dense_vs_bf16_dense": ratio(t, "bf16_dense", "int8_dense"),
                "bf16_sparse_vs_bf16_dense": ratio(t, "bf16_dense", "bf16_sparse"),
            }
            log(f"[gemv] {shape} threads={nt}: {entry['threads'][str(nt)]}")
        torch.set_num_threads(args.default_threads)
        res["shapes"][shape] = entry
        del wb, wtb, qs
    return res


# ----------------------------------------------------------------------------------------------- (c)


def decode_part(args) -> dict:
    from pl_actsparse.demos.llama2c import Llama2cConfig, Llama2cModel

    cfg = Llama2cConfig.tinyllama_1b()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.no_grad():
        dense = Llama2cModel(cfg, dtype=torch.bfloat16).eval()
    log(f"[decode] built the bf16 model in {time.perf_counter() - t0:.0f} s")
    sparse = copy.deepcopy(dense)
    t0 = time.perf_counter()
    rep = quantize_weights_int8(sparse)  # every Linear, lm_head included
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, cfg.vocab_size, (1, args.calib_tokens), generator=gen)]
    with torch.no_grad():
        sparsify_activations(sparse, calib, {TargetScope(patterns=[r".*_proj"]): 0.5}, calibration={"progress": False})
    srep = activation_sparsity_report(sparse)
    export_for_inference(sparse)
    log(f"[decode] quantized, calibrated and exported in {time.perf_counter() - t0:.0f} s")

    prompt = torch.randint(0, cfg.vocab_size, (1, 8), generator=gen)
    steps = args.decode_steps

    # achieved sparsity while decoding (the thresholds were calibrated on random tokens)
    zeros = [0, 0]

    def hook(mod, inp):
        x = inp[0]
        if x.shape[-2] == 1 and math.isfinite(float(mod.activation_threshold)):
            zeros[0] += int((x.abs() <= mod.activation_threshold).sum())
            zeros[1] += x.numel()

    from pl_actsparse.export.int8_linear import Int8SparseInferenceLinear

    hs = [m.register_forward_pre_hook(hook) for m in sparse.modules() if isinstance(m, Int8SparseInferenceLinear)]
    with torch.no_grad():
        dense_tokens = dense.generate(prompt, 6)
        sparse_tokens = sparse.generate(prompt, 6)
    for h in hs:
        h.remove()

    def decoder(model):
        # prefill once, outside the timed calls; the cache holds every step of every round
        cache = model.new_cache(1, max_len=8 + (args.decode_rounds + 1) * steps + 1)
        with torch.no_grad():
            logits = model(prompt, cache=cache, start_pos=0)
        state = {"pos": 8, "tok": logits[:, -1].argmax(-1, keepdim=True)}

        def step(i: int):
            with torch.no_grad():
                logits = model(state["tok"], cache=cache, start_pos=state["pos"])
            state["tok"] = logits[:, -1].argmax(-1, keepdim=True)
            state["pos"] += 1

        return step

    out: dict = {
        "model": "TinyLlama-1.1B shapes, random bf16 weights",
        "int8_layers": len(rep.layers),
        "weight_bytes_bf16": rep.float_bytes,
        "weight_bytes_int8": rep.int8_bytes,
        "calibration_sparsity": None if srep.mean_sparsity is None else round(srep.mean_sparsity, 4),
        "decode_sparsity": round(zeros[0] / max(1, zeros[1]), 4),
        "first_tokens_agree": int((dense_tokens == sparse_tokens).sum()) - prompt.shape[1],
        "threads": {},
    }
    for nt in args.thread_list:
        torch.set_num_threads(nt)
        fns = {"bf16_dense": decoder(dense), "int8_sparse": decoder(sparse)}
        t = interleaved(fns, rounds=args.decode_rounds, reps=steps)  # warm-up step + rounds * steps
        out["threads"][str(nt)] = {
            "tokens_per_s": {k: round(1 / statistics.median(v), 3) for k, v in t.items()},
            "int8_sparse_vs_bf16_dense": ratio(t, "bf16_dense", "int8_sparse"),
        }
        log(f"[decode] threads={nt}: {out['threads'][str(nt)]}")
    torch.set_num_threads(args.default_threads)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="ppl,gemv,decode")
    p.add_argument("--modes", default="asym", help="our int8 modes for the perplexity part")
    p.add_argument("--granularities", default="output", help="scale granularities for the perplexity part (output,input)")
    p.add_argument("--calibration-stories", type=int, nargs=2, default=[500, 600], metavar=("START", "STOP"))
    p.add_argument("--eval-stories", type=int, nargs=2, default=[0, 150], metavar=("START", "STOP"))
    add_out_argument(p, "int8")
    p.add_argument("--nncf-modes", default="INT8_ASYM", help="NNCF modes for the perplexity part (if installed)")
    p.add_argument("--shapes", default="4096x11008,11008x4096")
    p.add_argument("--threads", default=None, help="comma-separated thread counts (default: 1 and torch's default)")
    p.add_argument("--gemv-rounds", type=int, default=12)
    p.add_argument("--decode-rounds", type=int, default=4)
    p.add_argument("--decode-steps", type=int, default=6, help="decode steps per candidate per round")
    p.add_argument("--calib-tokens", type=int, default=64)
    args = p.parse_args(argv)
    args.default_threads = torch.get_num_threads()
    args.thread_list = (
        [int(x) for x in args.threads.split(",")] if args.threads else sorted({1, args.default_threads})
    )
    backend = k8.resolve_int8_backend(build=True)
    result: dict = {
        "benchmark": "int8",
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa": cpu_isa_flags(),
        "default_threads": args.default_threads,
        "int8_backend": backend,
        "float_backend": kcpu.resolve_backend(build=True),
    }
    t0 = time.perf_counter()
    parts = args.parts.split(",")
    if "ppl" in parts:
        result["ppl"] = ppl_part(args)
    if "gemv" in parts:
        result["gemv"] = gemv_part(args)
    if "decode" in parts:
        result["decode"] = decode_part(args)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    emit(result, args.out, indent=None)


if __name__ == "__main__":
    main()
