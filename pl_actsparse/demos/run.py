"""The main job: sparsify the real stories260K model with the seed recipe and show what it costs.

Calibrates up/gate at 30% and down at 50% on stories 500-599, then prints dense vs sparse perplexity on
stories 0-149 (256-token windows), the per-layer report (achieved sparsity on the calibration data) and the
achieved sparsity on the held-out stories.

    python -m pl_actsparse.demos.run [--data DIR] [--calibration-batch-size 8]
"""

from __future__ import annotations

import argparse
import time

from pl_actsparse import activation_sparsity_report, sparsify_activations
from pl_actsparse.demos import SEED_RECIPE, calibration_batches
from pl_actsparse.demos.llama2c import Llama2cTokenizer, load_llama2c_checkpoint
from pl_actsparse.demos.tinystories import TokenWindows, load_stories, resolve_data_dir
from pl_actsparse.measure.metric import SparsityCounter
from pl_actsparse.tuning.objectives import perplexity


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pl_actsparse.demos run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="folder with stories260K.bin etc. (default: $PL_ACTSPARSE_DATA, else ../shared/data beside this repository)")
    parser.add_argument("--calibration-batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    data_dir = resolve_data_dir(args.data)
    print(f"data: {data_dir}")
    model = load_llama2c_checkpoint(data_dir / "stories260K.bin")
    tokenizer = Llama2cTokenizer.from_file(data_dir / "tok512.bin")
    calibration = calibration_batches(500, 600, batch_size=args.calibration_batch_size, tokenizer=tokenizer, data_dir=data_dir)
    evaluation = TokenWindows(load_stories(data_dir, 0, 150), tokenizer, seq_len=256)

    dense = perplexity(model, evaluation)
    print(f"dense perplexity on stories 0-149 ({len(evaluation)} windows of 256 tokens): {dense:.4f}")
    t0 = time.perf_counter()
    sparsify_activations(model, calibration, SEED_RECIPE)
    seconds = time.perf_counter() - t0
    report = activation_sparsity_report(model)
    print(f"\ncalibrated on stories 500-599 ({sum(len(b) for b in calibration)} windows, {len(calibration)} batches) in {seconds:.2f} s")
    print(report)
    with SparsityCounter(model) as heldout:
        sparse = perplexity(model, evaluation)
    print(f"\nsparse perplexity: {sparse:.4f} (dense {dense:.4f}, {100 * (sparse / dense - 1):+.1f}%)")
    print("achieved sparsity on the held-out stories 0-149:")
    for row in report.layers:
        print(f"  {row.name:<24} target {row.target:.2f}  calibration {row.calibration_sparsity:.4f}  held-out {heldout.sparsity()[row.name]:.4f}")


if __name__ == "__main__":
    main()
