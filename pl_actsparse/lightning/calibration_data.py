"""Where the callback's calibration batches come from, and how the model inputs are taken out of them.

:class:`CalibrationData` is the data source of :class:`~pl_actsparse.lightning.callback.ActivationSparsityCallback`:
an explicit iterable, a ``calibration_dataloader`` method, another named method, or a stage's dataloader, plus
how a batch becomes model inputs. *How* thresholds are calibrated (batch count, token mask, method, ...) is a
:class:`~pl_actsparse.config.CalibrationConfig`, checked by that class. :meth:`CalibrationData.resolve` finds the
data with or without a running Trainer (``python -m pl_actsparse.demos generate`` runs none), through public
Lightning hooks only.
"""

from __future__ import annotations

import difflib
import inspect
import itertools
import numbers
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from pl_actsparse.config import CalibrationConfig
from pl_actsparse.errors import ActivationSparsityError, CallbackConfigurationError

__all__ = ["CalibrationData", "STAGE_SOURCES", "config_error"]

STAGE_SOURCES = ("train", "val", "test", "predict")
_TRAINER_LOADERS = {"train": "train_dataloader", "val": "val_dataloaders", "test": "test_dataloaders", "predict": "predict_dataloaders"}


def config_error(argument: str, message: str, kind: type[ActivationSparsityError] = CallbackConfigurationError) -> ActivationSparsityError:
    """An error (a :class:`CallbackConfigurationError` unless ``kind`` says otherwise) about the callback's
    constructor ``argument`` (its YAML key below ``init_args``); ``pl-actsparse`` prints the key with the message."""
    error = kind(message)
    error.argument = argument  # type: ignore[attr-defined]
    return error


def first_loader(loaders: Any) -> Any:
    """One iterable out of what a ``*_dataloader`` hook may return (a list or dict of loaders)."""
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values())) if loaders else []
    if isinstance(loaders, (list, tuple)) and loaders and not isinstance(loaders[0], torch.Tensor) and hasattr(loaders[0], "__iter__"):
        return loaders[0]
    return loaders


def _method(owner: Any, name: str) -> Callable[[], Any] | None:
    """``owner.name`` if it is a method the user defined (Lightning's default ``*_dataloader`` hooks raise)."""
    fn = getattr(owner, name, None) if owner is not None else None
    default = any(isinstance(owner, p) and hasattr(p, name) and not is_overridden(name, owner, p) for p in (LightningModule, LightningDataModule))
    return None if default or not callable(fn) else fn


