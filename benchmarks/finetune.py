"""Sparsity-aware fine-tuning of stories260K through the Lightning callback (a benchmark, not a test).

Prints one JSON object on stdout (progress goes to stderr):

* perplexity on stories 0-149 (256-token windows): dense, training-free sparse (50% on every gate/up/down
  input, exact thresholds calibrated on stories 150-299), and after a short sparsity-aware fine-tune on
  stories 300-999 (disjoint from both) for each gradient mode;
* achieved sparsity before and after every recalibration (the weights drift, recalibration brings the
  layers back to target), and on the evaluation stories at the end;
* the training step time with the callback divided by the dense step time (same module, same data).

    python benchmarks/finetune.py [--steps 300] [--recalibrate-every 100] [--threads 2]

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
    sparsify_activations(dense_model, calibration, {TargetScope(patterns=[pattern]): 0.5}, progress=False)
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
            progress=False,
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
                        progress=False,
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
        "calibration_seconds": round(calibration_seconds, 2),
        "probe_to_beat": {"dense": 3.758, "training_free": 5.675, "ste_300_steps": 4.733, "masked_300_steps": 4.771},
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result, indent=1))
    return result


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
