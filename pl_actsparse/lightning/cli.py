"""``pl-actsparse``: LightningCLI with activation-sparsity recipes.

    pl-actsparse validate --config recipes/stories260k_training_free.yaml
    pl-actsparse fit --config recipes/stories260k_finetune.yaml --trainer.max_epochs=2
    pl-actsparse fit --config recipes/stories260k_finetune.yaml trainer.max_steps=10   # omegaconf-style override
    pl-actsparse report CHECKPOINT.ckpt --prefix model. --out report/          # pl_actsparse.measure.report.main
    pl-actsparse build-kernels                                                  # the C++ kernels, ahead of time

Any LightningModule / LightningDataModule can be named with ``class_path`` (the recipes use the demo modules
of :mod:`pl_actsparse.demos.lightning_models`, so they need no user code). The parser runs in ``omegaconf``
mode: recipes may interpolate (``${data.init_args.seq_len}``). The decode, sweep and report demos on the
shipped model are ``python -m pl_actsparse.demos {generate,sweep,report}``; this module imports no demo.

Configuration errors of an :class:`~pl_actsparse.lightning.callback.ActivationSparsityCallback` in a recipe
(a sparsity of 1.5, a misspelt argument or scope key) are printed as one line naming the YAML key, e.g.
``pl-actsparse fit: error: trainer.callbacks[0].init_args.scopes[1].sparsity: target sparsity for scopes[1]
must be in [0, 1], got 1.5``, and the command exits with status 2, like jsonargparse's own errors.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, NoReturn

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from pl_actsparse.errors import ActivationSparsityError, ConflictingScopesError, UnmatchedScopeError, UnsupportedModuleError

__all__ = ["ActSparseCLI", "run", "main", "SUBCOMMANDS"]

_QUIET = (
    # the data is an in-memory tensor: worker processes would only cost start-up time
    r".*does not have many workers.*",
    # metrics are logged from the callback's epoch-end hooks, where batch size inference has nothing to say
    r".*Trying to infer the `batch_size`.*",
    # a deprecation inside Lightning itself, nothing a recipe can change
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
)
_TRAINER_SUBCOMMANDS = ("fit", "validate", "test", "predict")


class ActSparseCLI(LightningCLI):
    """LightningCLI whose subcommands accept bare ``key=value`` overrides after the options, and which reports
    configuration errors of the activation-sparsity callback in one line naming the YAML key (exit status 2).

    ``pl-actsparse fit --config r.yaml trainer.max_steps=5`` is rewritten to ``--trainer.max_steps=5``,
    which is how recipes are overridden in CI and in the docs.
    """

    def parse_arguments(self, parser: Any, args: Any) -> None:
        if args is None:
            args = sys.argv[1:]
        if isinstance(args, (dict, Namespace)):
            self.config = parser.parse_object(args)
            return
        args = [f"--{a}" if isinstance(a, str) and _OVERRIDE.match(a) else a for a in args]
        sub = next((a for a in args if a in _TRAINER_SUBCOMMANDS), None)
        # before jsonargparse, whose report of a bad callback argument is a page of union-type alternatives
        check_callback_configuration(args, prog="pl-actsparse" + (f" {sub}" if sub else ""))
        self.config = parser.parse_args(args)

    def instantiate_classes(self) -> None:
        self._one_line(super().instantiate_classes)

    def _run_subcommand(self, subcommand: str) -> None:
        self._one_line(super()._run_subcommand, subcommand, errors=(UnmatchedScopeError, ConflictingScopesError, UnsupportedModuleError))

    def _one_line(self, fn: Callable[..., None], *args: Any, errors: tuple[type[BaseException], ...] = (ActivationSparsityError, FileNotFoundError)) -> None:
        """``fn(*args)``; one of ``errors`` (a bad callback argument, scopes that match no layer of the model, a
        missing data file) as one line naming the YAML key where there is one, exit status 2."""
        try:
            fn(*args)
        except (ValueError, OSError) as exc:
            cause = _cause_of(exc, errors)
            if cause is None:
                raise
            sub = self.config.get("subcommand") if isinstance(self.config, Namespace) else None
            config = self.config.get(sub) if sub else self.config  # the one ActivationSparsityCallback in trainer.callbacks
            callbacks = config.get("trainer.callbacks") if isinstance(config, Namespace) else None
            found = [i for i, c in enumerate(callbacks or []) if isinstance(c, Namespace) and _is_sparsity_callback(c.get("class_path"))]
            where, key = "trainer.callbacks" + (f"[{found[0]}].init_args" if len(found) == 1 else ""), getattr(cause, "argument", None)
            _exit_with_config_error("pl-actsparse" + (f" {sub}" if sub else ""), None if isinstance(cause, OSError) else f"{where}.{key}" if key else where, cause)


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def _cause_of(exc: BaseException | None, errors: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first of ``errors`` behind a jsonargparse/Lightning wrapper, if there is one."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, errors):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _exit_with_config_error(prog: str, key: str | None, error: BaseException) -> NoReturn:
    print(f"{prog}: error: {key + ': ' if key else ''}{error}", file=sys.stderr)
    raise SystemExit(2)


def _config_files(args: list[str]) -> list[Path]:
    given = [a.split("=", 1)[1] if a.startswith("--config=") else b for a, b in zip(args, args[1:] + [None]) if a.startswith("--config=") or a in ("--config", "-c")]
    return [Path(f) for f in given if f is not None]


def _is_sparsity_callback(class_path: Any) -> bool:
    return isinstance(class_path, str) and class_path.rsplit(".", 1)[-1] == "ActivationSparsityCallback"


def check_callback_configuration(args: list[str], prog: str = "pl-actsparse") -> None:
    """Construct every ``ActivationSparsityCallback`` of the recipes in ``args`` (``--config`` files) from
    its YAML ``init_args``; on a configuration error print ``<prog>: error: <YAML key>: <message>`` to stderr
    and exit with status 2. Values that only jsonargparse can build (``class_path`` objects, import paths,
    interpolations) are left to it, and so is an error about an argument this file does not give (it may
    come from another file or the command line). Files that cannot be read are left to jsonargparse too.

    Raises:
        SystemExit: with code 2, on a configuration error of the callback.
    """
    import yaml

    from pl_actsparse.lightning.callback import ActivationSparsityCallback

    params = [p for p in inspect.signature(ActivationSparsityCallback.__init__).parameters if p != "self"]
    for path in _config_files(args):
        try:
            config = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        callbacks = ((config or {}).get("trainer") or {}).get("callbacks") if isinstance(config, dict) else None
        callbacks = [callbacks] if isinstance(callbacks, dict) else callbacks
        for i, entry in enumerate(callbacks if isinstance(callbacks, list) else []):
            init_args = (entry.get("init_args") or {}) if isinstance(entry, dict) and _is_sparsity_callback(entry.get("class_path")) else None
            if not isinstance(init_args, dict):
                continue
            base, unknown = f"trainer.callbacks[{i}].init_args", [k for k in init_args if k not in params]
            if unknown:
                hint = "".join(f" (did you mean {c!r}?)" for c in difflib.get_close_matches(unknown[0], params, n=1))
                _exit_with_config_error(prog, f"{base}.{unknown[0]}", f"ActivationSparsityCallback has no argument {unknown[0]!r}{hint}")
            kwargs = {k: plain for k, v in init_args.items() if not _needs_jsonargparse(plain := _plain_specs(v))}
            try:
                ActivationSparsityCallback(**kwargs)
            except ActivationSparsityError as exc:
                key = getattr(exc, "argument", None) or ""
                if re.split(r"[.\[]", key)[0] in kwargs:
                    _exit_with_config_error(prog, f"{base}.{key}", exc)


def _plain_specs(value: Any) -> Any:
    """``{class_path: ...ScopeSpec, init_args: {...}}`` entries (also in lists) as the plain mappings the
    callback accepts."""
    if isinstance(value, list):
        return [_plain_specs(v) for v in value]
    if isinstance(value, dict) and str(value.get("class_path", "")).rsplit(".", 1)[-1] in ("ScopeSpec", "IgnoredScopeSpec"):
        return dict(value.get("init_args") or {})
    return value


_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


def _needs_jsonargparse(value: Any) -> bool:
    """Whether jsonargparse turns (part of) ``value`` into an object: a ``class_path`` mapping, an import path
    (``mypackage.inputs`` where ``mypackage`` can be imported; a module name such as ``encoder.fc`` is not
    one) or an interpolation (``${...}``), at any depth."""
    if isinstance(value, dict):
        return "class_path" in value or any(_needs_jsonargparse(v) for v in value.values())
    if isinstance(value, list):
        return any(_needs_jsonargparse(v) for v in value)
    return isinstance(value, str) and ("${" in value or (_IMPORT_PATH.match(value) is not None and importlib.util.find_spec(value.split(".")[0]) is not None))


def run(args: list[str] | dict[str, Any] | None = None, *, subcommand: bool = True) -> ActSparseCLI:
    """Run the CLI (``args`` as on the command line) and return it, e.g. to inspect ``cli.trainer``.

    ``subcommand=False`` only instantiates the recipe (``args`` then has no subcommand, e.g.
    ``["--config", "recipe.yaml"]``) and runs nothing.

    Raises:
        SystemExit: status 2 on configuration errors (jsonargparse's, and the callback's in one line).
    """
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    return ActSparseCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                        parser_kwargs={"parser_mode": "omegaconf"}, save_config_kwargs={"overwrite": True}, args=args, run=subcommand)


SUBCOMMANDS: dict[str, Callable[[list[str]], Any]] = {
    "report": lambda args: importlib.import_module("pl_actsparse.measure.report").main(args, prog="pl-actsparse report"),
    "build-kernels": lambda args: sys.exit(importlib.import_module("pl_actsparse.kernels").build_kernels_main(args)),
}
"""Subcommands that are not Trainer methods: name -> function of the remaining arguments (``report``:
:func:`pl_actsparse.measure.report.main`; ``build-kernels``: build the C++ kernels ahead of time, the Makefile runs
it). Anything else goes to the LightningCLI (``fit``, ``validate``, ``test``, ``predict``)."""


def show_library_logs() -> None:
    """For applications: the ``pl_actsparse`` logger's INFO records on stderr, once, unless logging is configured
    (a handler on the root logger). Not via the root logger: Lightning's ``lightning`` logger has its own handler and
    propagates, so a root handler would print each of its lines twice."""
    lib = logging.getLogger("pl_actsparse")
    if not logging.root.handlers and not any(isinstance(h, logging.StreamHandler) for h in lib.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        lib.addHandler(handler)
        lib.propagate = False
    lib.setLevel(logging.INFO)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``pl-actsparse`` console script (an application: it shows the ``pl_actsparse`` logger's
    INFO tables on stderr when nothing else configured logging)."""
    show_library_logs()
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help") or (argv[0][0] != "-" and argv[0] not in [*_TRAINER_SUBCOMMANDS, *SUBCOMMANDS]):
        print("subcommands: fit, validate, test, predict (the Trainer's: LightningCLI's usage below), report CHECKPOINT (the report "
              "of a sparsified checkpoint: report --help), build-kernels (the C++ kernels, ahead of time)\n")  # LightningCLI lists its own only
    if argv and argv[0] in SUBCOMMANDS:
        SUBCOMMANDS[argv[0]](argv[1:])
    else:
        run(argv)


if __name__ == "__main__":  # pragma: no cover
    main()