class CalibrationData:
    """The calibration data of a Lightning run: a source, and how to get model inputs out of a batch.

    Args:
        dataloader: an explicit iterable of calibration batches (then ``source`` must stay ``"auto"``).
        source: ``"auto"`` (a ``calibration_dataloader`` method of the datamodule or LightningModule if there is
            one, else the first ``config.num_batches`` training batches), ``"train"``/``"val"``/``"test"``/``"predict"``
            (that stage's dataloader), or the name of another datamodule/LightningModule method returning an iterable.
        input_key: index or key taking the model inputs out of a batch (``0`` for ``(x, y)``).
        config: the calibration options; ``num_batches`` and ``transform_fn`` are read here.

    Raises:
        CallbackConfigurationError: a source argument is invalid; the message and ``argument`` name the
            callback's argument (``calibration_source``, ``calibration_dataloader``, ``input_key``).
    """

    def __init__(
        self,
        dataloader: Iterable[Any] | None = None,
        source: str = "auto",
        input_key: int | str | None = None,
        config: CalibrationConfig = CalibrationConfig(),
    ) -> None:
        if not isinstance(source, str) or not (source == "auto" or source in STAGE_SOURCES or source.isidentifier()):
            raise config_error("calibration_source", "calibration_source must be 'auto', 'train', 'val', 'test', 'predict' or "
                               f"the name of a LightningDataModule/LightningModule method, got {source!r}")
        if dataloader is not None and source != "auto":
            raise config_error("calibration_dataloader", f"give either calibration_dataloader or calibration_source={source!r}, not both")
        if dataloader is not None and not hasattr(dataloader, "__iter__"):
            raise config_error("calibration_dataloader", "calibration_dataloader must be iterable (a DataLoader, a list of "
                               f"batches), got {type(dataloader).__qualname__}")
        if source in STAGE_SOURCES and config.num_batches is None:
            raise config_error("calibration", f"calibration_source={source!r} needs calibration.num_batches (calibrate on the "
                               f"first N batches of the {source} dataloader, not all of them)")
        if input_key is not None and (isinstance(input_key, bool) or not isinstance(input_key, (numbers.Integral, str))):
            raise config_error("input_key", f"input_key must be an int index, a str key or None, got {input_key!r}")
        if config.transform_fn is not None and input_key is not None:
            raise config_error("input_key", "give either input_key or calibration.transform_fn, not both")
        self.dataloader, self.source, self.input_key, self.config = dataloader, source, input_key, config

    def __repr__(self) -> str:
        return f"CalibrationData(source={self.source!r}, input_key={self.input_key!r}, explicit_dataloader={self.dataloader is not None})"

    def resolve(self, datamodule: Any, pl_module: Any, trainer: Any = None) -> tuple[Iterable[Any], str]:
        """The calibration data and a description of where it came from.

        A stage source calls ``<stage>_dataloader()`` of the datamodule or LightningModule; only when neither
        defines it, the dataloaders given to the running ``trainer`` (its public ``train_dataloader``,
        ``val_dataloaders``, ... once Lightning has set them up) are used.

        Raises:
            CallbackConfigurationError: the named method does not exist, ``"auto"`` finds nothing to use, or
                the stage's dataloader is not available.
        """
        if self.dataloader is not None:
            return self.dataloader, "calibration_dataloader"
        owners = [o for o in (datamodule, pl_module) if o is not None]
        source = self.source
        if source == "auto":
            for owner in owners:
                if (fn := _method(owner, "calibration_dataloader")) is not None:
                    return first_loader(fn()), f"{type(owner).__name__}.calibration_dataloader()"
            if self.config.num_batches is None:
                raise config_error("calibration_source", "no calibration data: there is no calibration_dataloader (argument, or "
                                   "method of the datamodule or LightningModule), and calibrating on the first training batches "
                                   "needs calibration.num_batches")
            source = "train"
        method = f"{source}_dataloader" if source in STAGE_SOURCES else source
        for owner in owners:
            if (fn := _method(owner, method)) is not None:
                return first_loader(fn()), f"the {source} dataloader" if source in STAGE_SOURCES else f"{type(owner).__name__}.{method}()"
        if source in ("train", "val") and trainer is not None and getattr(trainer, _TRAINER_LOADERS[source], None) is None \
                and getattr(getattr(trainer, "state", None), "fn", None) == "fit":
            # dataloaders passed to trainer.fit(...) are set up by the fit loop after on_fit_start: set them up now
            # (the loop's setup_data is idempotent: fit_loop.run() keeps what is set up)
            (trainer.fit_loop if source == "train" else trainer.fit_loop.epoch_loop.val_loop).setup_data()
        loaders = getattr(trainer, _TRAINER_LOADERS[source], None) if source in STAGE_SOURCES and trainer is not None else None
        if loaders is not None:
            return first_loader(loaders), f"the {source} dataloader"
        names = [type(o).__name__ for o in owners]
        who = f"neither {' nor '.join(names)} has a" if len(names) > 1 else f"{names[0]} has no" if names else "there is no"
        known = sorted({n for o in owners for n in dir(o) if n.endswith("dataloader") and _method(o, n) is not None})
        close = difflib.get_close_matches(method, known, n=1, cutoff=0.85)
        raise config_error("calibration_source", f"calibration_source={self.source!r}: {who} method {method!r}"
                           f"{f' (did you mean {close[0]!r}?)' if close else ''}, and the run has no such dataloader; "
                           "pass calibration_dataloader or define the method")

    def batches(self, loader: Iterable[Any], world_size: int = 1, rank: int = 0) -> Iterator[Any]:
        """This rank's share of the first ``config.num_batches`` items of ``loader``, round-robin over ranks, so the
        union over ranks is the data a single process calibrates on, whatever the number of processes."""
        return (item for i, item in enumerate(itertools.islice(loader, self.config.num_batches)) if i % world_size == rank)

    def inputs_fn(self, pl_module: Any, model: nn.Module | None = None) -> Callable[[Any], Any] | None:
        """The function batch -> model inputs: ``config.transform_fn``, else ``batch[input_key]``, else the
        LightningModule's ``calibration_inputs(batch)`` method, else the batch as it is.

        A tuple (dict) batch as it is goes in as positional (keyword) arguments; one ``model.forward`` cannot take (a
        ``TensorDataset`` ``(x, y)`` for ``forward(x)``, a dict with ``labels``), or an ``input_key`` the batch lacks, is a
        :class:`CallbackConfigurationError` naming ``input_key`` instead of a ``TypeError`` deep inside the model.
        """
        if self.config.transform_fn is not None:
            return self.config.transform_fn
        if (key := self.input_key) is not None:
            def take(batch: Any) -> Any:
                try:
                    return batch[key]
                except (KeyError, IndexError, TypeError):
                    keys = list(batch) if isinstance(batch, Mapping) else f"{len(batch)} items" if isinstance(batch, (tuple, list)) else "no keys"
                    raise config_error("input_key", f"input_key={key!r} is not in the calibration batch, a {type(batch).__name__} "
                                       f"with {keys}: set input_key to one of them") from None
            return take
        hook = getattr(pl_module, "calibration_inputs", None)
        if callable(hook):
            return hook
        target = model if model is not None else pl_module
        return _ArityChecked(target) if isinstance(target, nn.Module) else None

    def loss_fn(self, pl_module: Any) -> Callable[[Any, Any, Any], Any] | None:
        """The loss of ``allocation="auto"``/``"fisher"``: ``config.loss_fn``, else the LightningModule's method
        ``calibration_loss(output, batch, mask) -> (summed loss, count)`` (YAML runs of a model that is no causal LM)."""
        hook = getattr(pl_module, "calibration_loss", None)
        return self.config.loss_fn if self.config.loss_fn is not None or not callable(hook) else hook


