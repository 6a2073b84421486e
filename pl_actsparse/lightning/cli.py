"""``pl-actsparse``: LightningCLI with activation-sparsity recipes.

    pl-actsparse validate --config recipes/stories260k_training_free.yaml
    pl-actsparse fit --config recipes/stories260k_finetune.yaml --trainer.max_epochs=2
    pl-actsparse fit --config recipes/stories260k_finetune.yaml trainer.max_steps=10   # omegaconf-style override
    pl-actsparse generate --config recipes/stories260k_training_free.yaml --prompt "Once upon a time"
    pl-actsparse sweep --targets 0.3 0.5 --json sweep.json --plot sweep.png     # = python -m pl_actsparse.demos sweep
    pl-actsparse report CHECKPOINT.ckpt --prefix model. --out report/          # pl_actsparse.measure.report.main
    pl-actsparse report --demo --out report/                                   # = python -m pl_actsparse.demos report

Any LightningModule / LightningDataModule can be named with ``class_path``; the package ships
:class:`~pl_actsparse.demos.lightning_models.TinyStoriesLM`, :class:`~pl_actsparse.demos.lightning_models.HFLlamaLM` and
:class:`~pl_actsparse.demos.lightning_models.TinyStoriesDataModule`, so the recipes need no user code. The
parser runs in ``omegaconf`` mode: recipes may interpolate (``${data.init_args.seq_len}``).

``generate`` is the decode demo (not a Trainer method): it builds the recipe's model, data and
:class:`~pl_actsparse.lightning.callback.ActivationSparsityCallback`, calibrates with the callback's scopes on its
calibration data, exports the model for sparse decoding (:func:`~pl_actsparse.export.linear.export_for_inference`)
and prints the greedy continuation of a prompt by the dense and the sparse model, with their speeds
(:func:`~pl_actsparse.demos.generate.compare_decoding`). ``--sparsity 0`` must give back the dense text.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import warnings
from typing import Any, Iterable

from lightning.pytorch import LightningDataModule, LightningModule
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI

__all__ = ["ActSparseCLI", "run", "generate", "main"]

_QUIET = (
    # the data is an in-memory tensor: worker processes would only cost start-up time
    r".*does not have many workers.*",
    # metrics are logged from the callback's epoch-end hooks, where batch size inference has nothing to say
    r".*Trying to infer the `batch_size`.*",
    # a deprecation inside Lightning itself, nothing a recipe can change
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
)


class ActSparseCLI(LightningCLI):
    """LightningCLI whose subcommands accept bare ``key=value`` overrides after the options.

    ``pl-actsparse fit --config r.yaml trainer.max_steps=5`` is rewritten to ``--trainer.max_steps=5``,
    which is how recipes are overridden in CI and in the docs.
    """

    def parse_arguments(self, parser: Any, args: Any) -> None:
        if args is None:
            args = sys.argv[1:]
        if isinstance(args, (dict, Namespace)):
            self.config = parser.parse_object(args)
        else:
            self.config = parser.parse_args([_as_option(a) for a in args])


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def _as_option(arg: str) -> str:
    return f"--{arg}" if isinstance(arg, str) and _OVERRIDE.match(arg) else arg


def run(args: list[str] | dict[str, Any] | None = None, *, subcommand: bool = True) -> ActSparseCLI:
    """Run the CLI (``args`` as on the command line) and return it, e.g. to inspect ``cli.trainer``.

    ``subcommand=False`` only instantiates the recipe (``args`` then has no subcommand, e.g.
    ``["--config", "recipe.yaml"]``) and runs nothing.
    """
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    return ActSparseCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=subcommand,
    )


def _recipe_calibration_data(callback: Any, datamodule: Any, module: Any) -> Iterable[Any]:
    """The calibration batches the callback would use, resolved without a running Trainer."""
    from pl_actsparse.lightning.callback import CallbackConfigurationError, _first_loader

    found = callback.calibration_loader_without_trainer(datamodule, module)
    if found is not None:
        return found[0]
    stage = "train" if callback.calibration_source == "auto" else callback.calibration_source
    method = f"{stage}_dataloader"  # a stage source: its first num_calibration_batches batches
    for owner in (datamodule, module):
        if owner is not None and callable(getattr(owner, method, None)):
            return _first_loader(getattr(owner, method)())

    raise CallbackConfigurationError(
        f"generate: calibration_source={callback.calibration_source!r}: neither {type(datamodule).__name__} nor "
        f"{type(module).__name__} has {method}()"
    )


def generate(args: list[str] | None = None) -> Any:
    """The ``pl-actsparse generate`` subcommand; returns the :class:`~pl_actsparse.demos.generate.DecodeComparison`."""
    import torch

    from pl_actsparse import sparsify_activations
    from pl_actsparse.lightning.callback import ActivationSparsityCallback
    from pl_actsparse.demos.generate import compare_decoding
    from pl_actsparse.export.linear import export_for_inference
    from pl_actsparse.demos.llama2c import Llama2cModel, Llama2cTokenizer

    p = argparse.ArgumentParser(
        prog="pl-actsparse generate",
        description="Greedy decoding with the recipe's sparsified and exported model vs the dense model. Further "
        "key=value or --key=value arguments override the recipe (e.g. data.init_args.calibration_stories=[500,520]).",
    )
    p.add_argument("--config", required=True, help="a recipe (YAML) with an ActivationSparsityCallback and a llama2.c model")
    p.add_argument("--prompt", default="Once upon a time", help="text after BOS (default: %(default)r)")
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=100)
    p.add_argument("--sparsity", type=float, default=None, help="replace every scope's target (0: the dense text must come back)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each model, interleaved (default: 3)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    ns, overrides = p.parse_known_args(args if args is not None else sys.argv[2:])
    if ns.sparsity is not None and not 0.0 <= ns.sparsity <= 1.0:
        p.error(f"--sparsity must be in [0, 1], got {ns.sparsity}")
    if ns.max_new_tokens < 1 or ns.repeats < 1:
        p.error(f"--max_new_tokens and --repeats must be >= 1, got {ns.max_new_tokens} and {ns.repeats}")
    if ns.threads:
        torch.set_num_threads(ns.threads)

    cli = run(["--config", ns.config, *overrides], subcommand=False)
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, ActivationSparsityCallback)]
    if len(callbacks) != 1:
        raise SystemExit(f"pl-actsparse generate: {ns.config} must configure one ActivationSparsityCallback, found {len(callbacks)}")
    callback = callbacks[0]
    module = cli.model
    target = callback._module(module)
    net = getattr(module, "model", None)
    if not isinstance(net, Llama2cModel):
        raise SystemExit(
            f"pl-actsparse generate: needs a LightningModule whose .model is a llama2.c model (e.g. TinyStoriesLM), "
            f"got {type(module).__name__} with .model {type(net).__name__}"
        )
    targets = dict(callback.targets)
    if ns.sparsity is not None:
        targets = {scope: ns.sparsity for scope in targets}
    dense = copy.deepcopy(net).eval()
    calibration = _recipe_calibration_data(callback, cli.datamodule, module)
    module.eval()
    sparsify_activations(
        target,
        calibration,
        targets,
        callback.ignored_scope,
        num_calibration_batches=callback.num_calibration_batches,
        transform_fn=callback._inputs_fn(module),
        max_batches_in_flight=callback.max_batches_in_flight,
        progress=not ns.json,
    )
    export_for_inference(net)
    from pl_actsparse.demos.tinystories import resolve_data_dir

    tokenizer = getattr(cli.datamodule, "tokenizer", None) or Llama2cTokenizer.from_file(resolve_data_dir() / "tok512.bin")
    result = compare_decoding(dense, net, tokenizer, ns.prompt, ns.max_new_tokens, repeats=ns.repeats)
    print(json.dumps(result.to_dict(), indent=1) if ns.json else str(result))
    return result


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``pl-actsparse`` console script."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "generate":
        generate(argv[1:])
    elif argv and argv[0] == "sweep":  # the shipped-model demo
        from pl_actsparse.demos.__main__ import sweep_main

        sweep_main(argv[1:], prog="pl-actsparse sweep")
    elif argv and argv[0] == "report" and "--demo" in argv[1:]:
        from pl_actsparse.demos.__main__ import report_main as demo_report_main

        demo_report_main([a for a in argv[1:] if a != "--demo"], prog="pl-actsparse report --demo")
    elif argv and argv[0] == "report":
        from pl_actsparse.measure.report import main as report_main

        report_main(argv[1:], prog="pl-actsparse report")
    elif argv and argv[0] == "build-kernels":  # build the C++ kernels once, ahead of time (Makefile)
        from pl_actsparse.kernels import build_kernels_main

        raise SystemExit(build_kernels_main(argv[1:]))
    else:
        run(argv)


if __name__ == "__main__":  # pragma: no cover
    main()
