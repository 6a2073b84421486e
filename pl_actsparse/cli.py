"""``pl-actsparse``: LightningCLI with activation-sparsity recipes.

    pl-actsparse validate --config recipes/stories260k_training_free.yaml
    pl-actsparse fit --config recipes/stories260k_finetune.yaml --trainer.max_epochs=2
    pl-actsparse fit --config recipes/stories260k_finetune.yaml trainer.max_steps=10   # omegaconf-style override

Any LightningModule / LightningDataModule can be named with ``class_path``; the package ships
:class:`~pl_actsparse.lightning_models.TinyStoriesLM`, :class:`~pl_actsparse.lightning_models.HFLlamaLM` and
:class:`~pl_actsparse.lightning_models.TinyStoriesDataModule`, so the recipes need no user code. The
parser runs in ``omegaconf`` mode: recipes may interpolate (``${data.init_args.seq_len}``).
"""

from __future__ import annotations

import re
import sys
import warnings
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI

__all__ = ["ActSparseCLI", "run", "main"]

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


def run(args: list[str] | dict[str, Any] | None = None) -> ActSparseCLI:
    """Run the CLI (``args`` as on the command line) and return it, e.g. to inspect ``cli.trainer``."""
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
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``pl-actsparse`` console script."""
    run(args)


if __name__ == "__main__":  # pragma: no cover
    main()
