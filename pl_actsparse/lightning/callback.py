"""``ActivationSparsityCallback``: the functional core, run at the right moments of a Lightning run.

The callback is a thin layer: it installs sparsifiers with :func:`prepare_activation_sparsity` in ``setup``
(before the strategy wraps the model), calibrates with :func:`calibrate_activation_sparsity` when the model
is not calibrated yet (start of fit, validate, test, predict), recalibrates during fine-tuning, and tracks
the achieved sparsity with :class:`~pl_actsparse.measure.metric.ActivationSparsity`. Thresholds live in the model's
state dict (so in every checkpoint); the callback's own ``state_dict`` keeps the calibration history and the
step of the last calibration, so a resumed fit continues exactly. The model is never deep-copied.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from pl_actsparse.errors import ActivationSparsityError, InvalidScopeError, InvalidTargetError, NotSparsifiedError
from pl_actsparse.api import (
    calibrate_activation_sparsity,
    prepare_activation_sparsity,
    remove_activation_sparsity,
    validate_target,
    _validated_targets,
)
from pl_actsparse.measure.metric import ActivationSparsity
from pl_actsparse.core.adapters import sync_adapter_hooks
from pl_actsparse.core.layer import THRESHOLD_BUFFER, SparsifierMode, install_sparsifier, is_sparsified, sparsified_layers
from pl_actsparse.measure.report import SparsityReport
from pl_actsparse.core.scopes import IgnoredScope, TargetScope

__all__ = [
    "ActivationSparsityCallback",
    "ScopeSpec",
    "IgnoredScopeSpec",
    "CallbackConfigurationError",
    "activation_sparsity_disabled",
    "install_sparsifiers_from_state_dict",
]

_STAGE_SOURCES = ("train", "val", "test", "predict")
_TRACKABLE = ("train", "val", "test")


class CallbackConfigurationError(ActivationSparsityError):
    """An argument of :class:`ActivationSparsityCallback` is invalid (raised by the constructor)."""


@dataclass(frozen=True)
class ScopeSpec:
    """One entry of the YAML-friendly ``scopes`` list: which layers, and their (final) target sparsity.

    ``names`` are exact qualified module names, ``patterns`` regular expressions matched with ``re.fullmatch``,
    ``types`` class names (``Linear``) or classes; see ``docs/scopes.md``.
    """

    sparsity: float
    names: list[str] = field(default_factory=list)
    patterns: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    validate: bool = True

    def to_scope(self) -> TargetScope:
        return TargetScope(names=self.names, patterns=self.patterns, types=self.types, validate=self.validate)


@dataclass(frozen=True)
class IgnoredScopeSpec:
    """YAML-friendly form of :class:`~pl_actsparse.IgnoredScope`."""

    names: list[str] = field(default_factory=list)
    patterns: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    validate: bool = True

    def to_scope(self) -> IgnoredScope:
        return IgnoredScope(names=self.names, patterns=self.patterns, types=self.types, validate=self.validate)


# ------------------------------------------------------------------------------------------------------
# small helpers that need no Lightning


@contextlib.contextmanager
def activation_sparsity_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` dense for a moment (e.g. a dense reference in ``validation_step``).

    Sparsified layers pass their input through and their observers are paused, so sparsity metrics do not
    count the dense pass. Thresholds and calibration state are untouched.
    """
    saved = []
    for _, m in sparsified_layers(model):
        state = m._actsparse
        saved.append((state, state.mode, state.observers))
        state.mode = SparsifierMode.PASSTHROUGH
        state.observers = {}
    try:
        yield model
    finally:
        for state, mode, observers in saved:
            state.mode = mode
            state.observers = observers


