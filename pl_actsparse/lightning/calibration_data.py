"""Where the callback's calibration batches come from, and how the model inputs are taken out of them.

:class:`CalibrationData` is the calibration part of :class:`~pl_actsparse.lightning.callback.ActivationSparsityCallback`'s
configuration as a small validated object. The callback resolves it with a running ``Trainer``
(:meth:`CalibrationData.resolve`); ``pl-actsparse generate`` and other tools resolve it without one
(:meth:`CalibrationData.loader_without_trainer`).
"""

from __future__ import annotations

import inspect
import numbers
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from pl_actsparse.core.masking import resolve_mask_fn
from pl_actsparse.config import CalibrationConfig
from pl_actsparse.errors import CallbackConfigurationError, InvalidOptionError, InvalidTargetError

__all__ = ["CalibrationData", "STAGE_SOURCES"]

STAGE_SOURCES = ("train", "val", "test", "predict")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int_or_none(value: Any, name: str) -> int | None:
    """``value`` as an int >= 1, or None; raises :class:`CallbackConfigurationError` naming ``name`` otherwise."""
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise CallbackConfigurationError(f"{name} must be a positive integer or None, got {value!r}")
    return int(value)


def first_loader(loaders: Any) -> Any:
    """One iterable out of what a ``*_dataloader`` hook may return (a list or dict of loaders)."""
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values())) if loaders else []
    if isinstance(loaders, (list, tuple)) and loaders and not isinstance(loaders[0], torch.Tensor) and hasattr(loaders[0], "__iter__"):
        return loaders[0]
    return loaders


def shard(loader: Iterable[Any], limit: int | None, world_size: int, rank: int) -> Iterator[Any]:
    """The first ``limit`` items of ``loader`` split round-robin over ranks, so the union over ranks is the
    same data a single process calibrates on, whatever the number of processes."""
    for i, item in enumerate(loader):
        if limit is not None and i >= limit:
            break
        if i % world_size == rank:
            yield item


