"""Calibration benchmark on the real stories260K model; prints one JSON object.

Seed recipe (up/gate 30%, down 50%), calibration on stories 500-599 in 256-token windows, batches of 1 and
of 8 windows; evaluation on the 194 windows of stories 0-149. For each method and batch size: per-layer
achieved sparsity on calibration and held-out text, sparse perplexity, and calibration wall time divided
by one dense forward pass over the same batches (median of repeats, measured in the same process).
NNCF's ``sparsify_activations`` runs side by side when ``nncf`` is importable.

Padded rows (``padded``): the 32 real stories 500-531 (up to 512 tokens each) in batches of 8, padded
HF-style to the longest of each batch (about 20% padding) on the right or on the left, with an
``attention_mask``. Per-layer error is |achieved - target| on the *real* tokens; with the default
``token_mask="auto"`` it must be 0.0000 like unpadded calibration. The ``token_mask=None`` rows show what
counting the pad positions costs.

    python benchmarks/calibration.py [--repeats 3] [--no-nncf] [--padded-only] [--out benchmarks/results/calibration.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
import warnings

import torch

from pl_actsparse import sparsify_activations
from pl_actsparse.demos import SEED_RECIPE, calibration_batches
from pl_actsparse.demos.tinystories import TokenWindows, load_stories
from pl_actsparse.tuning.objectives import perplexity
from pl_actsparse.demos.llama2c import Llama2cTokenizer, load_llama2c_checkpoint
from pl_actsparse.measure.metric import SparsityCounter

from _common import add_out_argument, emit

TARGETS = {"up_proj": 0.3, "gate_proj": 0.3, "down_proj": 0.5}


def target_of(name: str) -> float:
    return next(v for k, v in TARGETS.items() if k in name)


def dense_forward_seconds(model, batches, repeats: int) -> float:
    times = []
    with torch.no_grad():
        for b in batches[:2]:
            model(b)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            for b in batches:
                model(b)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def errors(achieved: dict[str, float]) -> dict[str, float]:
    errs = [abs(v - target_of(n)) for n, v in achieved.items()]
    return {"max": max(errs), "mean": sum(errs) / len(errs)}


def measure_ours(model, calib, evaluation, repeats, max_batches_in_flight=None):
    times, sparse = [], None
    for _ in range(repeats):
        candidate = copy.deepcopy(model)
        t0 = time.perf_counter()
        sparsify_activations(candidate, calib, SEED_RECIPE,
                             calibration={"progress": False, "max_batches_in_flight": max_batches_in_flight})
        times.append(time.perf_counter() - t0)
        sparse = candidate
    with SparsityCounter(sparse) as on_calib, torch.no_grad():
        for b in calib:
            sparse(b)
    with SparsityCounter(sparse) as on_eval:
        ppl = perplexity(sparse, evaluation, batch_size=16)
    return statistics.median(times), on_calib.sparsity(), on_eval.sparsity(), ppl


def _count_hooks(model, sparsifiers):
    counts = {}

    def hook(module, args):
        x = args[0]
        z, n = counts.get(module, (0, 0))
        counts[module] = (z + int((x.abs() <= module.running_threshold).sum()), n + x.numel())

    return counts, [s.register_forward_pre_hook(hook) for s in sparsifiers]


def measure_nncf(model, calib, evaluation, repeats):
    import nncf
    from nncf.experimental.torch.sparsify_activations import TargetScope as NncfScope
    from nncf.experimental.torch.sparsify_activations import sparsify_activations as nncf_sparsify
    from nncf.experimental.torch.sparsify_activations.torch_backend import ActivationsSparsifier

    scopes = {
        NncfScope(patterns=[".*up_proj.*", ".*gate_proj.*"]): 0.3,
        NncfScope(patterns=[".*down_proj.*"]): 0.5,
    }
    times, sparse = [], None
    for _ in range(repeats):
        candidate = copy.deepcopy(model)
        t0 = time.perf_counter()
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):  # keep stdout pure JSON
            warnings.simplefilter("ignore")
            sparse_model = nncf_sparsify(candidate, nncf.Dataset(calib), scopes)
        times.append(time.perf_counter() - t0)
        sparse = sparse_model
    named = [(n, m) for n, m in sparse.named_modules() if isinstance(m, ActivationsSparsifier)]

    def achieved(data, ppl=False):
        counts, handles = _count_hooks(sparse, [m for _, m in named])
        result = None
        with torch.no_grad():
            if ppl:
                result = perplexity(sparse, data, batch_size=16)
            else:
                for b in data:
                    sparse(b)
        for h in handles:
            h.remove()
        # NNCF names sparsifiers after op-graph nodes; keep a readable name containing the projection
        out = {n: counts[m][0] / counts[m][1] for n, m in named if m in counts}
        return out, result

    on_calib, _ = achieved(calib)
    on_eval, ppl = achieved(evaluation, ppl=True)
    return statistics.median(times), on_calib, on_eval, ppl


def padded_batches(stories: list[torch.Tensor], side: str, batch_size: int = 8) -> list[dict]:
    """HF-style batches: ids padded with 0 to the longest of each batch, ``attention_mask`` 1 on real tokens."""
    out = []
    for i in range(0, len(stories), batch_size):
        seqs = stories[i : i + batch_size]
        T = max(len(x) for x in seqs)
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        mask = torch.zeros(len(seqs), T, dtype=torch.long)
        for j, x in enumerate(seqs):
            sl = slice(0, len(x)) if side == "right" else slice(T - len(x), T)
            ids[j, sl], mask[j, sl] = x, 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def real_token_sparsity(model, batches: list[dict]) -> dict[str, float]:
    """Per sparsified layer, the fraction of its inputs at real tokens with |x| <= threshold."""
    from pl_actsparse.core.layer import sparsified_layers

    counts: dict[str, list[int]] = {}
    current: dict = {}

    def hook(name):
        def fn(module, args):
            x = args[0].detach()[current["mask"]]
            c = counts.setdefault(name, [0, 0])
            c[0] += int((x.abs() <= module.activation_threshold).sum())
            c[1] += x.numel()

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in sparsified_layers(model)]
    with torch.no_grad():
        for b in batches:
            current["mask"] = b["attention_mask"].bool()
            model(b["input_ids"])
    for h in handles:
        h.remove()
    return {n: z / t for n, (z, t) in counts.items()}


def measure_padded(model, tok, repeats: int) -> list[dict]:
    """Right/left padded batches of the shipped stories: error on real tokens with and without the token mask."""
    stories = [torch.tensor(tok.encode(s)[: model.config.seq_len]) for s in load_stories(start=500, stop=532)]
    rows = []
    unpadded = [x[None] for x in stories]
    for side in ("none", "right", "left"):
        batches = padded_batches(stories, side) if side != "none" else None
        for token_mask in (("auto", None) if batches else ("auto",)):
            times, sparse = [], None
            for _ in range(repeats):
                candidate = copy.deepcopy(model)
                t0 = time.perf_counter()
                if batches is None:
                    sparsify_activations(candidate, unpadded, SEED_RECIPE, calibration={"progress": False})
                else:
                    sparsify_activations(
                        candidate, batches, SEED_RECIPE,
                        calibration={"progress": False, "transform_fn": lambda b: b["input_ids"], "token_mask": token_mask},
                    )
                times.append(time.perf_counter() - t0)
                sparse = candidate
            if batches is None:
                achieved = real_token_sparsity(
                    sparse, [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in unpadded]
                )
                padding = 0.0
            else:
                achieved = real_token_sparsity(sparse, batches)
                padding = 1 - sum(int(b["attention_mask"].sum()) for b in batches) / sum(b["attention_mask"].numel() for b in batches)
            rows.append(
                {
                    "method": "pl_actsparse_padded",
                    "padding": side,
                    "token_mask": token_mask,
                    "stories": [500, 532],
                    "batch_size": 8 if batches else 1,
                    "padding_fraction": round(padding, 4),
                    "real_token_error": {k: round(v, 5) for k, v in errors(achieved).items()},
                    "calibration_seconds": round(statistics.median(times), 4),
                    "per_layer_error": {n: round(abs(v - target_of(n)), 5) for n, v in achieved.items()},
                }
            )
            print(f"# padded {side} token_mask={token_mask}: {rows[-1]['real_token_error']}", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-nncf", action="store_true")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--padded-only", action="store_true", help="only the padded-batch rows")
    parser.add_argument("--calibration-stories", type=int, nargs=2, default=[500, 600], metavar=("START", "STOP"))
    parser.add_argument("--eval-stories", type=int, nargs=2, default=[0, 150], metavar=("START", "STOP"))
    add_out_argument(parser, "calibration")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = load_llama2c_checkpoint()
    tok = Llama2cTokenizer.from_file()
    padded_rows = measure_padded(model, tok, args.repeats)
    padded_checks = {
        "padded_real_token_error_is_0": all(
            r["real_token_error"]["max"] < 5e-5 for r in padded_rows if r["token_mask"] == "auto"
        )
    }
    if args.padded_only:
        emit({"benchmark": "calibration", "model": "stories260K", "recipe": TARGETS, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "padded": padded_rows, "targets_met": padded_checks}, args.out)
        return
    (c0, c1), (e0, e1) = args.calibration_stories, args.eval_stories
    evaluation = TokenWindows(load_stories(start=e0, stop=e1), tok, seq_len=256)
    dense_ppl = perplexity(model, evaluation, batch_size=16)

    methods = {
        "pl_actsparse": measure_ours,
        # bounded memory: one batch in flight at a time, histograms accumulated (approximately exact)
        "pl_actsparse_streaming": lambda *a: measure_ours(*a, max_batches_in_flight=1),
    }
    nncf_status = "skipped (--no-nncf)"
    if not args.no_nncf:
        try:
            import nncf  # noqa: F401

            methods["nncf"] = measure_nncf
            nncf_status = f"nncf {nncf.__version__}"
        except ImportError:
            nncf_status = "not installed (pip install nncf)"

    runs = []
    for batch_size in args.batch_sizes:
        calib = calibration_batches(c0, c1, seq_len=256, batch_size=batch_size, tokenizer=tok)
        dense_s = dense_forward_seconds(model, calib, args.repeats)
        for name, fn in methods.items():
            seconds, on_calib, on_eval, ppl = fn(model, calib, evaluation, args.repeats if name.startswith("pl_actsparse") else max(1, args.repeats - 1))
            runs.append(
                {
                    "method": name,
                    "batch_size": batch_size,
                    "calibration_batches": len(calib),
                    "sparse_perplexity": round(ppl, 4),
                    "calibration_error": {k: round(v, 5) for k, v in errors(on_calib).items()},
                    "heldout_error": {k: round(v, 5) for k, v in errors(on_eval).items()},
                    "calibration_seconds": round(seconds, 4),
                    "dense_forward_seconds": round(dense_s, 4),
                    "time_ratio": round(seconds / dense_s, 3),
                    "per_layer": {
                        n: {"target": target_of(n), "calibration": round(on_calib[n], 5), "heldout": round(on_eval[n], 5)}
                        for n in on_calib
                    },
                }
            )
            print(f"# {name} batch={batch_size}: {runs[-1]['calibration_error']} ratio {runs[-1]['time_ratio']}", file=sys.stderr)

    ours = [r for r in runs if r["method"] == "pl_actsparse"]
    nncf_runs = {r["batch_size"]: r for r in runs if r["method"] == "nncf"}
    checks = {
        "calibration_error_le_0.002": all(r["calibration_error"]["max"] <= 0.002 for r in ours),
        "heldout_error_le_0.015": all(r["heldout_error"]["max"] <= 0.015 for r in ours),
        "time_ratio_le_2.5": all(r["time_ratio"] <= 2.5 for r in ours),
        "perplexity_no_worse_than_nncf": all(
            r["sparse_perplexity"] <= nncf_runs[r["batch_size"]]["sparse_perplexity"] for r in ours if r["batch_size"] in nncf_runs
        )
        if nncf_runs
        else None,
    }
    emit(
            {
                "benchmark": "calibration",
                "model": "stories260K",
                "recipe": TARGETS,
                "calibration_data": {"stories": [c0, c1], "windows": sum(len(b) for b in calib), "seq_len": 256},
                "evaluation_data": {"stories": [e0, e1], "windows": len(evaluation), "seq_len": 256},
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "nncf": nncf_status,
                "dense_perplexity": round(dense_ppl, 4),
                "runs": runs,
                "padded": padded_rows,
                "targets_met": {**checks, **padded_checks},
            },
            args.out,
    )


if __name__ == "__main__":
    main()
