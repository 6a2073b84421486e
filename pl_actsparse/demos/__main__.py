"""Demo command lines on the shipped stories260K model: ``python -m pl_actsparse.demos {run,generate,sweep,report}``.

* ``run``: the seed recipe, dense vs sparse perplexity and the per-layer report (:mod:`pl_actsparse.demos.run`);
* ``generate``: greedy decoding, dense vs the recipe's sparsified and exported model, calibrated exactly as
  ``pl-actsparse validate`` calibrates on the same recipe (:func:`~pl_actsparse.demos.generate.generate_from_recipe`),
  e.g. ``python -m pl_actsparse.demos generate --config recipes/stories260k_training_free.yaml --prompt "Once"``;
* ``sweep``: perplexity on stories 0-149 at several targets from one calibration pass
  (:func:`~pl_actsparse.tuning.sweep.sweep_sparsity`), written as JSON and a PNG plot;
* ``report``: the seed recipe measured on stories 0-29 (:func:`~pl_actsparse.measure.report.model_report`),
  written as ``report.{md,html,png,json}``.

The library has no demo code and imports nothing from here.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

import torch

from pl_actsparse.config import CalibrationConfig
from pl_actsparse.core.scopes import TargetScope
from pl_actsparse.demos import SEED_RECIPE, calibration_batches
from pl_actsparse.demos.llama2c import Llama2cTokenizer, load_llama2c_checkpoint
from pl_actsparse.demos.tinystories import TokenWindows, load_stories
from pl_actsparse.errors import ActivationSparsityError, InvalidOptionError
from pl_actsparse.lightning.cli import show_library_logs

__all__ = ["main", "sweep_main", "report_main"]


def sweep_main(argv: Sequence[str] | None = None, prog: str = "python -m pl_actsparse.demos sweep") -> "SweepResult":  # noqa: F821
    """The sweep demo (see ``--help``); returns the :class:`~pl_actsparse.tuning.sweep.SweepResult`."""
    from pl_actsparse.tuning.sweep import perplexity_metric, sweep_sparsity

    p = argparse.ArgumentParser(
        prog=prog,
        description="Perplexity of the shipped stories260K model at several activation-sparsity targets, "
        "from one calibration pass. Writes JSON and a PNG plot.",
    )
    p.add_argument("--targets", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    p.add_argument("--patterns", nargs="+", default=[r".*mlp\..*_proj"], help="regexes (re.fullmatch) of layers to sweep")
    p.add_argument("--recalibrate", action="store_true", help="exact calibration at every point (N passes)")
    p.add_argument("--calibration-stories", type=int, nargs=2, default=[500, 600], metavar=("START", "STOP"))
    p.add_argument("--eval-stories", type=int, nargs=2, default=[0, 150], metavar=("START", "STOP"))
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size (windows)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--model", default=None, help="llama2.c checkpoint (default: shipped stories260K.bin)")
    p.add_argument("--json", default="sweep.json", help="output JSON path ('-' for stdout)")
    p.add_argument("--plot", default="sweep.png", help="output PNG path ('' to skip)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_llama2c_checkpoint(args.model, dtype=getattr(torch, args.dtype))
    tok = Llama2cTokenizer.from_file()
    calib = calibration_batches(*args.calibration_stories, seq_len=args.seq_len, batch_size=args.batch_size, tokenizer=tok)
    evaluation = TokenWindows(load_stories(start=args.eval_stories[0], stop=args.eval_stories[1]), tok, args.seq_len)
    result = sweep_sparsity(model, calib, args.targets, perplexity_metric(evaluation), TargetScope(patterns=args.patterns),
        calibration=CalibrationConfig(progress=True), recalibrate=args.recalibrate, metric_name="perplexity",
    )
    text = result.to_json(None if args.json == "-" else args.json)
    if args.json == "-":
        sys.stdout.write(text + "\n")
    else:
        logging.getLogger(__name__).info("wrote %s", args.json)
    if args.plot:
        result.plot(args.plot)
        logging.getLogger(__name__).info("wrote %s", args.plot)
    return result


def report_main(argv: Sequence[str] | None = None, prog: str = "python -m pl_actsparse.demos report") -> "SparsityReport":  # noqa: F821
    """The report demo: the seed recipe calibrated on stories 500-599, measured on stories 0-29."""
    from pl_actsparse.api import sparsify_activations
    from pl_actsparse.measure.report import model_report, write_report

    p = argparse.ArgumentParser(prog=prog, description="Activation-sparsity report of the shipped model with the seed recipe.")
    p.add_argument("--out", default="actsparse-report", help="output directory")
    p.add_argument("--no-files", action="store_true", help="only print the table")
    args = p.parse_args(argv)
    model = load_llama2c_checkpoint()
    sparsify_activations(model, calibration_batches(500, 600), SEED_RECIPE, calibration=CalibrationConfig(progress=False))
    report = model_report(model, calibration_batches(0, 30))
    report.source = "stories260K, seed recipe"
    write_report(report, None if args.no_files else args.out)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m pl_actsparse.demos {run,generate,sweep,report} ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    show_library_logs()
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(__doc__ + "\n")
        return
    demos = {"run": ("pl_actsparse.demos.run", "main"), "generate": ("pl_actsparse.demos.generate", "generate_from_recipe"),
             "sweep": (__name__, "sweep_main"), "report": (__name__, "report_main")}  # run and generate imported lazily
    try:  # a bad argument value or a missing file: one line and status 2, as argparse reports its own errors
        if argv[0] not in demos:
            raise InvalidOptionError(f"unknown demo {argv[0]!r}; choose run, generate, sweep or report")
        getattr(importlib.import_module(demos[argv[0]][0]), demos[argv[0]][1])(argv[1:])
    except (ActivationSparsityError, OSError) as exc:
        print(f"python -m pl_actsparse.demos{' ' + argv[0] if argv[0] in demos else ''}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
