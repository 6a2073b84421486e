"""Allocation, weight-aware scoring and one-pass sweeps on the real stories260K model; prints one JSON object.

At 30%, 40% and 50% of the MLP weight bytes skipped per token (all 15 gate/up/down projections), perplexity on
the 194 windows of stories 0-149 for:

* ``uniform``: every MLP layer at the budget (exact calibration),
* ``allocation``: ``sparsify_activations(..., allocation="auto")`` on the MLP scope (per-layer levels under the byte
  budget from empirical-Fisher curves and a loss-scored search, then exact calibration; before 0.2 this column
  was the older ``allocate_sparsity``),
* ``weight_aware_uniform`` / ``weight_aware_shared_uniform`` / ``weight_aware_allocation``: the score
  ``|x| * ||W[:, i]||`` (per layer / one scale per shared-input group) at the uniform or allocated targets,
* ``nncf_uniform``: NNCF's ``sparsify_activations`` at the uniform targets, when nncf is importable.

Calibration: stories 500-599, 256-token windows, batches of 8. Then a one-pass sweep (7 targets, plot written
to ``--out-dir``) compared with a recalibrated sweep, and the drift of one-pass thresholds on calibration data.

    python benchmarks/sensitivity_sweep.py [--out-dir DIR] [--no-nncf] [--no-sweep] [--budgets 0.3 0.4 0.5]

Progress goes to stderr; stdout is the JSON object only.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from pl_actsparse import TargetScope, calibrate_activation_sparsity, prepare_activation_sparsity, sparsify_activations
from pl_actsparse.demos import calibration_batches
from pl_actsparse.demos.tinystories import TokenWindows, load_stories
from pl_actsparse.tuning.objectives import perplexity
from pl_actsparse.demos.llama2c import Llama2cTokenizer, load_llama2c_checkpoint
from pl_actsparse.tuning.weight_aware import sparsify_activations_weight_aware
from pl_actsparse.tuning.sweep import apply_statistics, perplexity_metric, sweep_sparsity
from pl_actsparse.core.layer import sparsified_layers, sparsifier_state, weight_nbytes
from pl_actsparse.measure.metric import SparsityCounter

from _common import add_out_argument, emit

MLP_PATTERN = r"layers\.\d+\.mlp\.(gate|up|down)_proj"
SWEEP_TARGETS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]


def log(*args) -> None:
    print("#", *args, file=sys.stderr, flush=True)


def skipped_fraction(model, targets: dict[str, float]) -> float:
    mods = dict(model.named_modules())
    b = {n: weight_nbytes(mods[n]) for n in targets}
    return sum(targets[n] * b[n] for n in targets) / sum(b.values())


def nncf_uniform(model, calib, evaluation, budget: float) -> float:
    import nncf
    from nncf.experimental.torch.sparsify_activations import TargetScope as NncfScope
    from nncf.experimental.torch.sparsify_activations import sparsify_activations as nncf_sparsify

    candidate = copy.deepcopy(model)
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: keep stdout JSON
        warnings.simplefilter("ignore")
        sparse = nncf_sparsify(candidate, nncf.Dataset(calib), {NncfScope(patterns=[".*up_proj.*", ".*gate_proj.*", ".*down_proj.*"]): budget})
        return perplexity(sparse, evaluation, batch_size=16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.4, 0.5])
    parser.add_argument("--out-dir", default=None, help="where the sweep plot/JSON go (default: a temporary directory)")
    parser.add_argument("--no-nncf", action="store_true")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this tiny model)")
    parser.add_argument("--calibration-stories", type=int, nargs=2, default=[500, 600], metavar=("START", "STOP"))
    parser.add_argument("--eval-stories", type=int, nargs=2, default=[0, 150], metavar=("START", "STOP"))
    add_out_argument(parser, "sensitivity_sweep")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_all = time.perf_counter()
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="actsparse-allocation-"))
    out_dir.mkdir(parents=True, exist_ok=True)

    base_model = load_llama2c_checkpoint()
    tok = Llama2cTokenizer.from_file()
    calib = calibration_batches(*args.calibration_stories, seq_len=256, batch_size=8, tokenizer=tok)
    evaluation = TokenWindows(load_stories(start=args.eval_stories[0], stop=args.eval_stories[1]), tok, seq_len=256)
    dense_ppl = perplexity(base_model, evaluation, batch_size=16)
    scope = TargetScope(patterns=[MLP_PATTERN])
    nncf_status = "skipped (--no-nncf)"
    if not args.no_nncf:
        try:
            import nncf

            nncf_status = f"nncf {nncf.__version__}"
        except ImportError:
            nncf_status = "not installed"

    def fresh():
        return copy.deepcopy(base_model)

    budgets = []
    for budget in args.budgets:
        row: dict = {"budget": budget}
        m = fresh()
        sparsify_activations(m, calib, {scope: budget}, calibration={"progress": False})
        row["uniform"] = perplexity(m, evaluation)
        log(f"budget {budget}: uniform {row['uniform']:.4f}")

        t0 = time.perf_counter()
        m = sparsify_activations(fresh(), calib, {scope: budget}, allocation="auto", calibration={"progress": False})
        alloc_s = time.perf_counter() - t0
        targets = {n: sparsifier_state(layer).target for n, layer in sparsified_layers(m)}
        allocated = {TargetScope(names=[n]): t for n, t in targets.items()}
        row["allocation"] = perplexity(m, evaluation)
        row["allocation_detail"] = {
            "targets": {n.replace("layers.", "").replace("mlp.", ""): round(v, 4) for n, v in targets.items()},
            "skipped_fraction": round(skipped_fraction(m, targets), 6),
            "seconds": round(alloc_s, 1),
        }
        log(f"budget {budget}: allocation {row['allocation']:.4f} ({alloc_s:.0f}s)")

        for label, recipe, share in [
            ("weight_aware_uniform", {scope: budget}, False),
            ("weight_aware_shared_uniform", {scope: budget}, True),
            ("weight_aware_allocation", allocated, False),
            ("weight_aware_shared_allocation", allocated, True),
        ]:
            m = fresh()
            sparsify_activations_weight_aware(m, calib, recipe, share_groups=share, calibration={"progress": False})
            row[label] = perplexity(m, evaluation)
            log(f"budget {budget}: {label} {row[label]:.4f}")

        if nncf_status.startswith("nncf"):
            row["nncf_uniform"] = nncf_uniform(base_model, calib, evaluation, budget)
            log(f"budget {budget}: nncf {row['nncf_uniform']:.4f}")
        budgets.append(row)

    result = {
        "benchmark": "allocation",
        "model": "stories260K",
        "layers": "15 MLP projections (gate/up/down), 660,480 weight bytes",
        "calibration_data": {"stories": [500, 600], "windows": sum(len(b) for b in calib), "batch": 8, "seq_len": 256},
        "evaluation_data": {"stories": [0, 150], "windows": len(evaluation), "seq_len": 256},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "nncf": nncf_status,
        "dense_perplexity": dense_ppl,
        "budgets": budgets,
    }

    if not args.no_sweep:
        log("sweep: one calibration pass")
        one = sweep_sparsity(fresh(), calib, SWEEP_TARGETS, perplexity_metric(evaluation), scope, metric_name="perplexity")
        log("sweep: recalibrated at every point")
        exact = sweep_sparsity(fresh(), calib, SWEEP_TARGETS, perplexity_metric(evaluation), scope, recalibrate=True, metric_name="perplexity", include_dense=False)
        one.to_json(out_dir / "sweep.json")
        png = one.plot(out_dir / "sweep.png", others={"recalibrated per point": exact})
        # drift of one-pass thresholds on the calibration data itself (base = median target 0.4)
        m = fresh()
        names = [n for n, _ in m.named_modules() if scope.matches(n, None) and n]
        prepare_activation_sparsity(m, {scope: one.base_targets[names[0]]})
        stats = calibrate_activation_sparsity(m, calib, calibration={"progress": False}).statistics
        drift = []
        for t in SWEEP_TARGETS:
            apply_statistics(m, stats, t)
            with SparsityCounter(m) as counter, torch.no_grad():
                for b in calib:
                    m(b)
            errs = {n: abs(v - t) for n, v in counter.sparsity().items()}
            drift.append(
                {
                    "target": t,
                    "first_layer_error": round(errs[names[0]], 6),
                    "max_error": round(max(errs.values()), 5),
                    "mean_error": round(sum(errs.values()) / len(errs), 5),
                }
            )
        result["sweep"] = {
            "targets": SWEEP_TARGETS,
            "base_target": one.base_targets[names[0]],
            "one_pass": {
                "calibration_passes": one.calibration_passes,
                "evaluations": one.evaluations,
                "seconds": round(one.seconds, 1),
                "perplexity": [round(p.metric, 4) for p in one.points],
                "achieved_on_evaluation_data": [round(p.achieved, 4) for p in one.points],
            },
            "recalibrated": {
                "calibration_passes": exact.calibration_passes,
                "evaluations": exact.evaluations,
                "seconds": round(exact.seconds, 1),
                "perplexity": [round(p.metric, 4) for p in exact.points],
                "achieved_on_evaluation_data": [round(p.achieved, 4) for p in exact.points],
            },
            "max_relative_perplexity_difference": round(max(abs(a.metric / b.metric - 1) for a, b in zip(one.points, exact.points)), 5),
            "one_pass_drift_on_calibration_data": drift,
            "plot": str(png),
            "json": str(out_dir / "sweep.json"),
        }

    checks = {
        "allocation_beats_uniform": all(r["allocation"] < r["uniform"] for r in budgets),
        "allocation_beats_nncf": all(r["allocation"] < r["nncf_uniform"] for r in budgets) if all("nncf_uniform" in r for r in budgets) else None,
        "allocation_meets_budget": all(abs(r["allocation_detail"]["skipped_fraction"] - r["budget"]) <= 1e-3 for r in budgets),
        "weight_aware_beats_plain_uniform": all(r["weight_aware_uniform"] < r["uniform"] for r in budgets),
        "sweep_plot_written": (Path(result["sweep"]["plot"]).stat().st_size > 0) if "sweep" in result else None,
    }
    result["targets_met"] = checks
    result["seconds"] = round(time.perf_counter() - t_all, 1)
    for r in budgets:
        for k, v in list(r.items()):
            if isinstance(v, float) and k != "budget":
                r[k] = round(v, 4)
    emit(result, args.out)


if __name__ == "__main__":
    main()
