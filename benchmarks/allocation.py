"""Model-wide allocation on the real stories260K model; prints one JSON object (and writes it with --out).

Budget = fraction of the targeted layers' weight bytes skipped per token. For each scope (all seven projections
q/k/v/o/gate/up/down, and the MLP only) and budget, perplexity on stories 0-149 (evaluation) and 600-749
(held out), and the byte-weighted achieved sparsity measured on the evaluation tokens, for:

* ``uniform``: every layer at the budget (exact calibration);
* ``weight_aware_uniform``: the score ``|x_i| * ||W[:, i]||`` (WINA) at the budget
  (:func:`pl_actsparse.tuning.weight_aware.sparsify_activations_weight_aware`);
* ``teal_greedy``: the named baseline, TEAL's block-wise greedy (Liu et al., ICLR 2025) as the paper describes
  it, implemented here: inside each block, from level 0, repeatedly raise the level of the unit (q/k/v share an
  input, gate/up share one) whose step (the same number of weight bytes for every unit) adds the least mean
  squared error at the block's output, with block inputs from the dense model, until the block meets the
  budget; then exact thresholds for the chosen levels (the error is measured on a quarter of the calibration
  batches, one greedy path per block serves every budget; see :func:`teal_greedy`);
* ``fisher_only``: ``allocation="fisher"``, the empirical-Fisher curves' convex optimum without the search (ablation);
* ``ours``: ``sparsify_activations(..., allocation="auto")`` (:mod:`pl_actsparse.calibrate.allocation`): that
  optimum searched over a few reweightings of the curves, scored by the real next-token loss;
* ``ours_fisher_score``: the same allocation on the score ``|x_i| * E[g_i^2] ** (1/4)`` instead of ``|x_i|``
  (``sparsify_activations_weight_aware(..., score="fisher", allocation="auto")``, per-channel thresholds);
* ``ours_rotated`` / ``ours_rotated_fisher_score``: the same two after
  :func:`~pl_actsparse.tuning.rotation.rotate_activations` (the residual stream and each value head in their
  principal axes over the calibration data; the dense model's function unchanged);
* ``ours_rotated_sparse``: ``rotate_activations(..., sparsity=budget)`` (the axes then turned to minimise what
  zeroing that fraction of each token's inputs removes, :func:`~pl_actsparse.tuning.rotation.sparsest_rotation`) + ``auto``.

Rotated rows fall short of the budget on the evaluation tokens by a few thousandths (calibration is exact on the
calibration tokens; the rotated channels move more between texts), so for every ``ours*`` row whose achieved
sparsity is more than 0.002 from the budget, the benchmark also calibrates at ``budget + (budget - achieved)`` and
interpolates the perplexities linearly to an achieved sparsity equal to the budget (``*_at_budget``): the
comparison at equal achieved sparsity the issue asks for. The ``*_vs_*`` ratios use those where present.

Cost: ``ours`` and ``ours_fisher_score`` (allocation and exact calibration) in dense forward passes over the calibration data, timed in
the same process. Calibration: stories 500-599, 256-token windows, batches of 8.

    python benchmarks/allocation.py [--budgets 0.3 0.4 0.5 0.6] [--scopes mlp all] [--out benchmarks/results/allocation.json]
    python benchmarks/allocation.py --rows ours_rotated_sparse --merge --out benchmarks/results/allocation.json  # one row, the rest kept

Progress goes to stderr; stdout is the JSON object only. ``--out`` is rewritten after every row (``"complete":
false`` until the last one), so a run cut short keeps its finished rows. Each row also gives ``ours`` relative
to ``teal_greedy`` and to ``uniform`` on the evaluation and the held-out stories (negative: ours is lower).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from pl_actsparse import TargetScope, sparsify_activations
from pl_actsparse.core.layer import sparsifier_state, weight_nbytes
from pl_actsparse.demos.llama2c import Llama2cTokenizer, load_llama2c_checkpoint
from pl_actsparse.demos.tinystories import TokenWindows, load_stories
from pl_actsparse.measure.metric import SparsityCounter
from pl_actsparse.tuning.objectives import perplexity
from pl_actsparse.tuning.rotation import rotate_activations
from pl_actsparse.tuning.weight_aware import sparsify_activations_weight_aware

SCOPES = {"all": r"layers\.\d+\.(self_attn|mlp)\.\w+_proj", "mlp": r"layers\.\d+\.mlp\.\w+_proj"}
UNITS = {"all": (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)),
         "mlp": (("gate_proj", "up_proj"), ("down_proj",))}
QUIET = {"progress": False}
OURS = ("ours", "ours_fisher_score", "ours_rotated", "ours_rotated_fisher_score", "ours_rotated_sparse")


def log(*args) -> None:
    print("#", *args, file=sys.stderr, flush=True)


def batches(windows: TokenWindows, size: int) -> list[torch.Tensor]:
    xs = [windows[i] for i in range(len(windows))]
    return [torch.stack(xs[i : i + size]) for i in range(0, len(xs), size)]


def unit_names(model, block: int, scope: str) -> list[list[str]]:
    mods = dict(model.named_modules())
    full = lambda short: next(n for n in mods if n.startswith(f"layers.{block}.") and n.endswith("." + short))  # noqa: E731
    return [[full(s) for s in unit] for unit in UNITS[scope]]


_TEAL_PATHS: dict[tuple, tuple[float, list]] = {}  # (scope, step, stride, data) -> (top budget, per-block paths)


def teal_greedy(model, calib: list[torch.Tensor], budget: float, scope: str, step: float = 0.025, stride: int = 4) -> dict[str, float]:
    """TEAL's block-wise greedy (see the module docstring); levels per layer name.

    Every block walks one greedy path from level 0 (the block inputs are the dense model's, so the path does
    not depend on the budget): it is run once per scope up to 0.9 and a budget reads the point where the
    block's bytes reach it (the step that crosses it is cut to the exact byte count; the path is run up to the
    largest budget asked, at least 0.6). The error is measured on
    every ``stride``-th calibration batch (a quarter: the greedy needs hundreds of block passes); the chosen
    levels are then calibrated exactly on all of it.
    """
    key = (scope, step, stride, id(calib))
    if key not in _TEAL_PATHS or _TEAL_PATHS[key][0] < budget:
        top = max(budget, 0.6)
        _TEAL_PATHS[key] = (top, _teal_paths(model, calib[::stride], scope, step, top))
    levels: dict[str, float] = {}
    for units, nbytes, path in _TEAL_PATHS[key][1]:
        total = sum(nbytes)
        k = next(i for i, lv in enumerate(path) if sum(nb * s for nb, s in zip(nbytes, lv)) >= budget * total - 1e-9)
        lv = path[k]
        if k > 0:  # cut the crossing step at the budget: only the unit raised in it moves
            prev = path[k - 1]
            j = next(i for i in range(len(lv)) if lv[i] != prev[i])
            lv = prev[:j] + [prev[j] + (budget * total - sum(nb * s for nb, s in zip(nbytes, prev))) / nbytes[j]] + prev[j + 1 :]
        levels.update({n: s for u, s in zip(units, lv) for n in u})
    return levels


def _teal_paths(model, calib: list[torch.Tensor], scope: str, step: float, top: float) -> list:
    mods = dict(model.named_modules())
    inputs = {b: [] for b in range(len(model.layers))}
    hooks = [blk.register_forward_pre_hook(lambda _m, a, b=b: inputs[b].append(a)) for b, blk in enumerate(model.layers)]
    with torch.no_grad():
        for x in calib:
            model(x)
    for h in hooks:
        h.remove()
    paths = []
    for b, blk in enumerate(model.layers):
        units = unit_names(model, b, scope)
        nbytes = [sum(weight_nbytes(mods[n]) for n in u) for u in units]
        total = sum(nbytes)
        x = torch.cat([a[0] for a in inputs[b]])
        rest = inputs[b][0][1:]
        with torch.no_grad():
            ref = blk(x, *rest)

        def error(lv: list[float]) -> float:
            memo: dict = {}  # q/k/v (gate/up) read one tensor: one quantile

            def cut(_m, a, s):
                if (a[0].data_ptr(), s) not in memo:
                    v = a[0].abs().flatten()
                    memo[a[0].data_ptr(), s] = v.kthvalue(max(1, int(round(s * v.numel())))).values
                return (a[0] * (a[0].abs() > memo[a[0].data_ptr(), s]), *a[1:])

            handles = [mods[n].register_forward_pre_hook(lambda m, a, s=s: cut(m, a, s)) for u, s in zip(units, lv) if s > 0 for n in u]
            try:
                with torch.no_grad():
                    return float((blk(x, *rest) - ref).pow(2).mean())
            finally:
                for h in handles:
                    h.remove()

        lv = [0.0] * len(units)
        path = [lv]
        while sum(nb * s for nb, s in zip(nbytes, lv)) < top * total - 1e-6 * total:
            cands = [lv[:k] + [lv[k] + step * total / nb] + lv[k + 1 :] for k, nb in enumerate(nbytes) if lv[k] + step * total / nb <= 0.99]
            if not cands:
                break
            lv = min(cands, key=error)  # every step skips the same number of weight bytes
            path.append(lv)
        paths.append((units, nbytes, path))
        log(f"teal block {b}:", [round(s, 3) for s in lv])
    return paths


def measure(model, targets: list[str], evaluation, heldout) -> dict:
    mods = dict(model.named_modules())
    nbytes = {n: weight_nbytes(mods[n]) for n in targets}
    with SparsityCounter(model) as counter, torch.no_grad():
        for i in range(0, len(evaluation), 16):
            model(torch.stack([evaluation.pair(j)[0] for j in range(i, min(i + 16, len(evaluation)))]))
    sp = counter.sparsity()
    achieved = sum(nbytes[n] * sp.get(n, 0.0) for n in targets) / sum(nbytes.values())
    return {"perplexity": round(perplexity(model, evaluation), 4), "heldout_perplexity": round(perplexity(model, heldout), 4),
            "achieved": round(achieved, 4)}


def _baselines(row: dict, scope: str, budget: float, recipe: dict, names: list, calib: list, evaluation, heldout) -> None:
    """The rows every "ours" row is compared with: uniform, weight-aware uniform, TEAL's greedy, the curves' optimum."""
    m = load_llama2c_checkpoint()
    sparsify_activations(m, calib, recipe, calibration=QUIET)
    row["uniform"] = measure(m, names, evaluation, heldout)
    m = load_llama2c_checkpoint()
    sparsify_activations_weight_aware(m, calib, recipe, calibration=QUIET)
    row["weight_aware_uniform"] = measure(m, names, evaluation, heldout)
    t0 = time.perf_counter()
    levels = teal_greedy(load_llama2c_checkpoint().eval(), calib, budget, scope)
    m = load_llama2c_checkpoint()
    sparsify_activations(m, calib, {TargetScope(names=[n]): s for n, s in levels.items()}, calibration=QUIET)
    row["teal_greedy"] = measure(m, names, evaluation, heldout) | {"seconds": round(time.perf_counter() - t0, 1)}
    m = load_llama2c_checkpoint()
    sparsify_activations(m, calib, recipe, calibration=QUIET, allocation="fisher")
    row["fisher_only"] = measure(m, names, evaluation, heldout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6])
    p.add_argument("--scopes", nargs="+", choices=list(SCOPES), default=["mlp", "all"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="also write the JSON here (e.g. benchmarks/results/allocation.json)")
    p.add_argument("--rows", nargs="+", choices=OURS, default=list(OURS), help="which of our rows to compute")
    p.add_argument("--merge", action="store_true", help="keep the rows of --out and their baselines; compute and replace only --rows")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    tok = Llama2cTokenizer.from_file()
    calib = batches(TokenWindows(load_stories(start=500, stop=600), tok, seq_len=256), 8)
    evaluation = TokenWindows(load_stories(start=0, stop=150), tok, seq_len=256)
    heldout = TokenWindows(load_stories(start=600, stop=750), tok, seq_len=256)
    base = load_llama2c_checkpoint().eval()

    def dense_pass() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for x in calib:
                base(x)
        return time.perf_counter() - t0

    dense_pass()
    rows: list[dict] = []
    old = {(r["scope"], r["budget"]): r for r in json.loads(Path(args.out).read_text())["rows"]} if args.merge else {}
    head = {
        "benchmark": "allocation",
        "model": "stories260K",
        "calibration": {"stories": [500, 600], "windows": sum(len(b) for b in calib), "batch": 8, "seq_len": 256},
        "evaluation": {"stories": [0, 150], "windows": len(evaluation)},
        "heldout": {"stories": [600, 750], "windows": len(heldout)},
        "dense_perplexity": round(perplexity(base, evaluation), 4),
        "dense_heldout_perplexity": round(perplexity(base, heldout), 4),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
    }

    def write(complete: bool) -> None:
        text = json.dumps(head | {"rows": rows, "complete": complete, "seconds": round(time.perf_counter() - t_all, 1)}, indent=1)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n")
        if complete:
            print(text)

    for scope in args.scopes:
        names = [n for n, _ in base.named_modules() if TargetScope(patterns=[SCOPES[scope]]).matches(n, None)]
        for budget in args.budgets:
            row = {"scope": scope, "budget": budget}
            recipe = {TargetScope(patterns=[SCOPES[scope]]): budget}
            if (scope, budget) in old:  # the baselines as measured before (deterministic)
                row = old[(scope, budget)]
            else:
                _baselines(row, scope, budget, recipe, names, calib, evaluation, heldout)
            auto = lambda m, r: sparsify_activations(m, calib, r, calibration=QUIET, allocation="auto")  # noqa: E731
            fisher = lambda m, r: sparsify_activations_weight_aware(m, calib, r, score="fisher", calibration=QUIET, allocation="auto")  # noqa: E731
            rotated = lambda run, s=None: lambda m, r: run(rotate_activations(m, calib, calibration=QUIET, sparsity=s), r)  # noqa: E731
            runs = {"ours": auto, "ours_fisher_score": fisher, "ours_rotated": rotated(auto), "ours_rotated_fisher_score": rotated(fisher),
                    "ours_rotated_sparse": rotated(auto, budget)}
            for key, run in ((k, runs[k]) for k in args.rows):
                m = load_llama2c_checkpoint()
                dense = [dense_pass() for _ in range(3)]
                t0 = time.perf_counter()
                run(m, recipe)
                seconds = time.perf_counter() - t0
                dense += [dense_pass() for _ in range(3)]
                row[key] = measure(m, names, evaluation, heldout) | {
                    "seconds": round(seconds, 2), "dense_forward_seconds": round(statistics.median(dense), 3),
                    "cost_in_dense_forwards": round(seconds / statistics.median(dense), 1),
                    "levels": {n.replace("layers.", "").replace("self_attn.", "").replace("mlp.", ""): round(sparsifier_state(m.get_submodule(n)).target, 3) for n in names},
                }
                short = budget - row[key]["achieved"]
                if abs(short) > 0.002:  # a second calibration past the budget; interpolate to achieved == budget
                    m = load_llama2c_checkpoint()
                    run(m, {TargetScope(patterns=[SCOPES[scope]]): budget + short})
                    far = measure(m, names, evaluation, heldout)
                    t = short / (far["achieved"] - row[key]["achieved"])
                    row[key]["at_budget"] = {k: round(row[key][k] + t * (far[k] - row[key][k]), 4) for k in ("perplexity", "heldout_perplexity")} | {
                        "second_calibration": {"budget": round(budget + short, 4)} | far}
                for other in ("teal_greedy", "uniform"):
                    for metric, suffix in (("perplexity", ""), ("heldout_perplexity", "_heldout")):
                        ours = row[key].get("at_budget", row[key])[metric]
                        row[f"{key}_vs_{other.split('_')[0]}{suffix}"] = round(ours / row[other][metric] - 1, 4)
            log(json.dumps({k: v for k, v in row.items() if not k.startswith("ours")}),
                *[x for k in OURS if k in row for x in (k, row[k].get("at_budget", row[k])["perplexity"])])
            rows.append(row)
            write(complete=False)
    write(complete=True)


if __name__ == "__main__":
    main()
