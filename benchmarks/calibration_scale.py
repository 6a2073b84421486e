"""Calibration at scale: time and memory of lockstep, sequential and streaming calibration; prints one JSON object.

TinyLlama-1.1B shapes (22 blocks, hidden 2048, intermediate 5632, 32/4 heads, vocab 32000) with random bf16
weights, all 7 projections of every block at 50%, calibrated on N sequences of 512 random tokens. Every
(mode, N) runs in a fresh subprocess, which

1. builds the model and runs one dense forward over the calibration batches (the same-run baseline: its
   wall time, and the peak RSS ``VmHWM`` after it);
2. calibrates with the mode and reports its wall time divided by the dense forward's (``time_ratio``) and the
   increase of the peak RSS over the baseline (``peak_rss_increase_gb``). The untargeted ``lm_head`` (vocab
   32000) is most of a 2-block model's forward and 6% of the 22-block one's; ``time_ratio_without_lm_head``
   divides by the dense forward less the head's time (measured on one batch), which is what the 22-block
   ratio tends to.

Modes: ``lockstep`` (today's exact mode, every batch in flight), ``sequential`` (block by block,
:mod:`pl_actsparse.calibrate.sequential`), ``sequential-disk`` (the same, cache on disk), ``streaming``
(``max_batches_in_flight=1``). Per-layer error: the relative difference of each threshold to the exact one
(lockstep's at the same N; ``null`` when lockstep was not run) and the number of bit-identical thresholds.

Peak RSS includes what glibc keeps in its per-thread arenas after tensors are freed, which depends on how
many threads allocated; ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment makes large tensors come from
``mmap`` and go back on free, so the figure is closer to the live memory (both settings are worth reporting).

``cpu_time_ratio`` divides the process's CPU time (``time.process_time``) instead of wall time: with
``--threads 1`` on a machine shared with other jobs it is the figure that load does not move.
``--allocation auto`` calibrates with ``allocation="auto"`` (the scope's 0.5 is a byte budget; the
empirical-Fisher curves come block by block with ``sequential``, from one whole-model backward with
``lockstep``), so the ratio is allocation plus calibration.

``--rotate`` runs :func:`~pl_actsparse.tuning.rotation.rotate_activations` first, inside the timed call
(``rotation_time_ratio``: its share; the peak RSS then includes the CPU copy of the rewritten weights it holds).

``--stories260k`` adds the same cost on the real stories260K model (``allocation="auto"``, all seven
projections at a 0.5 budget, stories 500-599 in 256-token windows, batches of 8, as ``benchmarks/allocation.py``),
with each method, in dense forwards (median of 5 dense passes before and after), and the largest difference
between the levels the two methods allocate.

The full run (22 blocks, N = 8, 16, 32, 64) takes hours on a small CPU: sizes and modes are flags.

    python benchmarks/calibration_scale.py [--layers 22] [--n 8 16 32 64] [--modes lockstep sequential streaming]
        [--batch-size 4] [--seq 512] [--threads 2] [--device cpu] [--dtype bfloat16] [--allocation auto]
        [--stories260k]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _common import add_out_argument, emit

TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)
MODES = ("lockstep", "sequential", "sequential-disk", "streaming")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    from pl_actsparse import TargetScope, sparsify_activations
    from pl_actsparse.core.layer import sparsified_layers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    config = transformers.LlamaConfig(**TINYLLAMA, num_hidden_layers=args.layers, max_position_embeddings=max(2048, args.seq))
    with device:
        model = transformers.LlamaForCausalLM._from_config(config, torch_dtype=getattr(torch, args.dtype)).eval()
    g = torch.Generator().manual_seed(1)
    seqs = torch.randint(0, config.vocab_size, (args.n, args.seq), generator=g)
    batches = [{"input_ids": seqs[i : i + args.batch_size].to(device), "use_cache": args.use_cache} for i in range(0, args.n, args.batch_size)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        model(input_ids=batches[0]["input_ids"][:1, :8], use_cache=False)  # warm-up
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        for b in batches:
            model(**b)
        sync()
        dense, dense_cpu = time.perf_counter() - t0, time.process_time() - c0
        # the untargeted lm_head's share of the dense forward (one batch, times the number of batches): it is a
        # large share with few blocks (vocab 32000), a small one with 22
        h = torch.randn(*batches[0]["input_ids"].shape, config.hidden_size, dtype=getattr(torch, args.dtype), device=device)
        t0 = time.perf_counter()
        model.lm_head(model.model.norm(h))
        sync()
        head = (time.perf_counter() - t0) * len(batches)
        del h
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_dev = torch.cuda.max_memory_allocated()
    base = _hwm_bytes()
    mode = args.mode
    kwargs = {
        "lockstep": dict(method="lockstep"),
        "sequential": dict(method="sequential"),
        "sequential-disk": dict(method="sequential", offload="disk"),
        "streaming": dict(method="lockstep", max_batches_in_flight=1),
    }[mode]
    scope = {TargetScope(patterns=[r".*\.(q|k|v|o|gate|up|down)_proj"]): 0.5}
    t0, c0 = time.perf_counter(), time.process_time()
    if args.rotate:
        from pl_actsparse.tuning.rotation import rotate_activations

        rotate_activations(model, batches, calibration={"progress": False}, sparsity=args.rotate_sparsity)
        sync()
    rotation_s = time.perf_counter() - t0
    sparsify_activations(model, batches, scope, calibration={"progress": False, **kwargs}, allocation=args.allocation)
    sync()
    calib, calib_cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {
        "mode": mode,
        "rotated": args.rotate, "rotation_sparsity": args.rotate_sparsity,
        "rotation_time_ratio": round(rotation_s / dense, 3),
        "n": args.n,
        "allocation": args.allocation,
        "dense_forward_s": round(dense, 2),
        "calibration_s": round(calib, 2),
        "time_ratio": round(calib / dense, 3),
        "cpu_time_ratio": round(calib_cpu / dense_cpu, 3),
        "dense_lm_head_s": round(head, 2),
        "time_ratio_without_lm_head": round(calib / max(dense - head, 1e-9), 3),
        "peak_rss_after_dense_gb": round(base / 1e9, 3),
        "peak_rss_after_calibration_gb": round(_hwm_bytes() / 1e9, 3),
        "peak_rss_increase_gb": round((_hwm_bytes() - base) / 1e9, 3),
        "boundary_cache_gb": round(args.n * args.seq * config.hidden_size * torch.finfo(getattr(torch, args.dtype)).bits / 8 / 1e9, 3),
    }
    if device.type == "cuda":
        out["peak_device_memory_increase_gb"] = round((torch.cuda.max_memory_allocated() - base_dev) / 1e9, 3)
    torch.save({n: m.activation_threshold.float().cpu() for n, m in sparsified_layers(model)}, args.worker_out)
    return out


def stories260k(threads: int) -> dict:
    """allocation="auto" + calibration on stories260K with each method, in dense forwards over the same data."""
    import statistics

    import torch

    from pl_actsparse import TargetScope, sparsify_activations
    from pl_actsparse.core.layer import sparsified_layers, sparsifier_state
    from pl_actsparse.demos.llama2c import Llama2cTokenizer, load_llama2c_checkpoint
    from pl_actsparse.demos.tinystories import TokenWindows, load_stories

    torch.set_num_threads(threads)
    windows = TokenWindows(load_stories(start=500, stop=600), Llama2cTokenizer.from_file(), seq_len=256)
    xs = [windows[i] for i in range(len(windows))]
    calib = [torch.stack(xs[i : i + 8]) for i in range(0, len(xs), 8)]
    base = load_llama2c_checkpoint().eval()

    def dense_pass() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            for x in calib:
                base(x)
        return time.perf_counter() - t0, time.process_time() - c0

    dense_pass()
    recipe = {TargetScope(patterns=[r"layers\.\d+\.(self_attn|mlp)\.\w+_proj"]): 0.5}
    out, levels = {"windows": len(xs), "batches": len(calib)}, {}
    for method in ("lockstep", "sequential"):
        model = load_llama2c_checkpoint()
        dense = [dense_pass() for _ in range(5)]
        t0, c0 = time.perf_counter(), time.process_time()
        sparsify_activations(model, calib, recipe, calibration={"progress": False, "method": method}, allocation="auto")
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        dense += [dense_pass() for _ in range(5)]
        wall, dense_cpu = statistics.median(d[0] for d in dense), statistics.median(d[1] for d in dense)
        levels[method] = {n: sparsifier_state(m).target for n, m in sparsified_layers(model)}
        out[method] = {"seconds": round(seconds, 2), "dense_forward_s": round(wall, 4),
                       "cost_in_dense_forwards": round(seconds / wall, 1), "cpu_cost_in_dense_forwards": round(cpu / dense_cpu, 1)}
    out["levels_max_abs_difference"] = max(abs(levels["lockstep"][n] - v) for n, v in levels["sequential"].items())
    return out


def _errors(exact: dict, got: dict) -> dict:
    import torch

    rel = []
    same = 0
    for n, t in exact.items():
        same += int(torch.equal(t, got[n]))
        rel.append(float((got[n] - t).abs() / t.abs().clamp_min(1e-30)))
    return {"threshold_rel_error_max": max(rel), "threshold_rel_error_mean": sum(rel) / len(rel),
            "identical_thresholds": same, "layers": len(exact)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--n", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--modes", nargs="+", default=["lockstep", "sequential", "streaming"], choices=MODES)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per calibration batch")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--use-cache", action="store_true", help="let HF build its DynamicCache, as generate-ready calls do")
    p.add_argument("--allocation", default="uniform", choices=["uniform", "auto"], help="allocation= of sparsify_activations")
    p.add_argument("--rotate", action="store_true", help="rotate_activations first (inside the timed call: rotation + allocation + calibration)")
    p.add_argument("--rotate-sparsity", type=float, default=None, help="with --rotate: rotate_activations(sparsity=...) (the axes turned for it)")
    p.add_argument("--stories260k", action="store_true", help="also allocation + calibration cost on stories260K")
    p.add_argument("--timeout", type=int, default=7200, help="seconds per subprocess")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    add_out_argument(p, "calibration_scale")
    args = p.parse_args()
    if args.worker:
        args.n = args.n[0]
        print(json.dumps(worker(args)))
        return

    import torch

    runs, tmp = [], tempfile.mkdtemp(prefix="calibration-scale-")
    for n in args.n:
        paths = {}
        order = sorted(args.modes, key=lambda m: m != "lockstep")  # the exact reference first
        for mode in order:
            path = os.path.join(tmp, f"{mode}-{n}.pt")
            cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--n", str(n), "--worker-out", path,
                   "--layers", str(args.layers), "--batch-size", str(args.batch_size), "--seq", str(args.seq),
                   "--threads", str(args.threads), "--device", args.device, "--dtype", args.dtype,
                   "--allocation", args.allocation] + (["--use-cache"] if args.use_cache else []) + (["--rotate"] if args.rotate else []) + (["--rotate-sparsity", str(args.rotate_sparsity)] if args.rotate_sparsity else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            if proc.returncode != 0:
                runs.append({"mode": mode, "n": n, "error": proc.stderr[-2000:]})
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            paths[mode] = path
            if "lockstep" in paths:
                row.update(_errors(torch.load(paths["lockstep"]), torch.load(path)))
            else:
                row.update({"threshold_rel_error_max": None, "threshold_rel_error_mean": None})
            runs.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    emit({
        "benchmark": "calibration_scale",
        "model": {**TINYLLAMA, "num_hidden_layers": args.layers, "dtype": args.dtype, "weights": "random"},
        "targets": "q/k/v/o/gate/up/down_proj at 0.5",
        "seq_len": args.seq,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "use_cache": args.use_cache,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "device": args.device,
        "cpu_flags": sorted(f for f in _cpu_flags() if f.startswith(("avx", "amx"))),
        "load_average_at_end": os.getloadavg(),
        "runs": runs,
        **({"stories260k": stories260k(args.threads)} if args.stories260k else {}),
    }, args.out)


def _cpu_flags() -> set:
    with open("/proc/cpuinfo") as f:
        return next((set(line.split(":")[1].split()) for line in f if line.startswith("flags")), set())


if __name__ == "__main__":
    main()
