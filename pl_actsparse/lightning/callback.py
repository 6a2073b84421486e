"""``ActivationSparsityCallback``: the functional core, run at the right moments of a Lightning run.

The callback is glue: it installs sparsifiers with :func:`~pl_actsparse.api.prepare_activation_sparsity` once
the model exists (in ``setup``, or right after ``LightningModule.configure_model`` when the module builds its
layers there) and before the strategy wraps it; calibrates with
:func:`~pl_actsparse.api.calibrate_activation_sparsity` when the model is not calibrated yet (start of fit,
validate, test, predict); recalibrates during fine-tuning following a
:class:`~pl_actsparse.lightning.schedule.SparsitySchedule`; and tracks the achieved sparsity with
:class:`~pl_actsparse.measure.metric.ActivationSparsity`. Where the calibration batches come from is a
:class:`~pl_actsparse.lightning.calibration_data.CalibrationData`. Thresholds live in the model's state dict
(so in every checkpoint); the callback's own ``state_dict`` keeps the calibration history, so a resumed fit
continues exactly. The model is never deep-copied.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import nn
from typing_extensions import override

from pl_actsparse.api import (
    _validated_targets,
    calibrate_activation_sparsity,
    prepare_activation_sparsity,
    remove_activation_sparsity,
    validate_target,
)
from pl_actsparse.core.layer import (
    THRESHOLD_BUFFER,
    SparsifierMode,
    install_sparsifier,
    is_sparsified,
    sparsified_layers,
)
from pl_actsparse.config import CalibrationConfig
from pl_actsparse.core.recipe import IgnoredScopeSpec, ScopeSpec, ScopeSpecError, parse_ignored_scope_spec, parse_scope_spec
from pl_actsparse.core.scopes import IgnoredScope, TargetScope
from pl_actsparse.errors import (
    ActivationSparsityError,
    CallbackConfigurationError,
    InvalidScopeError,
    InvalidTargetError,
    NotSparsifiedError,
)
from pl_actsparse.lightning import _spawn
from pl_actsparse.lightning.calibration_data import CalibrationData, positive_int_or_none
from pl_actsparse.lightning.schedule import LinearRamp, SparsitySchedule
from pl_actsparse.measure.metric import ActivationSparsity
from pl_actsparse.measure.report import SparsityReport

__all__ = [
    "ActivationSparsityCallback",
    "ScopeSpec",
    "IgnoredScopeSpec",
    "CallbackConfigurationError",
    "activation_sparsity_disabled",
    "install_sparsifiers_from_state_dict",
]

log = logging.getLogger(__name__)

_TRACKABLE = ("train", "val", "test")


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
    from pl_actsparse.api import install_sparsifiers_from_state_dict as install

    return install(model, state_dict, prefix)


def _choice(value: Any, name: str, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise CallbackConfigurationError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
    return value


def _tagged(exc: BaseException, argument: str) -> BaseException:
    """Record which constructor argument (YAML key below ``init_args``) an error is about, innermost first;
    ``pl-actsparse`` prints it as the key (``trainer.callbacks[0].init_args.scopes[1].sparsity``)."""
    if getattr(exc, "argument", None) is None:
        exc.argument = argument  # type: ignore[attr-defined]
    return exc


class _ScopeSpecConfigurationError(CallbackConfigurationError, ScopeSpecError):
    """A malformed ``scopes``/``ignored_scope`` entry given to the callback (the recipe parser's error)."""


def _scope_from_spec(spec: Any, index: int) -> tuple[TargetScope, float]:
    """One ``scopes`` entry through the recipe parser (:func:`pl_actsparse.core.recipe.parse_scope_spec`), its
    error tagged with the YAML key it is about."""
    where = f"scopes[{index}]"
    try:
        return parse_scope_spec(spec, where)
    except ScopeSpecError as exc:
        unknown = re.search(r"unknown key\(s\) \['([^']+)'", str(exc))
        raise _tagged(_ScopeSpecConfigurationError(str(exc)), f"{where}.{unknown.group(1)}" if unknown else where) from None
    except InvalidTargetError as exc:
        raise _tagged(exc, f"{where}.sparsity")
    except InvalidScopeError as exc:
        raise _tagged(exc, where)


def _parse_targets(target_sparsity_by_scope: Any, scopes: Any) -> dict[TargetScope, float]:
    if (target_sparsity_by_scope is None) == (scopes is None):
        raise CallbackConfigurationError(
            "give exactly one of target_sparsity_by_scope ({TargetScope(...): sparsity}) and scopes "
            "(a list of {names, patterns, types, sparsity})" + ("; both were given" if scopes is not None else "; neither was given")
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
    return targets


def _parse_ignored(ignored_scope: Any) -> IgnoredScope | None:
    try:
        return parse_ignored_scope_spec(ignored_scope)
    except ScopeSpecError as exc:
        raise _ScopeSpecConfigurationError(str(exc)) from None


def _parse_schedule(schedule: Any, initial_sparsity: Any, ramp_epochs: Any, ramp_steps: Any, ramp_every_n_steps: Any) -> SparsitySchedule:
    flags = {"ramp_epochs": ramp_epochs, "ramp_steps": ramp_steps, "ramp_every_n_steps": ramp_every_n_steps}
    if isinstance(schedule, SparsitySchedule):
        given = [n for n, v in flags.items() if v is not None] + (["initial_sparsity"] if initial_sparsity != 0.0 else [])
        if given:
            raise CallbackConfigurationError(f"{', '.join(given)} only apply to schedule='linear', not to a {type(schedule).__name__}")
        return schedule
    if _choice(schedule, "schedule", ("constant", "linear")) == "linear":
        return LinearRamp(initial_sparsity, ramp_epochs, ramp_steps, ramp_every_n_steps)
    given = [n for n, v in flags.items() if v is not None]
    if given or initial_sparsity != 0.0:
        given += ["initial_sparsity"] if initial_sparsity != 0.0 else []
        raise CallbackConfigurationError(f"{', '.join(given)} only apply to schedule='linear' (schedule is 'constant')")
    return SparsitySchedule()


def _parse_track(track: Any) -> set[str]:
    if isinstance(track, bool):
        return set(_TRACKABLE) if track else set()
    if isinstance(track, Sequence) and not isinstance(track, str) and all(t in _TRACKABLE for t in track):
        return set(track)
    raise CallbackConfigurationError(f"track must be True, False or a list drawn from {list(_TRACKABLE)}, got {track!r}")


_ARGUMENT = re.compile(r"^(\w+)(?: must|=| only|\b)")


@contextlib.contextmanager
def _argument(argument: str | None) -> Iterator[None]:
    """Tag an error raised inside with the constructor argument it is about (``None``: the first word of the
    message names it, as in "num_calibration_batches must be ...")."""
    try:
        yield
    except ActivationSparsityError as exc:
        if argument is None:
            match = _ARGUMENT.match(str(exc))
            known = inspect.signature(ActivationSparsityCallback.__init__).parameters
            argument = match.group(1) if match and match.group(1) in known else None
        if argument is not None:
            _tagged(exc, argument)
        raise


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
            the two. With a ramp schedule these are the *final* targets.
        ignored_scope: layers never sparsified (``IgnoredScope`` or ``{names, patterns, types}``).
        submodule: dotted attribute path of the module to sparsify and calibrate (e.g. ``"model"``); scope
            names are relative to it. Default: the LightningModule itself (calibration calls its ``forward``).
            A module built in ``LightningModule.configure_model`` is found: planning waits for that hook.
        calibration_dataloader: an explicit iterable of calibration batches.
        calibration_source: where calibration batches come from when no ``calibration_dataloader`` is given:
            ``"auto"`` (a ``calibration_dataloader`` method of the datamodule or LightningModule if there is
            one, else the training dataloader), ``"train"``/``"val"``/``"test"``/``"predict"`` (that
            dataloader, e.g. the first N training batches), or the name of any other datamodule (or
            LightningModule) method that returns an iterable. See :class:`CalibrationData`.
        num_calibration_batches: use the first N batches of the source (all when None; required for the
            stage dataloaders). Under DDP they are split round-robin over ranks and the statistics summed, so
            the thresholds do not depend on the number of processes.
        max_batches_in_flight: cap calibration memory by running the batches in lockstep groups of this size
            (per rank; exact only without it, see ``docs/calibration.md``).
        input_key: index or key that takes the model inputs out of a batch (e.g. ``0`` for ``(x, y)``).
            Without it (and without ``transform_fn``) a LightningModule method ``calibration_inputs(batch)``
            is used if defined, else the batch as it is (dict: keyword arguments, tuple: positional).
        transform_fn: a callable batch -> model inputs (Python use; an import path in YAML).
        token_mask: ``"auto"`` (a dict batch's ``attention_mask`` excludes padding from calibration), None
            (every element counts) or a callable batch -> bool mask ``[batch, seq]``.
        calibration: ``"auto"`` (sequential for models with a block list and >= 256 MiB of parameters),
            ``"sequential"`` (block by block from a cache of block inputs, one batch in flight inside a block:
            the memory for 7B-class models) or ``"lockstep"`` (every batch in flight). Same thresholds.
        offload: where the sequential mode keeps its cache: ``None`` (with the model), ``"cpu"`` or ``"disk"``.
        recalibrate_every_n_epochs: during fit, recalibrate at the end of every N-th training epoch (before
            that epoch's validation), bringing achieved sparsity back to target as the weights drift.
        recalibrate_every_n_steps: during fit, recalibrate every N optimizer steps.
        schedule: ``"constant"`` (the targets from the start), ``"linear"`` (a ramp from ``initial_sparsity``
            to the targets over ``ramp_epochs`` epochs or ``ramp_steps`` steps) or a
            :class:`~pl_actsparse.lightning.schedule.SparsitySchedule` of your own (override ``targets``).
            Each change of target recalibrates.
        initial_sparsity: where a linear ramp starts (same for every layer).
        ramp_epochs: epoch ``e`` trains at ``initial + min(1, e / ramp_epochs) * (target - initial)``.
        ramp_steps: the same per optimizer step, updated every ``ramp_every_n_steps`` steps (default:
            ``ceil(ramp_steps / 10)``).
        gradient_mode: ``"masked"`` (gradients only through the kept inputs: the exact derivative) or
            ``"ste"`` (straight-through: as if nothing was zeroed).
        on_train_end: ``"keep"`` the sparsifiers as they are, ``"make_permanent"`` (recalibrate on the final
            weights if they changed since the last calibration, whichever callback changed them, e.g.
            ``StochasticWeightAveraging`` or ``WeightAveraging``; then freeze: later stages never
            recalibrate), or ``"remove"`` them (the dense fine-tuned model).
        track: the stages whose achieved sparsity is measured and logged (``True``: train, val and test).
            Training batches are measured on logging steps only (``Trainer(log_every_n_steps=...)``).
        log_per_layer: also log per-layer sparsity, threshold and per-token spread.
        log_prefix: the namespace of every logged key (``actsparse/val/sparsity`` ...).
        progress: show a progress bar over layers while calibrating (rank 0).
        verbose: log the calibration summary table and the achieved-sparsity table (rank 0, logger
            ``pl_actsparse``, level INFO).

    Raises:
        CallbackConfigurationError: an argument is invalid (wrong type, unknown key, options that exclude
            each other), or, at ``setup``, the run cannot work as configured (e.g. ``submodule`` missing).
        InvalidScopeError: a scope is malformed (bad regex, empty, repeated).
        InvalidTargetError: a sparsity is not a number in [0, 1].
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
        token_mask: Literal["auto"] | Callable[[Any], Any] | None = "auto",
        calibration: Literal["auto", "sequential", "lockstep"] = "auto",
        offload: Literal["cpu", "disk"] | None = None,
        recalibrate_every_n_epochs: int | None = None,
        recalibrate_every_n_steps: int | None = None,
        schedule: Literal["constant", "linear"] | SparsitySchedule = "constant",
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
        with _argument("scopes" if scopes is not None else "target_sparsity_by_scope"):
            self.targets = _parse_targets(target_sparsity_by_scope, scopes)
        with _argument("ignored_scope"):
            self.ignored_scope = _parse_ignored(ignored_scope)
        if submodule is not None and (not isinstance(submodule, str) or not all(p.isidentifier() for p in submodule.split("."))):
            raise _tagged(CallbackConfigurationError(f"submodule must be a dotted attribute path such as 'model', got {submodule!r}"), "submodule")
        self.submodule = submodule
        with _argument(None):
            self.calibration_data = CalibrationData(
                calibration_dataloader, calibration_source, num_calibration_batches, max_batches_in_flight, input_key, transform_fn, token_mask,
                calibration, offload,
            )
        with _argument(None):
            self.recalibrate_every_n_epochs = positive_int_or_none(recalibrate_every_n_epochs, "recalibrate_every_n_epochs")
            self.recalibrate_every_n_steps = positive_int_or_none(recalibrate_every_n_steps, "recalibrate_every_n_steps")
            self.schedule = _parse_schedule(schedule, initial_sparsity, ramp_epochs, ramp_steps, ramp_every_n_steps)
            self.gradient_mode = _choice(gradient_mode, "gradient_mode", ("masked", "ste"))
            self.on_train_end_action = _choice(on_train_end, "on_train_end", ("keep", "make_permanent", "remove"))
            self.track = _parse_track(track)
            for name, value in (("log_per_layer", log_per_layer), ("progress", progress), ("verbose", verbose)):
                if not isinstance(value, bool):
                    raise CallbackConfigurationError(f"{name} must be True or False, got {value!r}")
            if not isinstance(log_prefix, str) or not log_prefix or log_prefix.endswith("/"):
                raise CallbackConfigurationError(f"log_prefix must be a non-empty string without a trailing '/', got {log_prefix!r}")
        self.log_per_layer, self.log_prefix, self.progress, self.verbose = log_per_layer, log_prefix, progress, verbose

        # -- run state (checkpointed through state_dict)
        self.history: list[dict[str, Any]] = []
        self.last_calibration_step: int | None = None
        self.finished: str | None = None  # "make_permanent" or "remove" once on_train_end acted
        self._metrics: dict[str, ActivationSparsity] = {}
        self._observing: dict[str, contextlib.ExitStack] = {}
        self._pending_logs: dict[str, float] = {}
        self._layer_names: list[str] = []
        self._calibrated_fingerprint: torch.Tensor | None = None  # weights + thresholds at the last calibration
        self._calibrated_thresholds: dict[str, torch.Tensor] = {}  # the thresholds the last calibration set

    # ---------------------------------------------------------------------------------------------------
    # configuration

    @property
    def state_key(self) -> str:
        return self._generate_state_key(targets=sorted(repr(s) for s in self.targets), submodule=self.submodule)

    # the calibration options, as in the constructor (read-only views of ``calibration_data``)
    calibration_source = property(lambda self: self.calibration_data.source)
    num_calibration_batches = property(lambda self: self.calibration_data.num_batches)
    max_batches_in_flight = property(lambda self: self.calibration_data.max_batches_in_flight)
    input_key = property(lambda self: self.calibration_data.input_key)
    transform_fn = property(lambda self: self.calibration_data.transform_fn)
    token_mask = property(lambda self: self.calibration_data.token_mask)
    calibration = property(lambda self: self.calibration_data.calibration)
    offload = property(lambda self: self.calibration_data.offload)

    def sparsified_module(self, pl_module: LightningModule) -> nn.Module:
        """The module this callback sparsifies: ``pl_module`` or its ``submodule``.

        Raises:
            CallbackConfigurationError: ``submodule`` does not exist on ``pl_module``.
        """
        if self.submodule is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.submodule)
        except AttributeError:
            raise CallbackConfigurationError(
                f"submodule={self.submodule!r}: {type(pl_module).__qualname__} has no such submodule"
            ) from None

    _module = sparsified_module  # the 0.1 name, used by older scripts

    def scheduled_targets(self, epoch: int = 0, step: int = 0, final: bool = False) -> dict[TargetScope, float]:
        """The target of each scope at a point of the schedule (``final``: the callback's own targets)."""
        if final:
            return dict(self.targets)
        return self.schedule.checked_targets(self.targets, epoch, step)

    def calibration_loader_without_trainer(self, datamodule: Any, pl_module: Any) -> tuple[Iterable[Any], str] | None:
        """See :meth:`CalibrationData.loader_without_trainer`."""
        return self.calibration_data.loader_without_trainer(datamodule, pl_module)

    def _current_targets(self, module: nn.Module) -> dict[str, float]:
        return {n: m._actsparse.target for n, m in sparsified_layers(module)}

    # ---------------------------------------------------------------------------------------------------
    # the actions

    def _prepare(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        module = self.sparsified_module(pl_module)
        targets = self.scheduled_targets(trainer.current_epoch, trainer.global_step) if stage == "fit" else self.scheduled_targets(final=True)
        plan = prepare_activation_sparsity(module, targets, self.ignored_scope, gradient_mode=self.gradient_mode)
        self._layer_names = list(plan.targets)

    def _needs_calibration(self, module: nn.Module) -> bool:
        return any(m._actsparse.mode is not SparsifierMode.SPARSIFYING for n, m in sparsified_layers(module) if n in self._layer_names)

    def _calibration_config(self, transform_fn: Callable[[Any], Any] | None, progress: bool) -> CalibrationConfig:
        data = self.calibration_data
        return CalibrationConfig(method=data.calibration, offload=data.offload, token_mask=data.token_mask,
                                 transform_fn=transform_fn, progress=progress,
                                 max_batches_in_flight=data.max_batches_in_flight)

    def calibrate(self, trainer: Trainer, pl_module: LightningModule, reason: str) -> SparsityReport:
        """Calibrate every sparsified layer now (all ranks together) and record before/after sparsity.

        Returns the :class:`~pl_actsparse.measure.report.SparsityReport`; appends an entry to ``history``.
        """
        module = self.sparsified_module(pl_module)
        loader, where = self.calibration_data.resolve(trainer, pl_module)
        items = self.calibration_data.batches(loader, trainer.world_size, trainer.global_rank)
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
                calibration=self._calibration_config(self.calibration_data.inputs_fn(pl_module, module),
                                                     self.progress and trainer.is_global_zero),
            )
        self._check_replicated(trainer, module)
        after = report.mean_sparsity
        before_value, before_by_layer = None, {}
        if before is not None:
            values = before.compute()  # synced over ranks like the calibration statistics
            before_value = float(values["sparsity"])
            before_by_layer = {n: float(values[f"{n}/sparsity"]) for n in calibrated_before}
        entry = {
            "reason": reason,
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
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
        self.last_calibration_step = trainer.global_step
        self._calibrated_fingerprint = _fingerprint(module)
        self._calibrated_thresholds = {n: m.activation_threshold.detach().clone() for n, m in sparsified_layers(module)}
        logs = {"calibration/sparsity": after, "calibration/target": entry["target"], "calibration/count": float(len(self.history))}
        if before_value is not None:
            logs["calibration/sparsity_before"] = before_value
        self._pending_logs.update({f"{self.log_prefix}/{k}": float(v) for k, v in logs.items() if v is not None})
        if self.verbose:
            change = "" if before_value is None else f"; achieved sparsity on this data before {before_value:.4f} -> after {after:.4f}"
            _info(
                f"activation sparsity calibrated ({reason}; epoch {trainer.current_epoch}, step {trainer.global_step}) on {where}"
                f"{change}\n{report}"
            )
        return report

    def _check_replicated(self, trainer: Trainer, module: nn.Module) -> None:
        """Thresholds come from rank-summed statistics, so they must be identical on every rank (DDP, FSDP:
        buffers are replicated, not sharded). A disagreement would silently sparsify ranks differently."""
        if trainer.world_size <= 1:
            return
        values = [m.activation_threshold.detach().double().sum() for n, m in sparsified_layers(module) if n in self._layer_names]
        if not values:
            return
        local = torch.stack(values).to(trainer.strategy.root_device)
        high = trainer.strategy.reduce(local.clone(), reduce_op="max")
        low = -trainer.strategy.reduce(-local, reduce_op="max")
        if not torch.equal(high, low):
            raise ActivationSparsityError(
                "calibration gave different thresholds on different ranks; every rank must calibrate the same layers "
                "on its share of the same calibration data (check that the calibration source is not rank-dependent)"
            )

    def _ensure_calibrated(self, trainer: Trainer, pl_module: LightningModule, reason: str) -> None:
        if self.finished == "remove" or not self._layer_names:
            return
        if self._needs_calibration(self.sparsified_module(pl_module)):
            self.calibrate(trainer, pl_module, reason)

    def _retarget(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        """Apply the schedule's targets for the current epoch/step; True if some target changed."""
        module = self.sparsified_module(pl_module)
        before = self._current_targets(module)
        targets = self.scheduled_targets(trainer.current_epoch, trainer.global_step)
        prepare_activation_sparsity(module, targets, self.ignored_scope, gradient_mode=self.gradient_mode)
        return self._current_targets(module) != before

    def _weights_changed(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        """Whether weights or thresholds differ from those of the last calibration (any rank)."""
        fingerprint = self._calibrated_fingerprint
        module = self.sparsified_module(pl_module)
        changed = fingerprint is None or self._needs_calibration(module) or not _same_fingerprint(fingerprint, _fingerprint(module))
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            return bool(trainer.strategy.reduce_boolean_decision(changed, all=False))
        return changed

    def _thresholds_overwritten(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        """Whether another callback replaced the thresholds this callback calibrated (any rank), as
        ``WeightAveraging`` does when it copies or swaps its averaged model's parameters *and buffers* in."""
        if not self._calibrated_thresholds:
            return False
        layers = dict(sparsified_layers(self.sparsified_module(pl_module)))
        changed = any(
            name not in layers or not torch.equal(layers[name].activation_threshold, value.to(layers[name].activation_threshold.device))
            for name, value in self._calibrated_thresholds.items()
        )
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            return bool(trainer.strategy.reduce_boolean_decision(changed, all=False))
        return changed

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
        module = self.sparsified_module(pl_module)
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
        pl_module.log_dict(logs, on_step=on_step, on_epoch=not on_step, batch_size=1, sync_dist=trainer.world_size > 1 and not on_step)
        if self.verbose and trainer.state.fn in ("validate", "test") and not trainer.sanity_checking:
            _info(achieved_sparsity_table(stage, values, self.sparsified_module(pl_module)))
        return values

    def _stop_and_log(self, stage: str, trainer: Trainer, pl_module: LightningModule, on_step: bool = False) -> None:
        if stage in self._observing:
            self._stop_tracking(stage)
            self._log_metric(stage, pl_module, trainer, on_step=on_step)

    # ---------------------------------------------------------------------------------------------------
    # Lightning hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Install pass-through sparsifiers in place, before the strategy wraps the model (same modules, same
        Parameters), or right after ``configure_model`` when the LightningModule builds its layers there."""
        if stage == "fit":
            _run_after_weight_averaging(trainer, self)
        if self.finished == "remove":
            return
        if self.finished == "make_permanent":  # frozen: adopt the layers as they are
            plan = lambda: setattr(self, "_layer_names", [n for n, _ in sparsified_layers(self.sparsified_module(pl_module))])  # noqa: E731
        else:
            plan = lambda: self._prepare(trainer, pl_module, stage)  # noqa: E731
        if is_overridden("configure_model", pl_module):
            _after_configure_model(pl_module, plan)
        else:
            plan()

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Calibrate unless the model is calibrated (a resumed fit restored thresholds with the weights)."""
        self._ensure_calibrated(trainer, pl_module, "start of fit")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush_logs(pl_module)  # on_fit_start may not log

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Apply the schedule's targets for this epoch (recalibrating if one changed)."""
        if self.finished is None and self._layer_names and self.schedule.check_every_epoch and self._retarget(trainer, pl_module):
            self.calibrate(trainer, pl_module, f"schedule (epoch {trainer.current_epoch})")
            self._flush_logs(pl_module)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Step-wise schedule and recalibration; start measuring the batch on logging steps."""
        if self.finished is None and self._layer_names:
            step, reason = trainer.global_step, None
            every = self.schedule.check_every_n_steps
            if every is not None and step % every == 0 and self._retarget(trainer, pl_module):
                reason = f"schedule (step {step})"
            elif (n := self.recalibrate_every_n_steps) is not None and step > 0 and step % n == 0 and self.last_calibration_step != step:
                reason = f"every {n} steps"
            if reason is not None:
                self.calibrate(trainer, pl_module, reason)
                self._flush_logs(pl_module)
        if "train" in self.track and _should_log_step(trainer):
            self._start_tracking("train", pl_module)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._stop_and_log("train", trainer, pl_module, on_step=True)

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

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Epoch-end recalibration before that epoch's validation; calibrate first in ``validate``."""
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit":
            if trainer.is_last_batch:  # epoch-end validation: recalibrate first, so it measures the new thresholds
                self._epoch_end_recalibration(trainer, pl_module)
        else:
            self._ensure_calibrated(trainer, pl_module, "start of validation")
            self._flush_logs(pl_module)

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start measuring; if a weight-averaging callback (which runs before this one) swapped its averaged
        weights and buffers in, calibrate thresholds for those weights first (its swap back at the end of
        validation restores the training weights with their own thresholds)."""
        if (
            trainer.state.fn == "fit"
            and not trainer.sanity_checking
            and self.finished is None
            and self._layer_names
            and self._thresholds_overwritten(trainer, pl_module)
        ):
            self.calibrate(trainer, pl_module, "validation with weights swapped in by another callback")
            self._flush_logs(pl_module)
        self._start_tracking("val", pl_module)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stop_and_log("val", trainer, pl_module)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ensure_calibrated(trainer, pl_module, "start of test")
        self._flush_logs(pl_module)

    @override
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_tracking("test", pl_module)

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stop_and_log("test", trainer, pl_module)

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ensure_calibrated(trainer, pl_module, "start of predict")
        self._pending_logs.clear()  # predict has no logging

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_end_recalibration(trainer, pl_module)  # runs without validation too; never twice per step

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``make_permanent``: recalibrate if weights or thresholds changed since the last calibration (e.g. a
        weight-averaging callback copied its average in; this callback runs after those), then freeze;
        ``remove``: give back the dense model."""
        action = self.on_train_end_action
        if not self._layer_names:
            return
        if action == "keep":
            # keep the thresholds, but never another model's: a callback that copied its averaged model's
            # buffers in replaced them (the weights moved too), so calibrate on the weights the model ends with
            if self.finished is None and self._thresholds_overwritten(trainer, pl_module):
                self.calibrate(trainer, pl_module, "end of training (thresholds replaced by another callback)")
                self._pending_logs.clear()
            return
        if action == "make_permanent":
            if self._weights_changed(trainer, pl_module):
                self.calibrate(trainer, pl_module, "end of training (make permanent)")
            self._pending_logs.clear()  # on_train_end may not log; the history has it
        else:
            remove_activation_sparsity(self.sparsified_module(pl_module))
            self._layer_names = []
        self.finished = action

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A callback that runs after this one in ``on_train_end`` may still have changed the weights: the
        permanent thresholds must match the weights the model ends with."""
        if self.finished == "make_permanent" and self._layer_names and self._weights_changed(trainer, pl_module):
            self.calibrate(trainer, pl_module, "end of fit (weights changed after make permanent)")
            self._pending_logs.clear()
        _spawn.send_to_main_process(trainer, self, pl_module)

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """A weight-averaging callback (``WeightAveraging``/EMA) saves the *averaged* weights as the checkpoint's
        ``state_dict`` (the current ones under ``current_model_state``): give those weights thresholds
        calibrated on them, so the checkpoint never pairs weights with another model's thresholds."""
        if "current_model_state" not in checkpoint or not self._layer_names or self.finished == "remove" or trainer.state.fn != "fit":
            return
        prefix = "" if self.submodule is None else self.submodule + "."
        averaged = checkpoint["state_dict"]
        current = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in pl_module.state_dict().items()}
        module = self.sparsified_module(pl_module)
        try:
            pl_module.load_state_dict(averaged, strict=False)
            loader, _ = self.calibration_data.resolve(trainer, pl_module)
            with trainer.strategy.precision_plugin.forward_context():
                calibrate_activation_sparsity(
                    module,
                    self.calibration_data.batches(loader, trainer.world_size, trainer.global_rank),
                    layers=[n for n, _ in sparsified_layers(module) if n in self._layer_names],
                    calibration=self._calibration_config(self.calibration_data.inputs_fn(pl_module, module), False),
                )
            for name, m in sparsified_layers(module):
                averaged[f"{prefix}{name}.{THRESHOLD_BUFFER}"] = m.activation_threshold.detach().clone()
                averaged[f"{prefix}{name}._extra_state"] = m.get_extra_state()
        finally:
            pl_module.load_state_dict(current)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for name in list(self._observing):
            self._stop_tracking(name)

    # ---------------------------------------------------------------------------------------------------
    # checkpointing: thresholds are in the model's state dict; this is the run's bookkeeping

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "history": [dict(h) for h in self.history],
            "last_calibration_step": self.last_calibration_step,
            "finished": self.finished,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self.last_calibration_step = state_dict.get("last_calibration_step")
        self.finished = state_dict.get("finished")


# ------------------------------------------------------------------------------------------------------


@rank_zero_only
def _info(message: str) -> None:
    log.info(message)


def _after_configure_model(pl_module: LightningModule, action: Callable[[], None]) -> None:
    """Lightning calls callback ``setup`` before ``LightningModule.configure_model``, where large models build
    their layers: run ``action`` right after that hook (still before checkpoint loading and sharding), by a
    one-shot wrapper in the instance's ``__dict__`` that removes itself."""
    if "configure_model" in pl_module.__dict__:
        return  # already waiting (setup called twice)
    hook = pl_module.configure_model

    def configure_model() -> None:
        del pl_module.__dict__["configure_model"]
        hook()
        action()

    pl_module.__dict__["configure_model"] = configure_model


def _fingerprint(module: nn.Module, chunk: int = 1 << 22) -> torch.Tensor:
    """Per-tensor sum and position-weighted sum of every parameter and buffer, in float64 and in chunks of
    ``chunk`` elements (bounded extra memory): any copy of other weights (weight averaging, a checkpoint load)
    or of other thresholds changes it. Shape ``[2 * tensors]`` on the CPU."""
    sums = []
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_meta or t.numel() == 0:
                continue
            flat = t.detach().reshape(-1)
            total = torch.zeros(2, dtype=torch.float64, device=flat.device)
            for start in range(0, flat.numel(), chunk):
                x = flat[start : start + chunk].double().nan_to_num(0.0, 1e300, -1e300)
                w = torch.arange(start + 1, start + x.numel() + 1, device=x.device, dtype=torch.float64).remainder_(7919).add_(1)
                total += torch.stack([x.sum(), (x * w).sum()])
            sums.append(total)
    return torch.cat(sums).cpu() if sums else torch.zeros(0, dtype=torch.float64)


def _same_fingerprint(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


def _run_after_weight_averaging(trainer: Trainer, callback: Callback) -> None:
    """Move ``callback`` after every weight-averaging callback (and keep checkpoint callbacks last), so its
    ``on_train_end`` and ``on_save_checkpoint`` see the weights those callbacks put in, in either order."""
    from lightning.pytorch.callbacks import Checkpoint, StochasticWeightAveraging

    try:
        from lightning.pytorch.callbacks import WeightAveraging
    except ImportError:  # pragma: no cover - Lightning < 2.5
        WeightAveraging = StochasticWeightAveraging  # type: ignore[misc, assignment]
    callbacks = list(trainer.callbacks)
    averaging = [i for i, c in enumerate(callbacks) if isinstance(c, (StochasticWeightAveraging, WeightAveraging))]
    me = callbacks.index(callback) if callback in callbacks else None
    if me is None or not averaging or me > max(averaging):
        return
    callbacks.remove(callback)
    last = max(i for i, c in enumerate(callbacks) if isinstance(c, (StochasticWeightAveraging, WeightAveraging)))
    first_checkpoint = next((i for i, c in enumerate(callbacks) if isinstance(c, Checkpoint) and i > last), None)
    callbacks.insert(last + 1 if first_checkpoint is None else min(last + 1, first_checkpoint), callback)
    trainer.callbacks = callbacks  # a new list: a hook loop running over the old one is not disturbed


def _mean_target(report: SparsityReport) -> float:
    rows = [r for r in report.layers if r.calibration_elements]
    n = sum(r.calibration_elements for r in rows)
    return sum(r.target * r.calibration_elements for r in rows) / n if n else float("nan")


def achieved_sparsity_table(stage: str, values: Mapping[str, float], module: nn.Module) -> str:
    """Per-layer achieved sparsity on evaluation data next to the calibration result, rendered by rich.

    ``values`` is :meth:`ActivationSparsity.compute` as floats; returns plain text (no colour codes).
    """
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"achieved activation sparsity on the {stage} data (|x| <= threshold)", title_justify="left")
    for i, head in enumerate(("layer", "target", "threshold", "calibration", stage, "token p5", "token p95")):
        table.add_column(head, justify="left" if i == 0 else "right")
    for name, m in sparsified_layers(module):
        if f"{name}/sparsity" not in values:
            continue
        s = m._actsparse
        t = m.activation_threshold
        threshold = f"{float(t):.5g}" if t.numel() == 1 else f"median {float(t.float().median()):.5g}"
        table.add_row(
            name,
            f"{s.target:.3f}",
            threshold,
            "-" if s.calibration_sparsity is None else f"{s.calibration_sparsity:.4f}",
            f"{values[f'{name}/sparsity']:.4f}",
            *(f"{values[k]:.4f}" if k in values else "-" for k in (f"{name}/token_sparsity_p5", f"{name}/token_sparsity_p95")),
        )
    table.add_row(
        "all layers (element-weighted)", "", "", "", f"{values['sparsity']:.4f}",
        *(f"{values[k]:.4f}" if k in values else "-" for k in ("token_sparsity_p5", "token_sparsity_p95")),
    )
    out = StringIO()
    console = Console(file=out, width=200, color_system=None, force_terminal=False)
    console.print(table)
    console.print(f"weight-bytes-weighted: {values['weighted_sparsity']:.4f}")
    return out.getvalue().rstrip()


def _should_log_step(trainer: Trainer) -> bool:
    """Whether Lightning writes step-level logs on this training step (checked in on_train_batch_start)."""
    connector = getattr(trainer, "_logger_connector", None)
    flag = getattr(connector, "should_update_logs", None)
    if isinstance(flag, bool):
        return flag
    n = trainer.log_every_n_steps
    return n > 0 and (trainer.global_step + 1) % n == 0
