"""``ActivationSparsityCallback``: the functional core (:mod:`pl_actsparse.api`) at the right moments of a run.

It installs sparsifiers once the model exists and before the strategy wraps it; calibrates when the model is
not calibrated yet; recalibrates while fine-tuning following a :class:`~pl_actsparse.lightning.schedule.SparsitySchedule`;
and tracks the achieved sparsity. Thresholds live in the model's state dict (so in every checkpoint); the
callback's ``state_dict`` keeps the calibration history. The model is never deep-copied. Weight averaging and
tuners: :mod:`pl_actsparse.lightning.neighbours`.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from torch import nn
from typing_extensions import override

from pl_actsparse.api import (
    check_allocation, validated_targets, calibrate_activation_sparsity, prepare_activation_sparsity, remove_activation_sparsity, sparsify_activations,
)
from pl_actsparse.config import CalibrationConfig, check_choice, positive_int_or_none
from pl_actsparse.core.layer import SparsifierMode, sparsified_layers
from pl_actsparse.core.recipe import SCOPE_SPEC_KEYS, IgnoredScopeSpec, ScopeSpec, parse_ignored_scope_spec, parse_scope_spec, scopes_from_list
from pl_actsparse.core.module_state import preserved_modes
from pl_actsparse.core.scopes import IgnoredScope, TargetScope
from pl_actsparse.errors import ActivationSparsityError, CallbackConfigurationError, InvalidOptionError, InvalidScopeError, InvalidTargetError
from pl_actsparse.lightning import neighbours, spawn
from pl_actsparse.lightning.calibration_data import CalibrationData, config_error
from pl_actsparse.lightning.distillation import DistillationConfig, Distiller
from pl_actsparse.lightning.schedule import SparsitySchedule
from pl_actsparse.measure.metric import ActivationSparsity
from pl_actsparse.measure.report import SparsityReport, achieved_table, activation_sparsity_report
from pl_actsparse.tuning.rotation import check_rotation_options, rotate_activations

__all__ = ["ActivationSparsityCallback", "ScopeSpec", "IgnoredScopeSpec", "CallbackConfigurationError"]

log = logging.getLogger(__name__)

_TRACKABLE = ("train", "val", "test")


def _tag(argument: str, check: Callable[..., Any], *args: Any) -> Any:
    """``check(*args)``; an error it raises is recorded as about the constructor ``argument`` (the YAML key
    below ``init_args`` that ``pl-actsparse`` prints), unless a more precise key was recorded already."""
    try:
        return check(*args)
    except ActivationSparsityError as exc:
        if getattr(exc, "argument", None) is None:
            exc.argument = argument  # type: ignore[attr-defined]
        raise


def _positive(value: Any, name: str) -> int | None:
    return _tag(name, positive_int_or_none, value, name, CallbackConfigurationError)


def _scope_entry(spec: Any, index: int) -> None:
    """Check one ``scopes`` entry; its error names the YAML key (``scopes[1].sparsity``, ``scopes[1].sparsty``)."""
    where = f"scopes[{index}]"
    try:
        parse_scope_spec(spec, where)
    except ActivationSparsityError as exc:
        unknown = sorted(str(k) for k in set(spec) - set(SCOPE_SPEC_KEYS)) if isinstance(spec, Mapping) else []
        exc.argument = where + (f".{unknown[0]}" if unknown else ".sparsity" if type(exc) is InvalidTargetError else "")  # type: ignore[attr-defined]
        raise


def _parse_targets(target_sparsity_by_scope: Any, scopes: Any) -> dict[TargetScope, float]:
    if (target_sparsity_by_scope is None) == (scopes is None):
        raise config_error("scopes", "give exactly one of target_sparsity_by_scope ({TargetScope(...): sparsity}) and scopes "
                           "(a list of {names, patterns, types, sparsity})" + ("; both were given" if scopes is not None else "; neither was given"))
    if scopes is None:
        if not isinstance(target_sparsity_by_scope, Mapping):
            raise config_error("target_sparsity_by_scope", "target_sparsity_by_scope must be a mapping {TargetScope(...): sparsity}, got "
                               f"{type(target_sparsity_by_scope).__qualname__} (for a list of dicts use scopes=)", InvalidScopeError)
        targets = _tag("target_sparsity_by_scope", validated_targets, target_sparsity_by_scope)
    else:
        for i, spec in enumerate(scopes if isinstance(scopes, list) else []):
            _scope_entry(spec, i)
        targets = _tag("scopes", scopes_from_list, scopes)  # the one list parser: the list itself, repeats
    if not targets:
        raise config_error("scopes", "no scope given: at least one {names, patterns, types, sparsity} is needed")
    return targets


def _parse_calibration(value: Any) -> CalibrationConfig:
    if isinstance(value, Mapping):
        for key in value:  # field by field first, so that an error names its YAML key
            _tag(f"calibration.{key}", CalibrationConfig.from_value, {key: value[key]})
    return _tag("calibration", CalibrationConfig.from_value, value)


def _parse_schedule(schedule: Any) -> SparsitySchedule:
    if isinstance(schedule, SparsitySchedule) or schedule == "constant":
        return SparsitySchedule() if schedule == "constant" else schedule
    raise config_error("schedule", "schedule must be 'constant' or a SparsitySchedule (e.g. LinearRamp(initial_sparsity=0.1, "
                       f"epochs=4)), got {schedule!r}")


def _parse_track(track: Any) -> set[str]:
    if isinstance(track, bool) or (isinstance(track, Sequence) and not isinstance(track, str) and all(t in _TRACKABLE for t in track)):
        return set(_TRACKABLE) if track is True else set(track or ())
    raise config_error("track", f"track must be True, False or a list drawn from {list(_TRACKABLE)}, got {track!r}")


# ------------------------------------------------------------------------------------------------------


class ActivationSparsityCallback(Callback):
    """Sparsify a LightningModule's activations: calibrate, track, fine-tune with recalibration, checkpoint.

    The constructor reads like a recipe and every argument has a YAML form (see ``docs/callback.md``)::

        ActivationSparsityCallback(
            scopes=[{"patterns": [".*up_proj", ".*gate_proj"], "sparsity": 0.3},
                    {"patterns": [".*down_proj"], "sparsity": 0.5}],
            calibration_source="calibration_dataloader",   # a LightningDataModule method
            calibration={"num_batches": 16, "offload": "cpu"}, recalibrate_every_n_epochs=1,
        )

    Args:
        target_sparsity_by_scope: ``{TargetScope(...): sparsity}`` as in the functional API (Python use).
        scopes: the same as a list of ``{names, patterns, types, sparsity}`` (YAML use). Give exactly one of
            the two. With a ramp schedule these are the *final* targets.
        ignored_scope: layers never sparsified (``IgnoredScope`` or ``{names, patterns, types}``).
        submodule: dotted attribute path of the module to sparsify and calibrate (e.g. ``"model"``); scope
            names are relative to it. Default: the LightningModule itself. A module built in
            ``LightningModule.configure_model`` is found: planning waits for that hook.
        calibration_dataloader: an explicit iterable of calibration batches.
        calibration_source: where calibration batches come from otherwise: ``"auto"`` (a ``calibration_dataloader``
            method of the datamodule or LightningModule, else the training dataloader), ``"train"``/``"val"``/
            ``"test"``/``"predict"``, or the name of another datamodule (or LightningModule) method returning an
            iterable (:class:`~pl_actsparse.lightning.calibration_data.CalibrationData`).
        input_key: index or key that takes the model inputs out of a batch (e.g. ``0`` for ``(x, y)``). Without
            it (and without ``calibration.transform_fn``) a LightningModule method ``calibration_inputs(batch)``
            is used if defined, else the batch as it is.
        calibration: how to calibrate: a :class:`~pl_actsparse.config.CalibrationConfig`, a mapping of its fields
            (YAML), a method name or None (the defaults). ``num_batches`` takes the first N batches of the source
            (required for the stage dataloaders), split round-robin over DDP ranks with the statistics summed, so
            the thresholds do not depend on the number of processes. ``progress``: a bar on stderr, rank 0, if the trainer has one.
        recalibrate_every_n_epochs: during fit, recalibrate at the end of every N-th training epoch (before its
            validation).
        recalibrate_every_n_steps: during fit, recalibrate every N optimizer steps.
        schedule: ``"constant"`` (the targets from the start) or a :class:`~pl_actsparse.lightning.schedule.SparsitySchedule`,
            e.g. ``LinearRamp(initial_sparsity=0.1, epochs=4)``. Each change of target recalibrates.
        gradient_mode: ``"masked"`` (the exact derivative) or ``"ste"`` (straight-through).
        on_train_end: ``"keep"`` the sparsifiers, ``"make_permanent"`` (recalibrate on the final weights if any
            callback changed them since the last calibration, e.g. ``WeightAveraging``; then freeze), or ``"remove"`` them.
        track: the stages whose achieved sparsity is measured and logged (``True``: train, val and test).
            Training batches are measured on logging steps only (``Trainer(log_every_n_steps=...)``).
        log_per_layer, log_prefix: also log per-layer sparsity, threshold and per-token spread; the namespace of
            every logged key (``actsparse/val/sparsity`` ...).
        verbose: log the calibration and achieved-sparsity tables (rank 0, logger ``pl_actsparse``, level INFO).
        distillation: self-distillation from the dense model during fit (:mod:`pl_actsparse.lightning.distillation`):
            a weight (``0.9``: ``0.1 * loss + 0.9 * KL``), a mapping of its fields (YAML) or a ``DistillationConfig``.
        allocation: as :func:`~pl_actsparse.api.sparsify_activations`' (``"auto"``: each scope's value is a byte budget
            over its layers). Levels are allocated at the first calibration and when the schedule changes a budget;
            recalibrations keep them (``docs/callback.md``). They are in ``state_dict``: a resumed fit keeps them.
        rotation: ``True`` or ``{"heads", "sparsity", "tolerance"}``: first rotate the plain model in place on the calibration data
            (:func:`~pl_actsparse.tuning.rotation.rotate_activations`; ``sparsity`` defaults to the scopes' mean target), at ``setup``.

    Raises:
        CallbackConfigurationError: an argument is invalid, or, at ``setup``, the run cannot work as configured.
            Every error of the constructor has an ``argument`` attribute: its YAML key below ``init_args``.
        InvalidScopeError: a scope is malformed (bad regex, empty, repeated, an unknown key).
        InvalidTargetError: a sparsity is not a number in [0, 1].
        InvalidOptionError: a field of ``calibration``, or ``allocation``, is invalid.
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
        input_key: int | str | None = None,
        calibration: Mapping[str, Any] | CalibrationConfig | str | None = None,  # a YAML mapping stays a mapping: errors name its key
        recalibrate_every_n_epochs: int | None = None,
        recalibrate_every_n_steps: int | None = None,
        schedule: Literal["constant"] | SparsitySchedule = "constant",
        gradient_mode: Literal["masked", "ste"] = "masked",
        on_train_end: Literal["keep", "make_permanent", "remove"] = "keep",
        track: bool | Sequence[str] = True,
        log_per_layer: bool = True,
        log_prefix: str = "actsparse",
        verbose: bool = True,
        distillation: float | Mapping[str, Any] | DistillationConfig | None = None,
        allocation: Literal["uniform", "auto", "fisher"] = "uniform",
        rotation: bool | Mapping[str, Any] = False,
    ) -> None:
        super().__init__()
        self.targets = _parse_targets(target_sparsity_by_scope, scopes)
        self.ignored_scope = _tag("ignored_scope", parse_ignored_scope_spec, ignored_scope)
        if submodule is not None and (not isinstance(submodule, str) or not all(p.isidentifier() for p in submodule.split("."))):
            raise config_error("submodule", f"submodule must be a dotted attribute path such as 'model', got {submodule!r}")
        self.submodule = submodule
        self.calibration_data = CalibrationData(calibration_dataloader, calibration_source, input_key, _parse_calibration(calibration))
        self.recalibrate_every_n_epochs = _positive(recalibrate_every_n_epochs, "recalibrate_every_n_epochs")
        self.recalibrate_every_n_steps = _positive(recalibrate_every_n_steps, "recalibrate_every_n_steps")
        self.schedule = _parse_schedule(schedule)
        self.gradient_mode = _tag("gradient_mode", check_choice, gradient_mode, "gradient_mode", ("masked", "ste"), CallbackConfigurationError)
        self.allocation = _tag("allocation", check_allocation, allocation, self.targets)
        self.rotation = _parse_rotation(rotation, self.targets)
        self.on_train_end_action = _tag("on_train_end", check_choice, on_train_end, "on_train_end", ("keep", "make_permanent", "remove"), CallbackConfigurationError)
        self.track = _parse_track(track)
        for name, value in (("log_per_layer", log_per_layer), ("verbose", verbose)):
            if not isinstance(value, bool):
                raise config_error(name, f"{name} must be True or False, got {value!r}")
        if not isinstance(log_prefix, str) or not log_prefix or log_prefix.endswith("/"):
            raise config_error("log_prefix", f"log_prefix must be a non-empty string without a trailing '/', got {log_prefix!r}")
        self.log_per_layer, self.log_prefix, self.verbose = log_per_layer, log_prefix, verbose
        distill = _tag("distillation", DistillationConfig.from_value, distillation)
        self.distiller = None if distill is None else Distiller(distill, f"{log_prefix}/train/distill_loss")

        # -- run state (checkpointed through state_dict)
        self.history: list[dict[str, Any]] = []
        self.allocated: dict[str, Any] = {}  # the last allocation: {"budgets": {repr(scope): value}, "levels": {layer: level}}
        self.last_calibration_step: int | None = None
        self.finished: str | None = None  # "make_permanent" or "remove" once on_train_end acted
        self.rotated = False  # rotation= done (the model's weights are in the rotated basis)
        self._metrics: dict[str, ActivationSparsity] = {}
        self._observing: dict[str, contextlib.ExitStack] = {}
        self._pending_logs: dict[str, float] = {}
        self._layer_names: list[str] = []
        self._calibrated_fingerprint: torch.Tensor | None = None  # weights + thresholds at the last calibration
        self._calibrated_thresholds: dict[str, torch.Tensor] = {}  # the thresholds the last calibration set

    @property
    def state_key(self) -> str:
        return self._generate_state_key(targets=sorted(repr(s) for s in self.targets), submodule=self.submodule)

    def sparsified_module(self, pl_module: LightningModule) -> nn.Module:
        """The module this callback sparsifies: ``pl_module`` or its ``submodule`` (CallbackConfigurationError if missing)."""
        if self.submodule is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.submodule)
        except AttributeError:
            raise CallbackConfigurationError(f"submodule={self.submodule!r}: {type(pl_module).__qualname__} has no such submodule") from None

    def scheduled_targets(self, epoch: int = 0, step: int = 0, final: bool = False) -> dict[TargetScope, float]:
        """The target of each scope at a point of the schedule (``final``: the callback's own targets)."""
        return dict(self.targets) if final else self.schedule.checked_targets(self.targets, epoch, step)

    def _layers(self, module: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in sparsified_layers(module) if n in self._layer_names]

    # -- the actions

    def _prepare(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        targets = self.scheduled_targets(trainer.current_epoch, trainer.global_step, final=stage != "fit")
        plan = prepare_activation_sparsity(self.sparsified_module(pl_module), targets, self.ignored_scope, gradient_mode=self.gradient_mode,
                                           levels=_levels(self.allocated, targets))
        self._layer_names = list(plan.targets)

    def _needs_calibration(self, module: nn.Module) -> bool:
        return any(m._actsparse.mode is not SparsifierMode.SPARSIFYING for _, m in self._layers(module))

    def _run_calibration(self, trainer: Trainer, pl_module: LightningModule, progress: bool) -> tuple[SparsityReport, str]:
        """Calibrate this callback's layers on this rank's share of the calibration data (all ranks together)."""
        module = self.sparsified_module(pl_module)
        data = self.calibration_data
        loader, where = data.resolve(trainer.datamodule, pl_module, trainer)
        config = data.config.replace(num_batches=None, transform_fn=data.inputs_fn(pl_module, module), progress=progress, loss_fn=data.loss_fn(pl_module))
        batches = data.batches(loader, trainer.world_size, trainer.global_rank)
        budgets = self.scheduled_targets(trainer.current_epoch, trainer.global_step, final=trainer.state.fn != "fit")
        with trainer.strategy.precision_plugin.forward_context():
            if self.allocation == "uniform" or _levels(self.allocated, budgets) is not None:  # keep the levels: thresholds only
                return calibrate_activation_sparsity(module, batches, layers=[n for n, _ in self._layers(module)], calibration=config), where
            with torch.inference_mode(False):  # its backward pass (validate and test hooks run in inference mode)
                sparsify_activations(module, batches, budgets, self.ignored_scope, calibration=config, gradient_mode=self.gradient_mode, allocation=self.allocation)
        self.allocated = {"budgets": {repr(s): float(v) for s, v in budgets.items()}, "levels": {n: m._actsparse.target for n, m in self._layers(module)}}
        return activation_sparsity_report(module), where

    def calibrate(self, trainer: Trainer, pl_module: LightningModule, reason: str) -> SparsityReport:
        """Calibrate every sparsified layer now (all ranks together) and record before/after sparsity.

        Returns the :class:`~pl_actsparse.measure.report.SparsityReport`; appends an entry to ``history``.
        """
        module = self.sparsified_module(pl_module)
        calibrated_before = {n: m.activation_threshold.detach().clone() for n, m in self._layers(module) if m._actsparse.mode is SparsifierMode.SPARSIFYING}
        before = ActivationSparsity.from_model(module).to(pl_module.device) if calibrated_before else None
        with contextlib.ExitStack() as stack:
            stack.enter_context(preserved_modes(pl_module))  # a frozen (eval) backbone stays frozen
            for name, m in sparsified_layers(module):  # count |x| <= old threshold on the very inputs calibration sees
                if before is not None and name in calibrated_before:
                    old = calibrated_before[name]
                    m._actsparse.observers[id(before)] = lambda mod, x, _o, _n=name, _t=old: before.update(_n, x, _t)
                    stack.callback(m._actsparse.observers.pop, id(before), None)
            report, where = self._run_calibration(trainer, pl_module, self.calibration_data.config.progress and trainer.is_global_zero and trainer.progress_bar_callback is not None)
        _check_replicated(trainer, self._layers(module))
        after, values = report.mean_sparsity, before.compute() if before is not None else {}  # synced over ranks like the calibration statistics
        before_value = float(values["sparsity"]) if before is not None else None
        entry = {
            "reason": reason, "epoch": trainer.current_epoch, "step": trainer.global_step, "source": where,
            "elements": sum(r.calibration_elements for r in report.layers), "sparsity_before": before_value, "sparsity_after": after,
            "sparsity_before_by_layer": {n: float(values[f"{n}/sparsity"]) for n in calibrated_before},
            "sparsity_after_by_layer": {r.name: r.calibration_sparsity for r in report.layers},
            "target": report.mean_target, "thresholds": {r.name: r.threshold for r in report.layers},
        }
        self.history.append(entry)
        self.last_calibration_step = trainer.global_step
        self._calibrated_fingerprint = _fingerprint(module)
        self._calibrated_thresholds = {n: m.activation_threshold.detach().clone() for n, m in sparsified_layers(module)}
        logs = {"calibration/sparsity": after, "calibration/target": entry["target"], "calibration/count": float(len(self.history)),
                "calibration/sparsity_before": before_value}
        self._pending_logs.update({f"{self.log_prefix}/{k}": float(v) for k, v in logs.items() if v is not None})
        if self.verbose:
            change = "" if before_value is None else f"; achieved sparsity on this data before {before_value:.4f} -> after {after:.4f}"
            _info(f"activation sparsity calibrated ({reason}; epoch {trainer.current_epoch}, step {trainer.global_step}) on {where}{change}\n{report}")
        return report

    def _ensure_calibrated(self, trainer: Trainer, pl_module: LightningModule, reason: str) -> None:
        if self.finished != "remove" and self._layer_names and self._needs_calibration(self.sparsified_module(pl_module)):
            self.calibrate(trainer, pl_module, reason)

    def _retarget(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        """Apply the schedule's targets for the current epoch/step; True if some target changed."""
        module = self.sparsified_module(pl_module)
        before = {n: m._actsparse.target for n, m in sparsified_layers(module)}
        targets = self.scheduled_targets(trainer.current_epoch, trainer.global_step)
        prepare_activation_sparsity(module, targets, self.ignored_scope, gradient_mode=self.gradient_mode, levels=_levels(self.allocated, targets))
        return {n: m._actsparse.target for n, m in sparsified_layers(module)} != before

    def _weights_changed(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        """Whether weights or thresholds differ from those of the last calibration (any rank)."""
        module, fingerprint = self.sparsified_module(pl_module), self._calibrated_fingerprint
        changed = fingerprint is None or self._needs_calibration(module) or not torch.equal(fingerprint, _fingerprint(module))  # False on shapes that differ
        return _on_any_rank(trainer, changed)

    def _thresholds_overwritten(self, trainer: Trainer, pl_module: LightningModule, at_end: bool = False) -> bool:
        """Whether another callback replaced the thresholds this callback calibrated (any rank); with ``WeightAveraging``
        (it swaps parameters *and buffers* in, thresholds maybe equal), or ``at_end`` SWA: whether weights or thresholds changed since."""
        if not self._calibrated_thresholds:
            return False
        if neighbours.swaps_weights(trainer, at_end):
            return self._weights_changed(trainer, pl_module)
        layers = dict(sparsified_layers(self.sparsified_module(pl_module)))
        changed = any(name not in layers or not torch.equal(layers[name].activation_threshold, value.to(layers[name].activation_threshold.device))
                      for name, value in self._calibrated_thresholds.items())
        return _on_any_rank(trainer, changed)

    def _recalibrate_and_log(self, trainer: Trainer, pl_module: LightningModule, reason: str, log_now: bool = True) -> None:
        self.calibrate(trainer, pl_module, reason)
        self._flush_logs(pl_module) if log_now else self._pending_logs.clear()  # some hooks may not log; the history has it

    def _flush_logs(self, pl_module: LightningModule) -> None:
        logs, self._pending_logs = self._pending_logs, {}
        # values come from rank-summed statistics, identical everywhere; syncing keeps Lightning's DDP check quiet
        for key, value in logs.items():
            pl_module.log(key, value, on_step=False, on_epoch=True, batch_size=1, sync_dist=pl_module.trainer.world_size > 1)

    # -- tracking

    def _start_tracking(self, stage: str, pl_module: LightningModule) -> None:
        if stage not in self.track or self.finished == "remove" or not self._layer_names:
            return
        self._stop_tracking(stage)
        module = self.sparsified_module(pl_module)
        metric = self._metrics.get(stage)
        if metric is None or metric.layers != [n for n, _ in sparsified_layers(module)]:
            metric = self._metrics[stage] = ActivationSparsity.from_model(module)
        metric.to(pl_module.device).reset()
        stack = contextlib.ExitStack()
        stack.enter_context(metric.observe(module))
        self._observing[stage] = stack

    def _stop_tracking(self, stage: str) -> None:
        self._observing.pop(stage, contextlib.ExitStack()).close()

    def _stop_and_log(self, stage: str, trainer: Trainer, pl_module: LightningModule, on_step: bool = False) -> None:
        if stage not in self._observing:
            return
        self._stop_tracking(stage)
        metric = self._metrics.get(stage)
        if metric is None or not metric.update_called:
            return
        values = {k: float(v) for k, v in metric.compute().items()}  # synced over ranks
        unseen = [k.rpartition("/")[0] for k, v in values.items() if k.endswith("/sparsity") and v != v]  # NaN
        if unseen:  # never silently dense: a layer whose forward bypasses its sparsifier is no layer of this model
            rank_zero_warn(f"{stage}: sparsified layers {unseen} saw no input: the model's forward never reached "
                          "their sparsifiers (not called, or a forward patched after sparsification)")
        prefix = f"{self.log_prefix}/{stage}/"
        logs = {prefix + k: v for k, v in values.items() if self.log_per_layer or "/" not in k}
        pl_module.log_dict(logs, on_step=on_step, on_epoch=not on_step, batch_size=1, sync_dist=trainer.world_size > 1 and not on_step)
        if self.verbose and trainer.state.fn in ("validate", "test") and not trainer.sanity_checking:
            _info(achieved_table(stage, values, self.sparsified_module(pl_module)))

    # -- Lightning hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Install pass-through sparsifiers in place, before the strategy wraps the model (same modules, same
        Parameters), or right after ``configure_model`` when the LightningModule builds its layers there."""
        copy_again = neighbours.arrange(trainer, self, pl_module, stage)  # weight averaging, tuners: see neighbours.py
        if self.finished == "remove":
            return
        if self.finished == "make_permanent":  # frozen: adopt the layers as they are
            prepare = lambda: setattr(self, "_layer_names", [n for n, _ in sparsified_layers(self.sparsified_module(pl_module))])  # noqa: E731
        else:
            prepare = lambda: (_rotate_first(self, trainer, pl_module), self._prepare(trainer, pl_module, stage))  # noqa: E731
        plan = lambda: (prepare(), copy_again())  # noqa: E731
        _after_configure_model(pl_module, plan) if is_overridden("configure_model", pl_module) else plan()

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Calibrate unless the model is calibrated (a resumed fit restored thresholds with the weights); attach distillation."""
        self._ensure_calibrated(trainer, pl_module, "start of fit")
        if self.distiller is not None and self._layer_names and self.finished is None:
            self.distiller.attach(trainer, pl_module, self.sparsified_module(pl_module))

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush_logs(pl_module)  # on_fit_start may not log

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Apply the schedule's targets for this epoch (recalibrating if one changed)."""
        if self.finished is None and self._layer_names and self.schedule.check_every_epoch and self._retarget(trainer, pl_module):
            self._recalibrate_and_log(trainer, pl_module, f"schedule (epoch {trainer.current_epoch})")

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Step-wise schedule and recalibration; start measuring the batch on logging steps."""
        step, every, n = trainer.global_step, self.schedule.check_every_n_steps, self.recalibrate_every_n_steps
        if self.finished is None and self._layer_names:
            if every is not None and step % every == 0 and self._retarget(trainer, pl_module):
                self._recalibrate_and_log(trainer, pl_module, f"schedule (step {step})")
            elif n is not None and step > 0 and step % n == 0 and self.last_calibration_step != step:
                self._recalibrate_and_log(trainer, pl_module, f"every {n} steps")
        # Lightning writes step logs when (optimizer steps + 1) % log_every_n_steps == 0, or when stopping
        n_log = trainer.log_every_n_steps
        if "train" in self.track and n_log > 0 and ((step + 1) % n_log == 0 or trainer.should_stop):
            self._start_tracking("train", pl_module)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._stop_and_log("train", trainer, pl_module, on_step=True)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Recalibrate every N epochs (before that epoch's validation: see ``on_validation_start``); never twice per step."""
        n = self.recalibrate_every_n_epochs
        if self.finished is None and n is not None and self._layer_names and (trainer.current_epoch + 1) % n == 0 and self.last_calibration_step != trainer.global_step:
            self._recalibrate_and_log(trainer, pl_module, f"every {n} epoch(s)")

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Epoch-end recalibration before that epoch's validation; calibrate first in ``validate``."""
        if trainer.sanity_checking:
            return
        if trainer.state.fn != "fit":
            self._ensure_calibrated(trainer, pl_module, "start of validation")
            self._flush_logs(pl_module)
        elif trainer.is_last_batch:  # epoch-end validation: recalibrate first, so it measures the new thresholds
            self.on_train_epoch_end(trainer, pl_module)

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start measuring; if a weight-averaging callback (which runs before this one) swapped its averaged
        weights and buffers in, calibrate thresholds for those weights first (its swap back at the end of
        validation restores the training weights with their own thresholds)."""
        if trainer.state.fn == "fit" and not trainer.sanity_checking and self.finished is None and self._layer_names and self._thresholds_overwritten(trainer, pl_module):
            self._recalibrate_and_log(trainer, pl_module, "validation with weights swapped in by another callback")
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
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``make_permanent``: recalibrate if weights or thresholds changed since the last calibration (e.g. a
        weight-averaging callback copied its average in; this callback runs after those), then freeze;
        ``remove``: give back the dense model; ``keep``: keep the thresholds, but never another model's."""
        action = self.on_train_end_action
        if not self._layer_names:
            return
        if action == "keep":
            if self.finished is None and self._thresholds_overwritten(trainer, pl_module, at_end=True):
                self._recalibrate_and_log(trainer, pl_module, "end of training (weights or thresholds replaced by another callback)", log_now=False)
            return
        if action == "make_permanent":
            if self._weights_changed(trainer, pl_module):
                self._recalibrate_and_log(trainer, pl_module, "end of training (make permanent)", log_now=False)
        else:
            remove_activation_sparsity(self.sparsified_module(pl_module))
            self._layer_names = []
        self.finished = action

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A callback that runs after this one in ``on_train_end`` may still have changed the weights: the
        permanent thresholds must match the weights the model ends with."""
        if self.finished == "make_permanent" and self._layer_names and self._weights_changed(trainer, pl_module):
            self._recalibrate_and_log(trainer, pl_module, "end of fit (weights changed after make permanent)", log_now=False)
        spawn.send_to_main_process(trainer, self, pl_module)

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """A weight-averaging callback saves the *averaged* weights: give them thresholds calibrated on them."""
        if "current_model_state" in checkpoint and self._layer_names and self.finished != "remove" and trainer.state.fn == "fit":
            neighbours.calibrate_averaged_checkpoint(self, trainer, pl_module, checkpoint)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for name in list(self._observing):
            self._stop_tracking(name)
        neighbours.release(trainer)
        self.distiller is not None and self.distiller.detach()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Lightning calls no teardown after a failed run; layers never calibrated (the run failed before) are given back."""
        self.teardown(trainer, pl_module, "exception")
        module = self.sparsified_module(pl_module) if self._layer_names else None  # (a bad submodule= fails before any layer)
        layers = self._layers(module) if module is not None else []
        if layers and all(m._actsparse.mode is SparsifierMode.PASSTHROUGH for _, m in layers):
            remove_activation_sparsity(module, TargetScope(names=[n for n, _ in layers]))
            self._layer_names = []

    # -- checkpointing: thresholds are in the model's state dict; this is the run's bookkeeping

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "history": [dict(h) for h in self.history], "last_calibration_step": self.last_calibration_step, "finished": self.finished,
                "allocated": self.allocated, "distillation_teacher": self.distiller and self.distiller.teacher_weights, "rotated": self.rotated}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self.last_calibration_step = state_dict.get("last_calibration_step")
        self.finished, self.allocated = state_dict.get("finished"), state_dict.get("allocated", {})
        _check_rotation_state(self, bool(state_dict.get("rotated")))
        if self.distiller is not None:  # a resumed fit distils from the weights of the original start of fit
            self.distiller.teacher_weights = state_dict.get("distillation_teacher")


# ------------------------------------------------------------------------------------------------------


@rank_zero_only
def _info(message: str) -> None:
    log.info(message)


def _levels(allocated: Mapping[str, Any], budgets: Mapping[TargetScope, float]) -> dict[str, float] | None:
    """The levels of the last allocation if it was for these budgets, else None (uniform, or allocate anew)."""
    return dict(allocated["levels"]) if allocated and allocated["budgets"] == {repr(s): float(v) for s, v in budgets.items()} else None


def _parse_rotation(value: Any, targets: Mapping[TargetScope, float]) -> dict[str, Any] | None:
    """rotate_activations' options; ``sparsity`` (the axes turned for it) defaults to the scopes' mean target."""
    if value is None or value is False:
        return None
    if value is not True and not (isinstance(value, Mapping) and set(value) <= {"heads", "tolerance", "sparsity"}):
        raise config_error("rotation", f"rotation must be True, False or a mapping of rotate_activations' options 'heads', 'sparsity' and 'tolerance', got {value!r}")
    mean = sum(targets.values()) / len(targets)
    options = {"sparsity": round(mean, 6) if 0 < mean < 1 else None, **({} if value is True else value)}
    return _tag("rotation", lambda: check_rotation_options(**options))


def _check_rotation_state(callback: ActivationSparsityCallback, saved: bool) -> None:
    """A checkpoint's weights need the structure of the fit that saved them: a tied head would load the rotated run's untied
    embedding and head into one tensor; an untied (rotated) fresh model has one more parameter than the optimizer state."""
    if saved != callback.rotated:
        raise config_error("rotation", f"the checkpoint comes from a fit {'with' if saved else 'without'} rotation= (weights in the "
                           f"{'rotated' if saved else 'original'} basis, head {'untied' if saved else 'as built'}) and this callback "
                           f"{'has none' if saved else 'rotated the fresh model'}: resume (or test) with {'the same rotation=' if saved else 'rotation=False'}")


def _rotate_first(callback: ActivationSparsityCallback, trainer: Trainer, pl_module: LightningModule) -> None:
    """``rotation=``: rotate the plain model on this rank's share of the calibration data, before the sparsifiers exist and
    before the strategy builds the optimizers and wraps the model (an untied head is then a parameter like any other). Once
    per callback: a resumed fit rotates the fresh model too (for the untied head) and then loads the checkpoint over it."""
    if callback.rotation is None or callback.rotated:
        return
    module, data = callback.sparsified_module(pl_module), callback.calibration_data
    if done := [name for name, _ in sparsified_layers(module)][:3]:  # e.g. by another callback whose setup ran first
        raise config_error("rotation", f"rotation=True needs the plain model, but {done}... are sparsified already: list the callback with "
                           "rotation= before any other ActivationSparsityCallback on this model, or rotate before sparsify_activations")
    loader, where = data.resolve(trainer.datamodule, pl_module, trainer)
    config = CalibrationConfig(transform_fn=data.inputs_fn(pl_module, module), token_mask=data.config.token_mask, sync_across_processes=data.config.sync_across_processes,
                               progress=data.config.progress and trainer.is_global_zero and trainer.progress_bar_callback is not None)  # as calibrate's bar
    try:
        rotate_activations(module, data.batches(loader, trainer.world_size, trainer.global_rank), calibration=config, **callback.rotation)
    except ActivationSparsityError as exc:  # raised in fit/test, where the CLI prints no YAML key: the message names it
        if getattr(exc, "argument", None) is None:  # (an input_key error keeps its own)
            exc.args, exc.argument = (f"ActivationSparsityCallback(rotation=...) (YAML key rotation): {exc}", *exc.args[1:]), "rotation"  # type: ignore[attr-defined]
        raise
    callback.rotated = True
    if callback.verbose:
        _info(f"rotated the activations of {type(module).__name__} into their principal axes ({callback.rotation}) on {where}")


def _check_replicated(trainer: Trainer, layers: Sequence[tuple[str, nn.Module]]) -> None:
    """Thresholds come from rank-summed statistics, so they must be identical on every rank (DDP, FSDP: buffers are
    replicated, not sharded); so must allocated levels. A disagreement would silently sparsify ranks differently."""
    if trainer.world_size <= 1 or not layers:
        return
    local = torch.stack([v for _, m in layers for v in (m.activation_threshold.detach().double().sum(), m.activation_threshold.new_tensor(m._actsparse.target, dtype=torch.float64))])
    local = local.to(trainer.strategy.root_device)
    if not torch.equal(trainer.strategy.reduce(local.clone(), reduce_op="max"), -trainer.strategy.reduce(-local, reduce_op="max")):
        raise ActivationSparsityError("calibration gave different thresholds or levels on different ranks; every rank must calibrate the same layers on "
                                      "its share of the same calibration data (check that the calibration source is not rank-dependent)")


def _on_any_rank(trainer: Trainer, flag: bool) -> bool:
    """``flag`` or-ed over ranks (a decision every rank must take together)."""
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        return bool(trainer.strategy.reduce_boolean_decision(flag, all=False))
    return flag


def _after_configure_model(pl_module: LightningModule, action: Callable[[], None]) -> None:
    """Run ``action`` right after ``LightningModule.configure_model`` (called after callback ``setup``, before checkpoint
    loading and sharding; large models build their layers there), by a one-shot wrapper in the instance's ``__dict__``."""
    if "configure_model" in pl_module.__dict__:
        return  # already waiting (setup called twice)
    hook = pl_module.configure_model

    def configure_model() -> None:
        del pl_module.__dict__["configure_model"]
        hook()
        action()

    pl_module.__dict__["configure_model"] = configure_model


def _fingerprint(module: nn.Module, chunk: int = 1 << 22) -> torch.Tensor:
    """Per-tensor sum and position-weighted sum of every parameter and buffer (float64, in chunks: bounded memory); any
    copy of other weights (weight averaging, a checkpoint load) or thresholds changes it. Shape ``[2 * tensors]``, CPU."""
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