class _ArityChecked:
    """The batch as it is, after checking that a tuple (dict) batch fits ``model.forward``'s positional (keyword) arguments."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        try:
            self.signature: inspect.Signature | None = inspect.signature(model.forward)
        except (TypeError, ValueError):  # builtins, C extensions: nothing to check
            self.signature = None
        self.checked: set[Any] = set()  # lengths of tuple batches, key sets of dict batches

    def __call__(self, batch: Any) -> Any:
        named = isinstance(batch, Mapping)
        marker = frozenset(batch) if named else len(batch) if isinstance(batch, (tuple, list)) else None
        if self.signature is not None and marker is not None and marker not in self.checked:
            try:
                self.signature.bind(**batch) if named else self.signature.bind(*batch)
            except TypeError:
                what = (f"a {type(batch).__name__} with keys {list(batch)}, passed as keyword" if named else f"a {type(batch).__name__} of "
                        f"{len(batch)} items ({', '.join(type(b).__name__ for b in batch)}), passed as positional")
                key = next((k for k in batch if k in self.signature.parameters), next(iter(batch), None)) if named else 0
                raise CallbackConfigurationError(
                    f"a calibration batch is {what} arguments to {type(self.model).__name__}.forward{self.signature}, which does not take "
                    f"them: set input_key (e.g. input_key={key!r} for the model inputs), calibration.transform_fn, "
                    "or define calibration_inputs(batch) on the LightningModule"
                ) from None
            self.checked.add(marker)
        return batch
