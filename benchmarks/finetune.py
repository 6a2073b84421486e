"""Sparsity-aware fine-tuning of stories260K through the Lightning callback (a benchmark, not a test).

Prints one JSON object on stdout (progress goes to stderr):

* perplexity on stories 0-149 (256-token windows): dense, training-free sparse (50% on every gate/up/down
  input, exact thresholds calibrated on stories 150-299), and after a short sparsity-aware fine-tune on
  stories 300-999 (disjoint from both) for each gradient mode;
* achieved sparsity before and after every recalibration (the weights drift, recalibration brings the
  layers back to target), and on the evaluation stories at the end;
* the training step time with the callback divided by the dense step time (same module, same data);
* the same ratio under ``torch.compile`` (inductor): a compiled sparsified step over a compiled dense step,
  median of per-round ratios, for each of ``--compile-threads`` (target <= 1.10), with dynamo's graph,
  graph-break and recompile counts;
* a LoRA row: perplexity after the same number of steps with peft LoRA (r=16 on every MLP projection, only
  the adapters train) with the same sparsity, against full fine-tuning, and after merging the adapters.

    python benchmarks/finetune.py [--steps 300] [--recalibrate-every 100] [--threads 2]
    python benchmarks/finetune.py --steps 20 --modes ste --timing-rounds 0 --compile-rounds 2 --lora  # short

Every fine-tune goes through ``Trainer.fit`` with :class:`~pl_actsparse.ActivationSparsityCallback` and
:class:`~pl_actsparse.demos.lightning_models.TinyStoriesLM`, so the numbers are those of the shipped integration.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import warnings
from typing import Any

import torch


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of each fine-tune")
    parser.add_argument("--recalibrate-every", type=int, default=100, help="recalibrate every N steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1)
    parser.add_argument("--distillation", type=float, default=0.9, help="weight of the KL to the dense model")
    parser.add_argument("--modes", default="ste,masked")
    parser.add_argument("--timing-steps", type=int, default=12, help="timed steps per fit in the step-time part")
    parser.add_argument("--timing-rounds", type=int, default=5, help="rounds of the step-time part (each: dense, ste, masked in shuffled order)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--compile-rounds", type=int, default=5, help="rounds of the compiled step-time part (0: skip)")
    parser.add_argument("--compile-steps", type=int, default=12, help="timed steps per fit in the compiled part")
    parser.add_argument("--compile-threads", default="1,2", help="thread counts of the compiled part")
    parser.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True, help="run the LoRA row (needs peft)")
    parser.add_argument("--lora-lr", type=float, default=3e-3, help="peak learning rate of the LoRA run")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--data", default=None, help="data folder (default: $PL_ACTSPARSE_DATA or ../shared/data)")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    import lightning.pytorch as pl

    from pl_actsparse import ActivationSparsityCallback, TargetScope, activation_sparsity_report, sparsify_activations
    from pl_actsparse.demos.tinystories import TokenWindows, load_stories, resolve_data_dir
    from pl_actsparse.tuning.objectives import perplexity
    from pl_actsparse.demos.lightning_models import TinyStoriesDataModule, TinyStoriesLM
    from pl_actsparse.demos.llama2c import Llama2cTokenizer, load_llama2c_checkpoint
    from pl_actsparse.measure.metric import SparsityCounter

    started = time.perf_counter()
    data_dir = resolve_data_dir(args.data)
    checkpoint = str(data_dir / "stories260K.bin")
    tokenizer = Llama2cTokenizer.from_file(data_dir / "tok512.bin")
    evaluation = TokenWindows(load_stories(data_dir, 0, 150), tokenizer, seq_len=256)
    pattern = r".*mlp\.(gate|up|down)_proj"
    scopes = [{"patterns": [pattern], "sparsity": 0.5}]

    def datamodule() -> TinyStoriesDataModule:
        return TinyStoriesDataModule(
            data_dir=str(data_dir),
            seq_len=256,
            batch_size=args.batch_size,
            calibration_batch_size=8,
            train_stories=(300, 1000),
            calibration_stories=(150, 300),
            val_stories=(0, 150),
        )

    def trainer(callbacks: list, **kwargs: Any) -> pl.Trainer:
        return pl.Trainer(
            accelerator="cpu",
            devices=1,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            **kwargs,
        )

    # -- dense and training-free -------------------------------------------------------------------------
    pl.seed_everything(0, verbose=False)
    dense_model = load_llama2c_checkpoint(checkpoint)
    dense = perplexity(dense_model, evaluation)
    log(f"dense perplexity {dense:.4f} on {len(evaluation)} windows")
    calibration = [x for x, _ in datamodule().calibration_dataloader()]
    t0 = time.perf_counter()
    sparsify_activations(dense_model, calibration, {TargetScope(patterns=[pattern]): 0.5}, calibration={"progress": False})
    calibration_seconds = time.perf_counter() - t0
    with SparsityCounter(dense_model) as counter:
        training_free = perplexity(dense_model, evaluation)
    training_free_eval_sparsity = _overall(counter, dense_model)
    log(f"training-free sparse perplexity {training_free:.4f} (calibration {calibration_seconds:.2f} s)")
    del dense_model

    # -- sparsity-aware fine-tuning, one run per gradient mode ---------------------------------------------
    runs: dict[str, Any] = {}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        pl.seed_everything(0, verbose=False)
        callback = ActivationSparsityCallback(
            scopes=scopes,
            calibration_source="calibration_dataloader",
            recalibrate_every_n_steps=args.recalibrate_every,
            gradient_mode=mode,
            on_train_end="make_permanent",  # final thresholds calibrated on the final weights
            track=False,
            calibration={"progress": False},
            verbose=False,
        )
        module = TinyStoriesLM(
            checkpoint=checkpoint,
            learning_rate=args.lr,
            warmup_steps=args.warmup,
            min_lr_ratio=args.min_lr_ratio,
            distillation_weight=args.distillation,
        )
        t0 = time.perf_counter()
        trainer([callback], max_steps=args.steps, log_every_n_steps=50).fit(module, datamodule=datamodule())
        seconds = time.perf_counter() - t0
        with SparsityCounter(module.model) as counter:
            tuned = perplexity(module.model, evaluation)
        runs[mode] = {
            "perplexity": round(tuned, 4),
            "seconds": round(seconds, 1),
            "recalibrations": [
                {
                    "step": h["step"],
                    "reason": h["reason"],
                    "sparsity_before": None if h["sparsity_before"] is None else round(h["sparsity_before"], 4),
                    "sparsity_after": round(h["sparsity_after"], 4),
                }
                for h in callback.history
            ],
            "eval_sparsity": round(_overall(counter, module.model), 4),
            "max_layer_error_on_calibration_data": round(activation_sparsity_report(module.model).max_abs_error, 6),
        }
        log(f"{mode}: perplexity {tuned:.4f} after {args.steps} steps ({seconds:.0f} s); recalibrations {runs[mode]['recalibrations']}")

    # -- step time: the same module and data with and without the callback, alternating rounds --------------
    # A step of this model takes ~0.4 s and varies by +-15 % from fit to fit on a shared 2-core machine, so
    # the ratio is taken per round (median step of each fit, divided by the same round's dense fit), in
    # shuffled order, and the median over rounds is reported.
    timings: dict[str, list[float]] = {"dense": [], "ste": [], "masked": []}
    per_round: dict[str, list[float]] = {k: [] for k in timings}
    order_rng = random.Random(0)
    for round_ in range(args.timing_rounds if args.timing_steps > 0 else 0):
        order = list(timings)
        order_rng.shuffle(order)
        for kind in order:
            pl.seed_everything(0, verbose=False)
            timer = _StepTimer(skip=2)
            callbacks: list = []
            if kind != "dense":
                callbacks.append(
                    ActivationSparsityCallback(
                        scopes=scopes,
                        calibration_source="calibration_dataloader",
                        gradient_mode=kind,
                        calibration={"progress": False},
                        verbose=False,
                    )
                )
            module = TinyStoriesLM(checkpoint=checkpoint, learning_rate=args.lr)
            trainer(callbacks + [timer], max_steps=args.timing_steps + 2, log_every_n_steps=50).fit(module, datamodule=datamodule())
            timings[kind] += timer.times
            per_round[kind].append(statistics.median(timer.times))
    median = {k: statistics.median(v) if v else float("nan") for k, v in timings.items()}

    def round_ratio(kind: str) -> float:
        if not per_round[kind]:
            return float("nan")
        return statistics.median(a / b for a, b in zip(per_round[kind], per_round["dense"]))

    log("median step seconds", {k: round(v, 4) for k, v in median.items()})

    # -- LoRA: the same steps, sparsity and distillation, only rank-r adapters on every MLP projection train ----
    lora: dict[str, Any] | None = None
    if args.lora:
        from pl_actsparse.demos.peft_models import LoRATinyStoriesLM

        pl.seed_everything(0, verbose=False)
        callback = ActivationSparsityCallback(
            scopes=scopes,  # the seed pattern selects each adapted projection (base layer and LoRA branch)
            calibration_source="calibration_dataloader",
            recalibrate_every_n_steps=args.recalibrate_every,
            gradient_mode="ste",
            on_train_end="make_permanent",
            track=False,
            calibration={"progress": False},
            verbose=False,
        )
        module = LoRATinyStoriesLM(
            lora={"r": args.lora_rank, "lora_alpha": 2 * args.lora_rank},
            checkpoint=checkpoint,
            learning_rate=args.lora_lr,
            warmup_steps=args.warmup,
            min_lr_ratio=args.min_lr_ratio,
            distillation_weight=args.distillation,
        )
        trainable = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in module.model.parameters())
        t0 = time.perf_counter()
        trainer([callback], max_steps=args.steps, log_every_n_steps=50).fit(module, datamodule=datamodule())
        seconds = time.perf_counter() - t0
        with SparsityCounter(module.model) as counter:
            tuned = perplexity(module.model, evaluation)
        lora_eval_sparsity = _overall(counter, module.model)
        merged = module.merged_model()
        merged_ppl = perplexity(merged, evaluation)
        lora = {
            "perplexity": round(tuned, 4),
            "perplexity_after_merge": round(merged_ppl, 4),
            "rank": args.lora_rank,
            "learning_rate": args.lora_lr,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "seconds": round(seconds, 1),
            "eval_sparsity": round(lora_eval_sparsity, 4),
            "recalibrations": [
                {"step": h["step"], "sparsity_before": None if h["sparsity_before"] is None else round(h["sparsity_before"], 4), "sparsity_after": round(h["sparsity_after"], 4)}
                for h in callback.history
            ],
        }
        log(f"LoRA r={args.lora_rank}: perplexity {tuned:.4f} (merged {merged_ppl:.4f}) after {args.steps} steps ({seconds:.0f} s)")
        del module, merged

    # -- step time under torch.compile: compiled sparsified over compiled dense, per round, per thread count ----
    compiled = _compiled_step_times(args, trainer, datamodule, scopes, checkpoint) if args.compile_rounds > 0 else None

    result = {
        "benchmark": "sparsity-aware fine-tuning of stories260K (benchmarks/finetune.py)",
        "sparsity": 0.5,
        "layers": "gate_proj, up_proj, down_proj inputs of all 5 blocks (15 layers)",
        "data": {
            "evaluation": "stories 0-149, 256-token disjoint windows",
            "evaluation_windows": len(evaluation),
            "calibration": "stories 150-299, batches of 8 x 256 tokens",
            "fine_tuning": f"stories 300-999, batches of {args.batch_size} x 256 tokens",
        },
        "perplexity": {
            "dense": round(dense, 4),
            "training_free": round(training_free, 4),
            **{f"finetuned_{mode}": run["perplexity"] for mode, run in runs.items()},
        },
        "achieved_sparsity": {
            "training_free_on_evaluation": round(training_free_eval_sparsity, 4),
            **{f"{mode}_recalibrations": run["recalibrations"] for mode, run in runs.items()},
            **{f"{mode}_on_evaluation": run["eval_sparsity"] for mode, run in runs.items()},
        },
        "fine_tuning": {
            "steps": args.steps,
            "recalibrate_every_n_steps": args.recalibrate_every,
            "optimizer": f"AdamW lr {args.lr}, {args.warmup} warm-up steps, cosine to {args.min_lr_ratio} x lr",
            "distillation_weight": args.distillation,
            "seconds": {mode: run["seconds"] for mode, run in runs.items()},
        },
        "step_time": {
            "dense_s": round(median["dense"], 4),
            "callback_ste_s": round(median["ste"], 4),
            "callback_masked_s": round(median["masked"], 4),
            "ratio_ste": round(round_ratio("ste"), 3),
            "ratio_masked": round(round_ratio("masked"), 3),
            "ratio_per_round": {k: [round(a / b, 3) for a, b in zip(per_round[k], per_round["dense"])] for k in ("ste", "masked")},
            "target_ratio": 1.15,
            "rounds": len(per_round["dense"]),
            "timed_steps_each": len(timings["dense"]),
            "threads": torch.get_num_threads(),
        },
        "step_time_compiled": compiled,
        "lora": None
        if lora is None
        else {
            **lora,
            "full_finetuning_perplexity": {f"finetuned_{mode}": run["perplexity"] for mode, run in runs.items()},
            "setup": f"peft LoRA r={args.lora_rank} (alpha {2 * args.lora_rank}) on gate/up/down of every block, "
            "base weights frozen; same sparsity, steps, schedule and distillation as the full fine-tunes; ste",
        },
        "calibration_seconds": round(calibration_seconds, 2),
        "probe_to_beat": {"dense": 3.758, "training_free": 5.675, "ste_300_steps": 4.733, "masked_300_steps": 4.771},
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result, indent=1))
    return result


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


def _overall(counter: Any, model: torch.nn.Module) -> float:
    """Element-weighted achieved sparsity over every layer the counter saw."""
    zeroed = sum(float(z) for z in counter.zeroed.values())
    total = sum(counter.total.values())
    return zeroed / total if total else float("nan")


if __name__ == "__main__":
    main()
