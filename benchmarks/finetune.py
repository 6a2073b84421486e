"""Sparsity-aware fine-tuning of stories260K with the callback's self-distillation (a benchmark, not a test).

Prints one JSON object on stdout (progress goes to stderr). Calibration on stories 150-299, fine-tuning on
stories 300-999 (300 steps of 16 x 256 tokens), evaluation on stories 0-149 (256-token windows) and on held-out
text (the first ``--heldout-windows`` 256-token windows of tinyshakespeare.txt):

* dense and training-free perplexity for each recipe asked for, with achieved sparsity on the evaluation stories;
* fine-tunes (``--runs``), every one through ``Trainer.fit`` with :class:`~pl_actsparse.ActivationSparsityCallback`
  (``distillation=``, recalibration every ``--recalibrate-every`` steps and on the final weights): ``mlp``
  (gate/up/down at 50%), ``all7`` (all seven projections at 50% of their weight bytes: one scope and the
  callback's ``allocation="auto"``, which allocates per-layer levels at its first calibration, on the calibration
  stories), ``all7_uniform`` (50% each) and ``lora`` (peft LoRA r=16 on all seven projections, ``--lora-variant``
  lora, dora or rslora, gate/up/down at 50%, evaluated before and after ``merge_and_unload``). The ingredients are
  options applied to every run of the command (``--distillation 0`` turns distillation off, ``--distillation-end`` ramps its weight, ``--kl``,
  ``--temperature``, ``--hidden-states``, ``--teacher``, ``--gradient-mode``, ``--allocation``, ``--ramp-steps``, ``--recalibrate-every 0``); ``--tag``
  names the variant, so a run is stored as ``NAME`` or ``NAME+TAG``;
* step time in one process at ``--timing-threads`` threads: sparse / dense and sparse + distillation / sparse,
  per-round ratios of median step times, median over rounds (target sparse / dense <= 1.10);
* optionally (``--compile-rounds``) compiled sparse over compiled dense step time.

    python benchmarks/finetune.py --runs mlp,all7,lora --timing-rounds 0 --out benchmarks/results/finetune.json
    python benchmarks/finetune.py --runs mlp --distillation 0 --tag no_distillation --timing-rounds 0 --out ...
    python benchmarks/finetune.py --runs "" --timing-rounds 5 --out ...           # step time only

``--out FILE`` merges into FILE: runs, training-free rows and step times of this command replace those of the same
name, each stored with the command line that produced it.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


RUNS = ("mlp", "all7", "all7_uniform", "lora")
MLP = r".*mlp\.(gate|up|down)_proj"
ALL7 = r".*(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="mlp,all7,lora", help=f"comma-separated fine-tunes out of {', '.join(RUNS)}")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of each fine-tune")
    parser.add_argument("--recalibrate-every", type=int, default=100, help="recalibrate every N steps (and once at the end)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1)
    parser.add_argument("--distillation", type=float, default=0.9, help="weight of the KL to the dense model (callback distillation=)")
    parser.add_argument("--distillation-end", type=float, default=None, help="distillation weight at the last step, linear from --distillation (weight_end=)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--kl", choices=("forward", "reverse"), default="forward", help="KL direction of the distillation")
    parser.add_argument("--hidden-states", default=None, help="regex of the blocks whose outputs are matched too (distillation hidden_states=)")
    parser.add_argument("--teacher", choices=("initial", "dense", "base"), default="initial")
    parser.add_argument("--gradient-mode", choices=("masked", "ste"), default="masked")
    parser.add_argument("--allocation", choices=("uniform", "auto", "fisher"), default=None,
                        help="the callback's allocation= (default: auto for all7, uniform otherwise; the scope's value is then a byte budget)")
    parser.add_argument("--ramp-steps", type=int, default=0, help="LinearRamp of the targets from 0 over N steps (0: constant)")
    parser.add_argument("--sparsity", type=float, default=0.5, help="target (or byte budget with allocation auto) of every run")
    parser.add_argument("--principal-axes", action="store_true", help="with --rotate: the principal axes only (sparsity=None; the "
                        "'_rotated' runs made before the axes were turned for the target)")
    parser.add_argument("--rotate", action="store_true", help="rotate_activations on the calibration stories first: the callback's rotation=True for full "
                        "fine-tunes, a rotated checkpoint for LoRA (peft wraps the model before any callback runs) and the training-free rows")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fine-tunes: the training data's order and the adapters' initialisation")
    parser.add_argument("--tag", default="", help="variant name: runs are stored as NAME+TAG")
    parser.add_argument("--out", default=None, help="merge the result into this JSON file")
    parser.add_argument("--no-baselines", action="store_true", help="skip the dense and training-free evaluations (a variant of a run measured before)")
    parser.add_argument("--lora-lr", type=float, default=3e-3, help="peak learning rate of the LoRA run")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-variant", choices=("lora", "dora", "rslora"), default="lora", help="peft use_dora / use_rslora")
    parser.add_argument("--timing-steps", type=int, default=8, help="timed steps per fit in the step-time part")
    parser.add_argument("--timing-rounds", type=int, default=3, help="rounds of the step-time part (0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--timing-threads", type=int, default=1, help="torch threads of the step-time part")
    parser.add_argument("--compile-rounds", type=int, default=0, help="rounds of the compiled step-time part (0: skip)")
    parser.add_argument("--compile-steps", type=int, default=12, help="timed steps per fit in the compiled part")
    parser.add_argument("--compile-threads", default="1,2", help="thread counts of the compiled part")
    parser.add_argument("--heldout-windows", type=int, default=100, help="256-token windows of Shakespeare for held-out perplexity")
    parser.add_argument("--data", default=None, help="data folder (default: $PL_ACTSPARSE_DATA or ../shared/data)")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    import lightning.pytorch as pl

    from pl_actsparse import ActivationSparsityCallback, TargetScope, activation_sparsity_report, sparsify_activations
    from pl_actsparse.lightning.schedule import LinearRamp
    from pl_actsparse.demos.lightning_models import TinyStoriesDataModule, TinyStoriesLM
    from pl_actsparse.demos.llama2c import Llama2cTokenizer, load_llama2c_checkpoint
    from pl_actsparse.demos.tinystories import TokenWindows, load_stories, resolve_data_dir
    from pl_actsparse.measure.metric import SparsityCounter
    from pl_actsparse.tuning.objectives import perplexity

    started = time.perf_counter()
    data_dir = resolve_data_dir(args.data)
    checkpoint = str(data_dir / "stories260K.bin")
    tokenizer = Llama2cTokenizer.from_file(data_dir / "tok512.bin")
    evaluation = TokenWindows(load_stories(data_dir, 0, 150), tokenizer, seq_len=256)
    shakespeare = (data_dir / "tinyshakespeare.txt").read_text()[: 1100 * args.heldout_windows]
    heldout = TokenWindows([shakespeare], tokenizer, seq_len=256)
    heldout = [heldout.pair(i) for i in range(min(args.heldout_windows, len(heldout)))]

    def datamodule() -> TinyStoriesDataModule:
        return TinyStoriesDataModule(data_dir=str(data_dir), seq_len=256, batch_size=args.batch_size, calibration_batch_size=8,
                                     train_stories=(300, 1000), calibration_stories=(150, 300), val_stories=(0, 150), seed=args.seed)

    def trainer(callbacks: list, **kwargs: Any) -> pl.Trainer:
        return pl.Trainer(accelerator="cpu", devices=1, callbacks=callbacks, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, **kwargs)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        with SparsityCounter(model) as counter:
            ppl = perplexity(model, evaluation)
        achieved, size = counter.sparsity(), {n: counter.layers[n].weight.numel() for n in counter.sparsity()}
        return {"perplexity": round(ppl, 4), "heldout_perplexity": round(perplexity(model, heldout), 4), "eval_sparsity": round(_overall(counter, model), 4),
                "eval_byte_sparsity": round(sum(achieved[n] * size[n] for n in achieved) / sum(size.values()), 4)}  # weighted by weight bytes

    calibration = [x for x, _ in datamodule().calibration_dataloader()]
    original = checkpoint
    if args.rotate:  # the residual stream and value heads in their principal axes (the same function), as a llama2.c file
        import tempfile

        from pl_actsparse.demos.llama2c import save_llama2c_checkpoint
        from pl_actsparse.tuning.rotation import rotate_activations

        checkpoint = str(Path(tempfile.mkdtemp()) / "stories260K_rotated.bin")
        save_llama2c_checkpoint(rotate_activations(load_llama2c_checkpoint(data_dir / "stories260K.bin"), calibration, calibration={"progress": False}, sparsity=None if args.principal_axes else args.sparsity), checkpoint)

    # -- dense, training-free, and the model-wide allocation (from calibration stories only) -------------------
    dense = None
    if not args.no_baselines:
        dense_model = load_llama2c_checkpoint(checkpoint)
        dense = {"perplexity": round(perplexity(dense_model, evaluation), 4), "heldout_perplexity": round(perplexity(dense_model, heldout), 4)}
        log(f"dense {dense}")
    recipes: dict[str, list[dict[str, Any]]] = {"mlp": [{"patterns": [MLP], "sparsity": args.sparsity}], "all7_uniform": [{"patterns": [ALL7], "sparsity": args.sparsity}],
                                                "all7": [{"patterns": [ALL7], "sparsity": args.sparsity}]}
    runs_wanted = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = sorted(set(runs_wanted) - set(RUNS))
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; valid: {RUNS}")
    training_free: dict[str, Any] = {}
    if "all7" in runs_wanted and not args.no_baselines:  # the model-wide allocation (empirical Fisher), training-free
        model = load_llama2c_checkpoint(checkpoint)
        sparsify_activations(model, calibration, {TargetScope(patterns=[ALL7]): 0.5}, allocation="auto", calibration={"progress": False})
        training_free["all7"] = evaluate(model)
        log(f"training-free all7 (allocation='auto'): {training_free['all7']}")
    for name, scopes in recipes.items():
        if (name == "mlp" or name in runs_wanted) and name != "all7" and not args.no_baselines:
            model = load_llama2c_checkpoint(checkpoint)
            sparsify_activations(model, calibration, {TargetScope(**{k: v for k, v in s.items() if k != "sparsity"}): s["sparsity"] for s in scopes}, calibration={"progress": False})
            training_free[name] = evaluate(model)
            log(f"training-free {name}: {training_free[name]}")

    # -- fine-tunes, every one through Trainer.fit with the callback's distillation -----------------------------
    runs: dict[str, Any] = {}
    for name in runs_wanted:
        distillation: Any = {"weight": args.distillation, "weight_end": args.distillation_end, "temperature": args.temperature, "kl": args.kl, "teacher": args.teacher,
                              "hidden_states": args.hidden_states} if args.distillation else None
        pl.seed_everything(args.seed, verbose=False)
        callback = ActivationSparsityCallback(
            scopes=recipes[name if name.startswith("all7") else "mlp"], calibration_source="calibration_dataloader",
            recalibrate_every_n_steps=args.recalibrate_every or None, gradient_mode=args.gradient_mode, on_train_end="make_permanent",
            schedule=LinearRamp(steps=args.ramp_steps) if args.ramp_steps else "constant", track=False, rotation=args.rotate and name != "lora" and ({"sparsity": None} if args.principal_axes else True),
            calibration={"progress": False}, verbose=False, distillation=distillation, allocation=args.allocation or ("auto" if name == "all7" else "uniform"),
        )
        if name == "lora":
            from pl_actsparse.demos.peft_models import LoRATinyStoriesLM

            lora = {"use_dora": args.lora_variant == "dora", "use_rslora": args.lora_variant == "rslora", "r": args.lora_rank, "lora_alpha": 2 * args.lora_rank, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
            module: Any = LoRATinyStoriesLM(lora=lora, checkpoint=checkpoint, learning_rate=args.lora_lr, warmup_steps=args.warmup, min_lr_ratio=args.min_lr_ratio)
        else:
            module = TinyStoriesLM(checkpoint=original if args.rotate else checkpoint, learning_rate=args.lr, warmup_steps=args.warmup, min_lr_ratio=args.min_lr_ratio)
        t0 = time.perf_counter()
        trainer([callback, _Progress(name)], max_steps=args.steps, log_every_n_steps=50).fit(module, datamodule=datamodule())
        run: dict[str, Any] = {"command": " ".join(sys.argv), "seconds": round(time.perf_counter() - t0, 1), "distillation": distillation,
                               "gradient_mode": args.gradient_mode, "ramp_steps": args.ramp_steps, "rotated": args.rotate, **evaluate(module.model)}
        run["max_layer_error_on_calibration_data"] = round(activation_sparsity_report(module.model).max_abs_error, 6)
        run["recalibrations"] = [{"step": h["step"], "sparsity_before": None if h["sparsity_before"] is None else round(h["sparsity_before"], 4),
                                  "sparsity_after": round(h["sparsity_after"], 4)} for h in callback.history]
        if callback.allocated:
            run["allocation"] = {n: round(v, 6) for n, v in callback.allocated["levels"].items()}
        if name == "lora":
            run["lora_variant"] = args.lora_variant
            run["trainable_parameters"] = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
            merged = module.merged_model()
            run["merged"] = evaluate(merged)
        runs[name + (f"+{args.tag}" if args.tag else "")] = run
        log(f"{name}: {run}")

    step_time = _step_times(args, trainer, datamodule, recipes["mlp"], checkpoint) if args.timing_rounds > 0 else None
    compiled = _compiled_step_times(args, trainer, datamodule, recipes["mlp"], checkpoint) if args.compile_rounds > 0 else None
    result = {
        "benchmark": "sparsity-aware fine-tuning of stories260K with self-distillation (benchmarks/finetune.py)",
        "data": {"evaluation": f"stories 0-149, {len(evaluation)} disjoint 256-token windows",
                 "heldout": f"tinyshakespeare.txt, first {len(heldout)} 256-token windows",
                 "calibration": "stories 150-299, batches of 8 x 256 tokens", "fine_tuning": f"stories 300-999, batches of {args.batch_size} x 256 tokens"},
        "fine_tuning": {"steps": args.steps, "recalibrate_every_n_steps": args.recalibrate_every, "temperature": args.temperature,
                        "optimizer": f"AdamW lr {args.lr} (LoRA {args.lora_lr}), {args.warmup} warm-up steps, cosine to {args.min_lr_ratio} x lr"},
        "dense": dense,
        "training_free": training_free,
        "runs": runs,
        "step_time": step_time,
        "step_time_compiled": compiled,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.out:
        result = _merged(args.out, result)
    print(json.dumps(result, indent=1))
    return result


def _merged(path: str, result: dict[str, Any]) -> dict[str, Any]:
    """``result`` merged into the JSON at ``path`` (runs and training-free rows by name, step times if measured), written back."""
    from pathlib import Path

    file = Path(path)
    old = json.loads(file.read_text()) if file.exists() else {}
    merged = {**old, **{k: v for k, v in result.items() if v is not None and k not in ("runs", "training_free", "seconds")}}
    merged["runs"] = {**old.get("runs", {}), **result["runs"]}
    merged["training_free"] = {**old.get("training_free", {}), **result["training_free"]}
    file.write_text(json.dumps(merged, indent=1) + "\n")
    return merged


def _step_times(args: Any, trainer: Any, datamodule: Any, scopes: list, checkpoint: str) -> dict[str, Any]:
    """Median step time of dense, sparse (masked) and sparse + distillation fits of the same module and data, in
    shuffled order per round, at ``--timing-threads`` threads; ratios per round, median over rounds."""
    import lightning.pytorch as pl

    from pl_actsparse import ActivationSparsityCallback
    from pl_actsparse.demos.lightning_models import TinyStoriesLM

    initial = torch.get_num_threads()
    torch.set_num_threads(args.timing_threads)
    per_round: dict[str, list[float]] = {"dense": [], "sparse": [], "sparse_distill": []}
    rng = random.Random(0)
    for _ in range(args.timing_rounds):
        order = list(per_round)
        rng.shuffle(order)
        for kind in order:
            pl.seed_everything(0, verbose=False)
            timer = _StepTimer(skip=2)
            callbacks: list = [timer]
            if kind != "dense":
                callbacks.insert(0, ActivationSparsityCallback(scopes=scopes, calibration_source="calibration_dataloader", track=False,
                                                               calibration={"progress": False}, verbose=False,
                                                               distillation=args.distillation if kind == "sparse_distill" else None))
            module = TinyStoriesLM(checkpoint=checkpoint, learning_rate=args.lr)
            trainer(callbacks, max_steps=args.timing_steps + 2, log_every_n_steps=50).fit(module, datamodule=datamodule())
            per_round[kind].append(statistics.median(timer.times))
    torch.set_num_threads(initial)

    def ratio(a: str, b: str) -> list[float]:
        return [round(x / y, 3) for x, y in zip(per_round[a], per_round[b])]

    out = {f"{k}_s": round(statistics.median(v), 4) for k, v in per_round.items()}
    for a, b in (("sparse", "dense"), ("sparse_distill", "sparse"), ("sparse_distill", "dense")):
        out[f"ratio_{a}_over_{b}"] = statistics.median(ratio(a, b))
        out[f"ratio_{a}_over_{b}_per_round"] = ratio(a, b)
    out.update({"target_sparse_over_dense": 1.10, "threads": args.timing_threads, "rounds": args.timing_rounds, "timed_steps_each": args.timing_steps})
    log(f"step time {out}")
    return out


def _compiled_step_times(args: Any, trainer: Any, datamodule: Any, scopes: list, checkpoint: str) -> dict[str, Any]:
    """Median step time of a compiled sparsified model over the same compiled dense model (inductor).

    The module compiles its own model (``self.model = torch.compile(self.model)``), as users do; the callback
    calibrates with compilation off. Each round fits dense and sparse (``ste``) in shuffled order per thread
    count; the ratio is taken per round and the median over rounds reported. Dynamo's counters say whether the
    sparsified model compiled without graph breaks and recompiled only for its own variants.
    """
    import torch._dynamo
    from torch._dynamo.utils import counters

    from pl_actsparse import ActivationSparsityCallback
    from pl_actsparse.demos.lightning_models import TinyStoriesLM

    class CompiledTinyStoriesLM(TinyStoriesLM):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.model = torch.compile(self.model, fullgraph=True)

    rng = random.Random(1)
    out: dict[str, Any] = {"backend": "inductor", "fullgraph": True, "target_ratio": 1.10, "by_threads": {}}
    initial_threads = torch.get_num_threads()
    for threads in [int(t) for t in str(args.compile_threads).split(",") if t.strip()]:
        torch.set_num_threads(threads)
        per_round: dict[str, list[float]] = {"dense": [], "sparse": []}
        stats: dict[str, Any] = {}
        for _ in range(args.compile_rounds):
            order = ["dense", "sparse"]
            rng.shuffle(order)
            for kind in order:
                torch._dynamo.reset()
                counters.clear()
                import lightning.pytorch as pl

                pl.seed_everything(0, verbose=False)
                timer = _StepTimer(skip=3)  # the first steps compile
                callbacks: list = [timer]
                if kind == "sparse":
                    callbacks.insert(
                        0,
                        ActivationSparsityCallback(
                            scopes=scopes, calibration_source="calibration_dataloader", gradient_mode="ste",
                            calibration={"progress": False}, verbose=False,
                        ),
                    )
                module = CompiledTinyStoriesLM(checkpoint=checkpoint, learning_rate=args.lr)
                trainer(callbacks, max_steps=args.compile_steps + 3, log_every_n_steps=50).fit(module, datamodule=datamodule())
                per_round[kind].append(statistics.median(timer.times))
                stats[kind] = {
                    "graph_breaks": sum(counters["graph_break"].values()),
                    "unique_graphs": int(counters["stats"]["unique_graphs"]),
                }
        ratios = [s / d for s, d in zip(per_round["sparse"], per_round["dense"])]
        out["by_threads"][str(threads)] = {
            "dense_s": round(statistics.median(per_round["dense"]), 4),
            "sparse_s": round(statistics.median(per_round["sparse"]), 4),
            "ratio": round(statistics.median(ratios), 3),
            "ratio_per_round": [round(r, 3) for r in ratios],
            "rounds": len(ratios),
            "timed_steps_each": args.compile_steps,
            "dynamo_last_round": stats,
        }
        log(f"compiled, {threads} thread(s): ratio {out['by_threads'][str(threads)]['ratio']} per round {ratios}")
    torch.set_num_threads(initial_threads)
    return out


class _StepTimer:
    """Wall time of each training batch, from after the callbacks' batch start (recalibration excluded) to
    after their batch end (tracking included); the first ``skip`` batches are warm-up."""

    def __new__(cls, skip: int = 2):  # built lazily so importing this file needs no Lightning
        import lightning.pytorch as pl

        class StepTimer(pl.Callback):
            def __init__(self) -> None:
                self.times: list[float] = []
                self.seen = 0
                self.t0 = 0.0

            def on_train_batch_start(self, *args: Any) -> None:
                self.t0 = time.perf_counter()

            def on_train_batch_end(self, *args: Any) -> None:
                self.seen += 1
                if self.seen > skip:
                    self.times.append(time.perf_counter() - self.t0)

        return StepTimer()


def _Progress(name: str, every: int = 50):  # noqa: N802 - built lazily like _StepTimer
    import lightning.pytorch as pl

    class Progress(pl.Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step % every == 0:
                log(f"{name}: step {trainer.global_step} at {time.strftime('%H:%M:%S')}")

    return Progress()


def _overall(counter: Any, model: torch.nn.Module) -> float:
    """Element-weighted achieved sparsity over every layer the counter saw."""
    zeroed = sum(float(z) for z in counter.zeroed.values())
    total = sum(counter.total.values())
    return zeroed / total if total else float("nan")


if __name__ == "__main__":
    main()
