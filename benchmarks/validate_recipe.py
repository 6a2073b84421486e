"""The main job's figures: ``pl-actsparse validate --config RECIPE`` (what ``make main`` runs), with the
validation metrics the Trainer logged printed as one JSON object.

    python benchmarks/validate_recipe.py [--config recipes/stories260k_training_free.yaml] [--out benchmarks/results/make_main.json]

``val/ppl`` is the sparse perplexity, ``val/ppl_dense`` the same model with sparsity switched off and
``actsparse/val/*`` the achieved sparsity on the validation text (docs/recipes.md).
"""

from __future__ import annotations

import argparse
import time

import torch

from pl_actsparse.lightning.cli import run

from _common import add_out_argument, emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/stories260k_training_free.yaml")
    add_out_argument(parser, "make_main")
    args = parser.parse_args()
    t0 = time.perf_counter()
    cli = run(["validate", "--config", args.config])  # the recipe's CSVLogger writes under outputs/
    metrics = {k: round(float(v), 4) for k, v in sorted(cli.trainer.callback_metrics.items())}
    emit({"benchmark": "validate_recipe", "recipe": args.config, "torch": torch.__version__,
          "threads": torch.get_num_threads(), "metrics": metrics, "seconds": round(time.perf_counter() - t0, 1)}, args.out)


if __name__ == "__main__":
    main()