class CalibrationData:
    """The calibration data of a Lightning run: a source, how many batches, and how to get model inputs.

    Args:
        dataloader: an explicit iterable of calibration batches (then ``source`` must stay ``"auto"``).
        source: ``"auto"`` (a ``calibration_dataloader`` method of the datamodule or LightningModule if there is
            one, else the first ``num_batches`` training batches), ``"train"``/``"val"``/``"test"``/``"predict"``
            (that stage's dataloader), or the name of another datamodule/LightningModule method returning an iterable.
        num_batches: use the first N batches (all when None; required for the stage dataloaders).
        max_batches_in_flight: lockstep group size that caps calibration memory (see ``docs/calibration.md``).
        input_key: index or key taking the model inputs out of a batch (``0`` for ``(x, y)``).
        transform_fn: a callable batch -> model inputs (excludes ``input_key``).
        token_mask: ``"auto"`` (a dict batch's ``attention_mask`` masks padding), None (count every element)
            or a callable batch -> bool mask ``[batch, seq]``; passed to the calibration functions.
        calibration: ``"auto"``, ``"sequential"`` (block by block from a cache of block inputs, one batch in flight
            inside a block) or ``"lockstep"`` (the whole model, every batch in flight); see ``docs/calibration.md``.
        offload: where the sequential mode keeps its cache: ``None`` (with the model), ``"cpu"`` or ``"disk"``.

    Raises:
        CallbackConfigurationError: an argument is invalid; the message uses the callback's argument names
            (``calibration_source``, ``num_calibration_batches``, ...).
    """

    def __init__(
        self,
        dataloader: Iterable[Any] | None = None,
        source: str = "auto",
        num_batches: int | None = None,
        max_batches_in_flight: int | None = None,
        input_key: int | str | None = None,
        transform_fn: Callable[[Any], Any] | None = None,
        token_mask: str | Callable[[Any], Any] | None = "auto",
        calibration: str = "auto",
        offload: str | None = None,
    ) -> None:
        if not isinstance(source, str) or not (source == "auto" or source in STAGE_SOURCES or source.isidentifier()):
            raise CallbackConfigurationError(
                "calibration_source must be 'auto', 'train', 'val', 'test', 'predict' or the name of a "
                f"LightningDataModule/LightningModule method, got {source!r}"
            )
        if dataloader is not None:
            if source != "auto":
                raise CallbackConfigurationError(f"give either calibration_dataloader or calibration_source={source!r}, not both")
            if not hasattr(dataloader, "__iter__"):
                raise CallbackConfigurationError(
                    f"calibration_dataloader must be iterable (a DataLoader, a list of batches), got {type(dataloader).__qualname__}"
                )
        self.dataloader = dataloader
        self.source = source
        self.num_batches = positive_int_or_none(num_batches, "num_calibration_batches")
        self.max_batches_in_flight = positive_int_or_none(max_batches_in_flight, "max_batches_in_flight")
        if source in STAGE_SOURCES and self.num_batches is None:
            raise CallbackConfigurationError(
                f"calibration_source={source!r} needs num_calibration_batches (calibrate on the first N "
                f"batches of the {source} dataloader, not all of them)"
            )
        if input_key is not None and not (_is_int(input_key) or isinstance(input_key, str)):
            raise CallbackConfigurationError(f"input_key must be an int index, a str key or None, got {input_key!r}")
        if transform_fn is not None and not callable(transform_fn):
            raise CallbackConfigurationError(f"transform_fn must be callable or None, got {transform_fn!r}")
        if transform_fn is not None and input_key is not None:
            raise CallbackConfigurationError("give either input_key or transform_fn, not both")
        try:
            resolve_mask_fn(token_mask)  # type: ignore[arg-type]
        except TypeError as exc:
            raise CallbackConfigurationError(str(exc)) from None
        try:
            CalibrationConfig(method=calibration, offload=offload)
        except InvalidOptionError as exc:
            raise CallbackConfigurationError(str(exc)) from None
        self.input_key = input_key
        self.transform_fn = transform_fn
        self.token_mask = token_mask
        self.calibration = calibration
        self.offload = offload

    def __repr__(self) -> str:
        return (
            f"CalibrationData(source={self.source!r}, num_batches={self.num_batches}, input_key={self.input_key!r}, "
            f"explicit_dataloader={self.dataloader is not None})"
        )

    # -- where the batches come from -------------------------------------------------------------------

    def loader_without_trainer(self, datamodule: Any, pl_module: Any) -> tuple[Iterable[Any], str] | None:
        """The calibration data and where it came from, when no running Trainer is needed to find it.

        ``None`` means the source is a stage's dataloader (``"train"``, ``"val"``, ...; also ``"auto"``
        without a ``calibration_dataloader`` method), which only a running Trainer resolves.

        Raises:
            CallbackConfigurationError: the named method does not exist, or ``"auto"`` finds nothing to use.
        """
        if self.dataloader is not None:
            return self.dataloader, "calibration_dataloader"
        source = self.source
        if source == "auto":
            for owner in (datamodule, pl_module):
                if owner is not None and callable(getattr(owner, "calibration_dataloader", None)):
                    return first_loader(owner.calibration_dataloader()), f"{type(owner).__name__}.calibration_dataloader()"
            if self.num_batches is None:
                raise CallbackConfigurationError(
                    "no calibration data: there is no calibration_dataloader (argument, or method of the datamodule or "
                    "LightningModule), and calibrating on the first training batches needs num_calibration_batches"
                )
            return None
        if source in STAGE_SOURCES:
            return None
        for owner in (datamodule, pl_module):
            if owner is not None and callable(getattr(owner, source, None)):
                return first_loader(getattr(owner, source)()), f"{type(owner).__name__}.{source}()"
        raise CallbackConfigurationError(
            f"calibration_source={source!r}: neither the datamodule "
            f"({type(datamodule).__name__ if datamodule is not None else 'none'}) nor {type(pl_module).__name__} "
            f"has a method {source!r}"
        )

    def loader_from_hooks(self, datamodule: Any, pl_module: Any) -> tuple[Iterable[Any], str]:
        """Like :meth:`loader_without_trainer`, resolving a stage source by calling ``<stage>_dataloader()``
        of the datamodule or LightningModule directly (for tools that run no Trainer, e.g. ``generate``).

        Raises:
            CallbackConfigurationError: neither object defines the stage's dataloader method.
        """
        found = self.loader_without_trainer(datamodule, pl_module)
        if found is not None:
            return found
        stage = "train" if self.source == "auto" else self.source
        method = f"{stage}_dataloader"
        for owner in (datamodule, pl_module):
            if owner is not None and callable(getattr(owner, method, None)):
                return first_loader(getattr(owner, method)()), f"{type(owner).__name__}.{method}()"
        raise CallbackConfigurationError(
            f"calibration_source={self.source!r}: neither {type(datamodule).__name__} nor {type(pl_module).__name__} has {method}()"
        )

    def resolve(self, trainer: Any, pl_module: Any) -> tuple[Iterable[Any], str]:
        """The calibration data of a running Trainer and a description of where it came from.

        Raises:
            CallbackConfigurationError: the source's dataloader is not available in this run.
        """
        found = self.loader_without_trainer(getattr(trainer, "datamodule", None), pl_module)
        if found is not None:
            return found
        source = "train" if self.source == "auto" else self.source
        loop = {
            "train": trainer.fit_loop,
            "val": trainer.fit_loop.epoch_loop.val_loop if trainer.state.fn == "fit" else trainer.validate_loop,
            "test": trainer.test_loop,
            "predict": trainer.predict_loop,
        }[source]
        data_source = loop._data_source  # Lightning has no public accessor for a loop's dataloader source
        if not data_source.is_defined():
            raise CallbackConfigurationError(
                f"calibration_source={source!r}: the {source} dataloader is not available in this run; pass "
                "calibration_dataloader, or a datamodule/LightningModule that defines it"
            )
        return first_loader(data_source.dataloader()), f"the {source} dataloader"

    def batches(self, loader: Iterable[Any], world_size: int = 1, rank: int = 0) -> Iterator[Any]:
        """This rank's share of the first ``num_batches`` items of ``loader`` (round-robin over ranks)."""
        return shard(loader, self.num_batches, world_size, rank)

    # -- model inputs out of a batch -------------------------------------------------------------------

    def inputs_fn(self, pl_module: Any, model: nn.Module | None = None) -> Callable[[Any], Any] | None:
        """The function batch -> model inputs: ``transform_fn``, else ``batch[input_key]``, else the
        LightningModule's ``calibration_inputs(batch)`` method, else the batch as it is.

        With the batch as it is, a tuple/list batch is passed as positional arguments; when ``model.forward``
        cannot take that many, the error names the ``input_key`` option (a ``TensorDataset`` batch ``(x, y)``
        fed to ``forward(x)``) instead of a ``TypeError`` deep inside the model.
        """
        if self.transform_fn is not None:
            return self.transform_fn
        if self.input_key is not None:
            key = self.input_key
            return lambda batch: batch[key]
        hook = getattr(pl_module, "calibration_inputs", None)
        if callable(hook):
            return hook
        target = model if model is not None else pl_module
        if isinstance(target, nn.Module):
            return _ArityChecked(target)
        return None


class _ArityChecked:
    """The batch as it is, after checking that a tuple batch fits ``model.forward``'s positional arguments."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        try:
            self.signature: inspect.Signature | None = inspect.signature(model.forward)
        except (TypeError, ValueError):  # builtins, C extensions: nothing to check
            self.signature = None
        self.checked: set[int] = set()

    def __call__(self, batch: Any) -> Any:
        if self.signature is not None and isinstance(batch, (tuple, list)) and len(batch) not in self.checked:
            try:
                self.signature.bind(*batch)
            except TypeError:
                kinds = [type(b).__name__ for b in batch]
                raise CallbackConfigurationError(
                    f"a calibration batch is a {type(batch).__name__} of {len(batch)} items ({', '.join(kinds)}), passed as "
                    f"positional arguments to {type(self.model).__name__}.forward{self.signature}, which does not take "
                    "them: set input_key (e.g. input_key=0 for an (x, y) batch of a TensorDataset), transform_fn, or "
                    "define calibration_inputs(batch) on the LightningModule"
                ) from None
            self.checked.add(len(batch))
        return batch