def install_sparsifiers_from_state_dict(model: nn.Module, state_dict: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Install (pass-through) sparsifiers on every layer ``state_dict`` holds a threshold for.

    For ``LightningModule.on_load_checkpoint``: ``load_from_checkpoint`` then loads the sparsified checkpoint
    strictly into a fresh model, thresholds and calibration state included. Keys are relative to ``model``
    after removing ``prefix``. Returns the names of the layers found.
    """
    modules = dict(model.named_modules())
    suffix = "." + THRESHOLD_BUFFER
    names = []
    for key in state_dict:
        if not key.startswith(prefix) or not (key.endswith(suffix) or key == prefix + THRESHOLD_BUFFER):
            continue
        name = key[len(prefix) : -len(THRESHOLD_BUFFER)].rstrip(".")
        if name not in modules:
            raise NotSparsifiedError(f"the checkpoint sparsifies {name!r}, which this model does not have")
        module = modules[name]
        if not isinstance(module, nn.Linear):
            raise NotSparsifiedError(f"the checkpoint sparsifies {name!r}, which is a {type(module).__qualname__} here")
        extra = state_dict.get(f"{prefix}{name}._extra_state" if name else f"{prefix}_extra_state")
        if not is_sparsified(module):
            install_sparsifier(module, extra["target"] if isinstance(extra, Mapping) else 0.0)
        names.append(name)
    sync_adapter_hooks(model)  # [adapters] peft wrappers of these layers threshold their whole input
    return names


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_int_or_none(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise CallbackConfigurationError(f"{name} must be a positive integer or None, got {value!r}")
    return int(value)


def _choice(value: Any, name: str, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise CallbackConfigurationError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
    return value


def _scope_from_spec(spec: Any, index: int) -> tuple[TargetScope, float]:
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"sparsity", "names", "patterns", "types", "validate"})
        if unknown:
            raise CallbackConfigurationError(
                f"scopes[{index}] has unknown key(s) {unknown}; allowed: sparsity, names, patterns, types, validate"
            )
        if "sparsity" not in spec:
            raise CallbackConfigurationError(f"scopes[{index}] needs a 'sparsity' (the target fraction in [0, 1])")
        spec = ScopeSpec(**spec)
    if not isinstance(spec, ScopeSpec):
        raise CallbackConfigurationError(
            f"scopes[{index}] must be a mapping {{names, patterns, types, sparsity}} or a ScopeSpec, got {spec!r}"
        )
    try:
        scope = spec.to_scope()
        target = validate_target(spec.sparsity, f"scopes[{index}]")
    except InvalidScopeError as exc:
        raise InvalidScopeError(f"scopes[{index}]: {exc}") from None
    if scope.is_empty():
        raise InvalidScopeError(f"scopes[{index}] has no names, patterns or types, so it selects nothing")
    return scope, target


def _first_loader(loaders: Any) -> Any:
    """One iterable out of what a ``*_dataloader`` hook may return (a list or dict of loaders)."""
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values())) if loaders else []
    if isinstance(loaders, (list, tuple)) and loaders and not isinstance(loaders[0], torch.Tensor) and hasattr(loaders[0], "__iter__"):
        return loaders[0]
    return loaders


def _shard(loader: Iterable[Any], limit: int | None, world_size: int, rank: int) -> Iterator[Any]:
    """The first ``limit`` items of ``loader`` split round-robin over ranks, so the union over ranks is the
    same data a single process calibrates on, whatever the number of processes."""
    for i, item in enumerate(loader):
        if limit is not None and i >= limit:
            break
        if i % world_size == rank:
            yield item


# ------------------------------------------------------------------------------------------------------


class ActivationSparsityCallback(Callback):
    """Sparsify a LightningModule's activations: calibrate, track, fine-tune with recalibration, checkpoint.

    The constructor reads like a recipe and every argument has a YAML form (see ``docs/callback.md``)::

        ActivationSparsityCallback(
            scopes=[{"patterns": [".*up_proj", ".*gate_proj"], "sparsity": 0.3},
                    {"patterns": [".*down_proj"], "sparsity": 0.5}],
            calibration_source="calibration_dataloader",   # a LightningDataModule method
            recalibrate_every_n_epochs=1,
        )

    Args:
        target_sparsity_by_scope: ``{TargetScope(...): sparsity}`` as in the functional API (Python use).
        scopes: the same as a list of ``{names, patterns, types, sparsity}`` (YAML use). Give exactly one of
            the two. With a ``linear`` schedule these are the *final* targets.
        ignored_scope: layers never sparsified (``IgnoredScope`` or ``{names, patterns, types}``).
        submodule: dotted attribute path of the module to sparsify and calibrate (e.g. ``"model"``); scope
            names are relative to it. Default: the LightningModule itself (calibration calls its ``forward``).
        calibration_dataloader: an explicit iterable of calibration batches.
        calibration_source: where calibration batches come from when no ``calibration_dataloader`` is given:
            ``"auto"`` (a ``calibration_dataloader`` method of the datamodule or LightningModule if there is
            one, else the training dataloader), ``"train"``/``"val"``/``"test"``/``"predict"`` (that
            dataloader, e.g. the first N training batches), or the name of any other datamodule (or
            LightningModule) method that returns an iterable.
        num_calibration_batches: use the first N batches of the source (all when None; required for the
            stage dataloaders). Under DDP they are split round-robin over ranks and the statistics summed, so
            the thresholds do not depend on the number of processes.
        max_batches_in_flight: cap calibration memory by running the batches in lockstep groups of this size
            (per rank; exact only without it, see ``docs/calibration.md``).
        input_key: index or key that takes the model inputs out of a batch (e.g. ``0`` for ``(x, y)``).
            Without it (and without ``transform_fn``) a LightningModule method ``calibration_inputs(batch)``
            is used if defined, else the batch as it is (dict: keyword arguments, tuple: positional).
        transform_fn: a callable batch -> model inputs (Python use; an import path in YAML).
        recalibrate_every_n_epochs: during fit, recalibrate at the end of every N-th training epoch (before
            that epoch's validation), bringing achieved sparsity back to target as the weights drift.
        recalibrate_every_n_steps: during fit, recalibrate every N optimizer steps.
        schedule: ``"constant"`` (the targets from the start) or ``"linear"`` (a ramp from
            ``initial_sparsity`` to the targets over ``ramp_epochs`` epochs or ``ramp_steps`` steps; each
            change of target recalibrates).
        initial_sparsity: where a linear ramp starts (same for every layer).
        ramp_epochs: epoch ``e`` trains at ``initial + min(1, e / ramp_epochs) * (target - initial)``.
        ramp_steps: the same per optimizer step, updated every ``ramp_every_n_steps`` steps (default:
            ``ceil(ramp_steps / 10)``).
        gradient_mode: ``"masked"`` (gradients only through the kept inputs: the exact derivative) or
            ``"ste"`` (straight-through: as if nothing was zeroed).
        on_train_end: ``"keep"`` the sparsifiers as they are, ``"make_permanent"`` (recalibrate on the final
            weights if they changed since the last calibration, then freeze: later stages never recalibrate),
            or ``"remove"`` them (the dense fine-tuned model).
        track: the stages whose achieved sparsity is measured and logged (``True``: train, val and test).
            Training batches are measured on logging steps only (``Trainer(log_every_n_steps=...)``).
        log_per_layer: also log per-layer sparsity, threshold and per-token spread.
        log_prefix: the namespace of every logged key (``actsparse/val/sparsity`` ...).
        progress: show a progress bar over layers while calibrating (rank 0).
        verbose: print the calibration summary table (rank 0).
    """

    def __init__(
        self,
        target_sparsity_by_scope: Mapping[TargetScope, float] | None = None,
        *,
        scopes: Sequence[ScopeSpec] | None = None,
        ignored_scope: IgnoredScopeSpec | IgnoredScope | None = None,
        submodule: str | None = None,
        calibration_dataloader: Iterable[Any] | None = None,
        calibration_source: str = "auto",
        num_calibration_batches: int | None = None,
        max_batches_in_flight: int | None = None,
        input_key: int | str | None = None,
        transform_fn: Callable[[Any], Any] | None = None,
        recalibrate_every_n_epochs: int | None = None,
        recalibrate_every_n_steps: int | None = None,
        schedule: Literal["constant", "linear"] = "constant",
        initial_sparsity: float = 0.0,
        ramp_epochs: int | None = None,
        ramp_steps: int | None = None,
        ramp_every_n_steps: int | None = None,
        gradient_mode: Literal["masked", "ste"] = "masked",
        on_train_end: Literal["keep", "make_permanent", "remove"] = "keep",
        track: bool | Sequence[str] = True,
        log_per_layer: bool = True,
        log_prefix: str = "actsparse",
        progress: bool = True,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        # -- what to sparsify
        if (target_sparsity_by_scope is None) == (scopes is None):
            raise CallbackConfigurationError(
                "give exactly one of target_sparsity_by_scope ({TargetScope(...): sparsity}) and scopes "
                "(a list of {names, patterns, types, sparsity})"
                + ("; both were given" if scopes is not None else "; neither was given")
            )
        targets: dict[TargetScope, float] = {}
        if target_sparsity_by_scope is not None:
            if not isinstance(target_sparsity_by_scope, Mapping):
                raise InvalidScopeError(
                    "target_sparsity_by_scope must be a mapping {TargetScope(...): sparsity}, got "
                    f"{type(target_sparsity_by_scope).__qualname__} (for a list of dicts use scopes=)"
                )
            targets = _validated_targets(target_sparsity_by_scope)
        else:
            if isinstance(scopes, (str, Mapping)) or not isinstance(scopes, Sequence):
                raise CallbackConfigurationError(f"scopes must be a list of {{names, patterns, types, sparsity}}, got {scopes!r}")
            for i, spec in enumerate(scopes):
                scope, value = _scope_from_spec(spec, i)
                if scope in targets:
                    raise InvalidScopeError(f"scopes[{i}] repeats an earlier entry: {scope!r}")
                targets[scope] = value
        if not targets:
            raise CallbackConfigurationError("no scope given: at least one {names, patterns, types, sparsity} is needed")
        self.targets = targets

        if ignored_scope is None or isinstance(ignored_scope, IgnoredScope):
            self.ignored_scope = ignored_scope
        elif isinstance(ignored_scope, IgnoredScopeSpec):
            self.ignored_scope = ignored_scope.to_scope()
        elif isinstance(ignored_scope, Mapping):
            unknown = sorted(set(ignored_scope) - {"names", "patterns", "types", "validate"})
            if unknown:
                raise CallbackConfigurationError(f"ignored_scope has unknown key(s) {unknown}; allowed: names, patterns, types, validate")
            self.ignored_scope = IgnoredScopeSpec(**ignored_scope).to_scope()
        else:
            raise InvalidScopeError(f"ignored_scope must be an IgnoredScope or {{names, patterns, types}}, got {ignored_scope!r}")

        if submodule is not None and (not isinstance(submodule, str) or not all(p.isidentifier() for p in submodule.split("."))):
            raise CallbackConfigurationError(f"submodule must be a dotted attribute path such as 'model', got {submodule!r}")
        self.submodule = submodule

        # -- calibration data
        if not isinstance(calibration_source, str) or not (
            calibration_source == "auto" or calibration_source in _STAGE_SOURCES or calibration_source.isidentifier()
        ):
            raise CallbackConfigurationError(
                "calibration_source must be 'auto', 'train', 'val', 'test', 'predict' or the name of a "
                f"LightningDataModule/LightningModule method, got {calibration_source!r}"
            )
        if calibration_dataloader is not None:
            if calibration_source != "auto":
                raise CallbackConfigurationError(
                    f"give either calibration_dataloader or calibration_source={calibration_source!r}, not both"
                )
            if not hasattr(calibration_dataloader, "__iter__"):
                raise CallbackConfigurationError(
                    f"calibration_dataloader must be iterable (a DataLoader, a list of batches), got {type(calibration_dataloader).__qualname__}"
                )
        self.calibration_dataloader = calibration_dataloader
        self.calibration_source = calibration_source
        self.num_calibration_batches = _positive_int_or_none(num_calibration_batches, "num_calibration_batches")
        self.max_batches_in_flight = _positive_int_or_none(max_batches_in_flight, "max_batches_in_flight")
        if calibration_source in _STAGE_SOURCES and self.num_calibration_batches is None:
            raise CallbackConfigurationError(
                f"calibration_source={calibration_source!r} needs num_calibration_batches (calibrate on the first N "
                f"batches of the {calibration_source} dataloader, not all of them)"
            )
        if input_key is not None and not (_is_int(input_key) or isinstance(input_key, str)):
            raise CallbackConfigurationError(f"input_key must be an int index, a str key or None, got {input_key!r}")
        if transform_fn is not None and not callable(transform_fn):
            raise CallbackConfigurationError(f"transform_fn must be callable or None, got {transform_fn!r}")
        if transform_fn is not None and input_key is not None:
            raise CallbackConfigurationError("give either input_key or transform_fn, not both")
        self.input_key = input_key
        self.transform_fn = transform_fn

        # -- fine-tuning
        self.recalibrate_every_n_epochs = _positive_int_or_none(recalibrate_every_n_epochs, "recalibrate_every_n_epochs")
        self.recalibrate_every_n_steps = _positive_int_or_none(recalibrate_every_n_steps, "recalibrate_every_n_steps")
        self.schedule = _choice(schedule, "schedule", ("constant", "linear"))
        self.initial_sparsity = validate_target(initial_sparsity, "initial_sparsity")
        self.ramp_epochs = _positive_int_or_none(ramp_epochs, "ramp_epochs")
        self.ramp_steps = _positive_int_or_none(ramp_steps, "ramp_steps")
        self.ramp_every_n_steps = _positive_int_or_none(ramp_every_n_steps, "ramp_every_n_steps")
        if self.schedule == "linear":
            if (self.ramp_epochs is None) == (self.ramp_steps is None):
                raise CallbackConfigurationError("schedule='linear' needs exactly one of ramp_epochs and ramp_steps")
            if self.ramp_every_n_steps is not None and self.ramp_steps is None:
                raise CallbackConfigurationError("ramp_every_n_steps only applies to a ramp over steps (ramp_steps)")
            if self.ramp_every_n_steps is None and self.ramp_steps is not None:
                self.ramp_every_n_steps = max(1, math.ceil(self.ramp_steps / 10))
        else:
            given = [n for n in ("ramp_epochs", "ramp_steps", "ramp_every_n_steps") if getattr(self, n) is not None]
            if given or initial_sparsity != 0.0:
                given += ["initial_sparsity"] if initial_sparsity != 0.0 else []
                raise CallbackConfigurationError(f"{', '.join(given)} only apply to schedule='linear' (schedule is 'constant')")
        self.gradient_mode = _choice(gradient_mode, "gradient_mode", ("masked", "ste"))
        self.on_train_end_action = _choice(on_train_end, "on_train_end", ("keep", "make_permanent", "remove"))

        # -- tracking and output
        if isinstance(track, bool):
            self.track = set(_TRACKABLE) if track else set()
        elif isinstance(track, Sequence) and not isinstance(track, str) and all(t in _TRACKABLE for t in track):
            self.track = set(track)
        else:
            raise CallbackConfigurationError(f"track must be True, False or a list drawn from {list(_TRACKABLE)}, got {track!r}")
        for name, value in (("log_per_layer", log_per_layer), ("progress", progress), ("verbose", verbose)):
            if not isinstance(value, bool):
                raise CallbackConfigurationError(f"{name} must be True or False, got {value!r}")
        if not isinstance(log_prefix, str) or not log_prefix or log_prefix.endswith("/"):
            raise CallbackConfigurationError(f"log_prefix must be a non-empty string without a trailing '/', got {log_prefix!r}")
        self.log_per_layer = log_per_layer
        self.log_prefix = log_prefix
        self.progress = progress
        self.verbose = verbose

        # -- run state (checkpointed through state_dict)
        self.history: list[dict[str, Any]] = []
        self.last_calibration_step: int | None = None
        self.finished: str | None = None  # "make_permanent" or "remove" once on_train_end acted
        self._metrics: dict[str, ActivationSparsity] = {}
        self._observing: dict[str, contextlib.ExitStack] = {}
        self._pending_logs: dict[str, float] = {}
        self._layer_names: list[str] = []

    # ---------------------------------------------------------------------------------------------------
    # configuration helpers

    @property
    def state_key(self) -> str:
        return self._generate_state_key(targets=sorted(repr(s) for s in self.targets), submodule=self.submodule)

    def _module(self, pl_module: LightningModule) -> nn.Module:
        if self.submodule is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.submodule)
        except AttributeError:
            raise CallbackConfigurationError(
                f"submodule={self.submodule!r}: {type(pl_module).__qualname__} has no such submodule"
            ) from None

    def _progress_fraction(self, epoch: int, step: int) -> float:
        if self.schedule == "constant":
            return 1.0
        if self.ramp_epochs is not None:
            return min(1.0, epoch / self.ramp_epochs)
        k = self.ramp_every_n_steps or 1
        return min(1.0, (step // k) * k / self.ramp_steps)  # type: ignore[operator]

    def scheduled_targets(self, epoch: int = 0, step: int = 0, final: bool = False) -> dict[TargetScope, float]:
        """The target of each scope at a point of the schedule (``final``: the end of the ramp)."""
        p = 1.0 if final else self._progress_fraction(epoch, step)
        if p >= 1.0:
            return dict(self.targets)
        a = self.initial_sparsity
        return {scope: a + p * (t - a) for scope, t in self.targets.items()}

    def _current_targets(self, module: nn.Module) -> dict[str, float]:
        return {n: m._actsparse.target for n, m in sparsified_layers(module)}

    # ---------------------------------------------------------------------------------------------------
    # calibration data

    def _calibration_loader(self, trainer: Trainer, pl_module: LightningModule) -> tuple[Iterable[Any], str]:
        found = self.calibration_loader_without_trainer(getattr(trainer, "datamodule", None), pl_module)
        if found is not None:
            return found
        source = "train" if self.calibration_source == "auto" else self.calibration_source
        loop = {
            "train": trainer.fit_loop,
            "val": trainer.fit_loop.epoch_loop.val_loop if trainer.state.fn == "fit" else trainer.validate_loop,
            "test": trainer.test_loop,
            "predict": trainer.predict_loop,
        }[source]
        data_source = loop._data_source
        if not data_source.is_defined():
            raise CallbackConfigurationError(
                f"calibration_source={source!r}: the {source} dataloader is not available in this run; pass "
                "calibration_dataloader, or a datamodule/LightningModule that defines it"
            )
        return _first_loader(data_source.dataloader()), f"the {source} dataloader"

    def calibration_loader_without_trainer(
        self, datamodule: Any, pl_module: Any
    ) -> tuple[Iterable[Any], str] | None:
        """The calibration data and where it came from, when no running Trainer is needed to find it.

        ``None`` means the source is a stage's dataloader (``"train"``, ``"val"``, ...; also ``"auto"``
        without a ``calibration_dataloader`` method), which only a running Trainer resolves. Used by the
        callback and by ``pl-actsparse generate``.
        """
        if self.calibration_dataloader is not None:
            return self.calibration_dataloader, "calibration_dataloader"
        source = self.calibration_source
        if source == "auto":
            for owner in (datamodule, pl_module):
                if owner is not None and callable(getattr(owner, "calibration_dataloader", None)):
                    return _first_loader(owner.calibration_dataloader()), f"{type(owner).__name__}.calibration_dataloader()"
            if self.num_calibration_batches is None:
                raise CallbackConfigurationError(
                    "no calibration data: there is no calibration_dataloader (argument, or method of the datamodule or "
                    "LightningModule), and calibrating on the first training batches needs num_calibration_batches"
                )
            return None
        if source in _STAGE_SOURCES:
            return None
        for owner in (datamodule, pl_module):
            if owner is not None and callable(getattr(owner, source, None)):
                return _first_loader(getattr(owner, source)()), f"{type(owner).__name__}.{source}()"
        raise CallbackConfigurationError(
            f"calibration_source={source!r}: neither the datamodule "
            f"({type(datamodule).__name__ if datamodule is not None else 'none'}) nor {type(pl_module).__name__} "
            f"has a method {source!r}"
        )

    def _inputs_fn(self, pl_module: LightningModule) -> Callable[[Any], Any] | None:
        if self.transform_fn is not None:
            return self.transform_fn
        if self.input_key is not None:
            key = self.input_key
            return lambda batch: batch[key]
        hook = getattr(pl_module, "calibration_inputs", None)
        return hook if callable(hook) else None

    # ---------------------------------------------------------------------------------------------------
    # the actions

    def _prepare(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        module = self._module(pl_module)
        if stage == "fit":
            targets = self.scheduled_targets(trainer.current_epoch, trainer.global_step)
        else:
            targets = self.scheduled_targets(final=True)
        plan = prepare_activation_sparsity(module, targets, self.ignored_scope, gradient_mode=self.gradient_mode)
        self._layer_names = list(plan.targets)

    def _needs_calibration(self, module: nn.Module) -> bool:
        return any(m._actsparse.mode is not SparsifierMode.SPARSIFYING for n, m in sparsified_layers(module) if n in self._layer_names)

    def calibrate(self, trainer: Trainer, pl_module: LightningModule, reason: str) -> SparsityReport:
        """Calibrate every sparsified layer now (all ranks together) and record before/after sparsity."""
        module = self._module(pl_module)
        loader, where = self._calibration_loader(trainer, pl_module)
        items = _shard(loader, self.num_calibration_batches, trainer.world_size, trainer.global_rank)
        layers = [n for n, _ in sparsified_layers(module) if n in self._layer_names]
        calibrated_before = {
            n: m.activation_threshold.detach().clone()
            for n, m in sparsified_layers(module)
            if n in layers and m._actsparse.mode is SparsifierMode.SPARSIFYING
        }
        before = ActivationSparsity.from_model(module).to(pl_module.device) if calibrated_before else None
        stack = contextlib.ExitStack()
        if before is not None:
            # count |x| <= old threshold on the very inputs calibration sees (each layer's new inputs)
            for name, m in sparsified_layers(module):
                if name in calibrated_before:
                    old = calibrated_before[name]
                    m._actsparse.observers[id(before)] = lambda mod, x, _o, _n=name, _t=old: before.update(_n, x, _t)
                    stack.callback(m._actsparse.observers.pop, id(before), None)
        with stack, trainer.strategy.precision_plugin.forward_context():
            report = calibrate_activation_sparsity(
                module,
                items,
                layers=layers,
                transform_fn=self._inputs_fn(pl_module),
                progress=self.progress and trainer.is_global_zero,
                max_batches_in_flight=self.max_batches_in_flight,
            )
        after = report.mean_sparsity
        before_value = None
        before_by_layer: dict[str, float] = {}
        if before is not None:
            values = before.compute()  # synced over ranks like the calibration statistics
            before_value = float(values["sparsity"])
            before_by_layer = {n: float(values[f"{n}/sparsity"]) for n in calibrated_before}
        step = trainer.global_step
        entry = {
            "reason": reason,
            "epoch": trainer.current_epoch,
            "step": step,
            "source": where,
            "elements": sum(r.calibration_elements for r in report.layers),
            "sparsity_before": before_value,
            "sparsity_after": after,
            "sparsity_before_by_layer": before_by_layer,
            "sparsity_after_by_layer": {r.name: r.calibration_sparsity for r in report.layers},
            "target": _mean_target(report),
            "thresholds": {r.name: r.threshold for r in report.layers},
        }
        self.history.append(entry)
        self.last_calibration_step = step
        logs = {"calibration/sparsity": after, "calibration/target": entry["target"], "calibration/count": float(len(self.history))}
        if before_value is not None:
            logs["calibration/sparsity_before"] = before_value
        self._pending_logs.update({f"{self.log_prefix}/{k}": float(v) for k, v in logs.items() if v is not None})
        if self.verbose and trainer.is_global_zero:
            change = "" if before_value is None else f"; achieved sparsity on this data before {before_value:.4f} -> after {after:.4f}"
            print(
                f"\nactivation sparsity calibrated ({reason}; epoch {trainer.current_epoch}, step {step}) on {where}"
                f"{change}\n{report}",
                flush=True,
            )
        return report

    def _ensure_calibrated(self, trainer: Trainer, pl_module: LightningModule, reason: str) -> None:
        if self.finished == "remove" or not self._layer_names:
            return
        if self._needs_calibration(self._module(pl_module)):
            self.calibrate(trainer, pl_module, reason)

    def _retarget(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        """Apply the schedule's targets for the current epoch/step; True if some target changed."""
        if self.schedule == "constant":
            return False
        module = self._module(pl_module)
        before = self._current_targets(module)
        targets = self.scheduled_targets(trainer.current_epoch, trainer.global_step)
        prepare_activation_sparsity(module, targets, self.ignored_scope, gradient_mode=self.gradient_mode)
        return self._current_targets(module) != before

    def _flush_logs(self, pl_module: LightningModule, on_step: bool = False) -> None:
        if not self._pending_logs:
            return
        logs, self._pending_logs = self._pending_logs, {}
        # values come from rank-summed statistics, identical everywhere; syncing keeps Lightning's DDP check quiet
        sync = pl_module.trainer.world_size > 1 and not on_step
        for key, value in logs.items():
            pl_module.log(key, value, on_step=on_step, on_epoch=not on_step, batch_size=1, sync_dist=sync)

    # ---------------------------------------------------------------------------------------------------
    # tracking

    def _start_tracking(self, stage: str, pl_module: LightningModule) -> ActivationSparsity | None:
        if stage not in self.track or self.finished == "remove" or not self._layer_names:
            return None
        self._stop_tracking(stage)
        module = self._module(pl_module)
        metric = self._metrics.get(stage)
        names = [n for n, _ in sparsified_layers(module)]
        if metric is None or metric.layers != names:
            metric = ActivationSparsity.from_model(module)
            self._metrics[stage] = metric
        metric.to(pl_module.device)
        metric.reset()
        stack = contextlib.ExitStack()
        stack.enter_context(metric.observe(module))
        self._observing[stage] = stack
        return metric

    def _stop_tracking(self, stage: str) -> None:
        stack = self._observing.pop(stage, None)
        if stack is not None:
            stack.close()

    def _log_metric(self, stage: str, pl_module: LightningModule, trainer: Trainer, on_step: bool) -> dict[str, float]:
        metric = self._metrics.get(stage)
        if metric is None or not metric.update_called:
            return {}
        values = {k: float(v) for k, v in metric.compute().items()}  # synced over ranks
        prefix = f"{self.log_prefix}/{stage}/"
        logs = {prefix + k: v for k, v in values.items() if self.log_per_layer or "/" not in k}
        pl_module.log_dict(
            logs, on_step=on_step, on_epoch=not on_step, batch_size=1, sync_dist=trainer.world_size > 1 and not on_step
        )
        if self.verbose and trainer.is_global_zero and trainer.state.fn in ("validate", "test") and not trainer.sanity_checking:
            print(_achieved_table(stage, values, self._module(pl_module)), flush=True)
        return values

    # ---------------------------------------------------------------------------------------------------
    # Lightning hooks

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Before the strategy wraps the model: sparsifiers are installed in place (same modules, same
        # Parameters), so DDP and the optimizer see the model as it will be trained.
        if self.finished == "remove":
            return
        if self.finished == "make_permanent":
            self._layer_names = [n for n, _ in sparsified_layers(self._module(pl_module))]
            return
        self._prepare(trainer, pl_module, stage)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A resumed fit restored thresholds with the model's state dict: nothing to do then.
        self._ensure_calibrated(trainer, pl_module, "start of fit")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush_logs(pl_module)  # on_fit_start may not log

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.finished is None and self.ramp_epochs is not None and self._retarget(trainer, pl_module):
            self.calibrate(trainer, pl_module, f"schedule (epoch {trainer.current_epoch})")
            self._flush_logs(pl_module)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.finished is None and self._layer_names:
            step = trainer.global_step
            reason = None
            if self.ramp_steps is not None and step % self.ramp_every_n_steps == 0 and self._retarget(trainer, pl_module):  # type: ignore[operator]
                reason = f"schedule (step {step})"
            elif (
                self.recalibrate_every_n_steps is not None
                and step > 0
                and step % self.recalibrate_every_n_steps == 0
                and self.last_calibration_step != step
            ):
                reason = f"every {self.recalibrate_every_n_steps} steps"
            if reason is not None:
                self.calibrate(trainer, pl_module, reason)
                self._flush_logs(pl_module)
        if "train" in self.track and _should_log_step(trainer):
            self._start_tracking("train", pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if "train" in self._observing:
            self._stop_tracking("train")
            self._log_metric("train", pl_module, trainer, on_step=True)

    def _epoch_end_recalibration(self, trainer: Trainer, pl_module: LightningModule) -> None:
        n = self.recalibrate_every_n_epochs
        if (
            self.finished is None
            and n is not None
            and self._layer_names
            and (trainer.current_epoch + 1) % n == 0
            and self.last_calibration_step != trainer.global_step
        ):
            self.calibrate(trainer, pl_module, f"every {n} epoch(s)")
            self._flush_logs(pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit":
            if trainer.is_last_batch:  # epoch-end validation: recalibrate first, so it measures the new thresholds
                self._epoch_end_recalibration(trainer, pl_module)
        else:
            self._ensure_calibrated(trainer, pl_module, "start of validation")
            self._flush_logs(pl_module)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_tracking("val", pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "val" in self._observing:
            self._stop_tracking("val")
            self._log_metric("val", pl_module, trainer, on_step=False)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ensure_calibrated(trainer, pl_module, "start of test")
        self._flush_logs(pl_module)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_tracking("test", pl_module)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "test" in self._observing:
            self._stop_tracking("test")
            self._log_metric("test", pl_module, trainer, on_step=False)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ensure_calibrated(trainer, pl_module, "start of predict")
        self._pending_logs.clear()  # predict has no logging

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_end_recalibration(trainer, pl_module)  # runs without validation too; never twice per step

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        action = self.on_train_end_action
        if action == "keep" or not self._layer_names:
            return
        module = self._module(pl_module)
        if action == "make_permanent":
            if self.last_calibration_step != trainer.global_step or self._needs_calibration(module):
                self.calibrate(trainer, pl_module, "end of training (make permanent)")
            self._pending_logs.clear()  # on_train_end may not log; the history has it
        else:
            remove_activation_sparsity(module)
            self._layer_names = []
        self.finished = action

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for name in list(self._observing):
            self._stop_tracking(name)

    # ---------------------------------------------------------------------------------------------------
    # checkpointing: thresholds are in the model's state dict; this is the run's bookkeeping

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "history": [dict(h) for h in self.history],
            "last_calibration_step": self.last_calibration_step,
            "finished": self.finished,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self.last_calibration_step = state_dict.get("last_calibration_step")
        self.finished = state_dict.get("finished")


def _mean_target(report: SparsityReport) -> float:
    rows = [r for r in report.layers if r.calibration_elements]
    n = sum(r.calibration_elements for r in rows)
    return sum(r.target * r.calibration_elements for r in rows) / n if n else float("nan")


def _achieved_table(stage: str, values: Mapping[str, float], module: nn.Module) -> str:
    """Per-layer achieved sparsity on evaluation data next to the calibration result."""
    head = ["layer", "target", "threshold", "calibration", stage, "token p5", "token p95"]
    rows = []
    for name, m in sparsified_layers(module):
        if f"{name}/sparsity" not in values:
            continue
        s = m._actsparse
        cal = "-" if s.calibration_sparsity is None else f"{s.calibration_sparsity:.4f}"
        rows.append(
            [name, f"{s.target:.3f}", f"{float(m.activation_threshold):.5g}", cal, f"{values[f'{name}/sparsity']:.4f}"]
            + [f"{values[f'{name}/token_sparsity_{q}']:.4f}" for q in ("p5", "p95") if f"{name}/token_sparsity_{q}" in values]
        )
    rows.append(
        ["all layers (element-weighted)", "", "", "", f"{values['sparsity']:.4f}"]
        + [f"{values[k]:.4f}" for k in ("token_sparsity_p5", "token_sparsity_p95") if k in values]
    )
    widths = [max(len(head[i]), *(len(r[i]) for r in rows if i < len(r))) for i in range(len(head))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    out = [f"\nachieved activation sparsity on the {stage} data (|x| <= threshold)", line(head), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    out.append(f"weight-bytes-weighted: {values['weighted_sparsity']:.4f}")
    return "\n".join(out)


def _should_log_step(trainer: Trainer) -> bool:
    """Whether Lightning writes step-level logs on this training step (checked in on_train_batch_start)."""
    connector = getattr(trainer, "_logger_connector", None)
    flag = getattr(connector, "should_update_logs", None)
    if isinstance(flag, bool):
        return flag
    n = trainer.log_every_n_steps
    return n > 0 and (trainer.global_step + 1) % n == 0
