"""The plain-PyTorch API: plan, sparsify, calibrate, remove, load.

Everything the Lightning callback does goes through these functions, so non-Lightning users get the same
behaviour. All input is validated before the first module is changed, and a failed calibration puts every
layer back as it was.
"""

from __future__ import annotations

import itertools
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from pl_actsparse.core.calibration import LayerStatistics, calibrate_layers
from pl_actsparse.errors import (
    ConflictingScopesError,
    EmptyDatasetError,
    InvalidScopeError,
    InvalidTargetError,
    NothingToSparsifyError,
    NotSparsifiedError,
    TokenMaskError,
    UnmatchedScopeError,
    UnsupportedModuleError,
)
from pl_actsparse.core.layer import (
    THRESHOLD_BUFFER,
    GradientMode,
    SparsifierMode,
    install_sparsifier,
    is_linear_like,
    is_sparsified,
    sparsified_layers,
    uninstall_sparsifier,
)
from pl_actsparse.core.masking import resolve_mask_fn
from pl_actsparse.measure.report import SparsityReport, activation_sparsity_report
from pl_actsparse.core.scopes import IgnoredScope, TargetScope

__all__ = [
    "SparsityPlan",
    "plan_activation_sparsity",
    "prepare_activation_sparsity",
    "calibrate_activation_sparsity",
    "sparsify_activations",
    "remove_activation_sparsity",
    "load_activation_sparsity",
    "set_target_sparsity",
]


@dataclass
class SparsityPlan:
    """Which layer gets which target, resolved and validated against one model."""

    targets: dict[str, float]  # layer name -> target sparsity, in model order
    claimed_by: dict[str, TargetScope] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # matched by pattern/type but not a Linear
    ignored: list[str] = field(default_factory=list)  # Linear layers a target scope matched and IgnoredScope removed


def validate_target(value: Any, where: str) -> float:
    """A target must be a real number in [0, 1]; say which one is not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidTargetError(f"target sparsity for {where} must be a number in [0, 1], got {value!r}")
    v = float(value)
    if math.isnan(v) or not 0.0 <= v <= 1.0:
        raise InvalidTargetError(f"target sparsity for {where} must be in [0, 1], got {value!r}")
    return v


def _validated_targets(target_sparsity_by_scope: Mapping[TargetScope, float]) -> dict[TargetScope, float]:
    """Check ``{TargetScope: sparsity}`` entry by entry (shared by the functional API and the callback)."""
    targets: dict[TargetScope, float] = {}
    for scope, value in target_sparsity_by_scope.items():
        if not isinstance(scope, TargetScope):
            raise InvalidScopeError(f"keys of target_sparsity_by_scope must be TargetScope objects, got {scope!r}")
        if scope.is_empty():
            raise InvalidScopeError(f"{scope!r} has no names, patterns or types, so it selects nothing")
        targets[scope] = validate_target(value, repr(scope))
    return targets


def plan_activation_sparsity(
    model: nn.Module,
    target_sparsity_by_scope: Mapping[TargetScope, float],
    ignored_scope: IgnoredScope | None = None,
) -> SparsityPlan:
    """Resolve scopes to layers and check everything, without touching the model.

    Raises (all ``ValueError`` subclasses): :class:`InvalidTargetError`, :class:`InvalidScopeError`,
    :class:`UnmatchedScopeError` (listing every entry that matched no ``nn.Linear``),
    :class:`UnsupportedModuleError` (an exact name that is not an ``nn.Linear``),
    :class:`ConflictingScopesError`, :class:`NothingToSparsifyError`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__qualname__}")
    if not isinstance(target_sparsity_by_scope, Mapping):
        raise InvalidScopeError(
            "target_sparsity_by_scope must be a mapping {TargetScope(...): sparsity}, "
            f"got {type(target_sparsity_by_scope).__qualname__}"
        )
    if not target_sparsity_by_scope:
        raise NothingToSparsifyError("target_sparsity_by_scope is empty: give at least one {TargetScope(...): sparsity}")
    if ignored_scope is None:
        ignored_scope = IgnoredScope()
    if not isinstance(ignored_scope, IgnoredScope):
        raise InvalidScopeError(f"ignored_scope must be an IgnoredScope, got {ignored_scope!r}")

    targets = _validated_targets(target_sparsity_by_scope)

    modules = list(model.named_modules())
    is_linear = {name: is_linear_like(m) for name, m in modules}
    class_of = {name: type(m).__qualname__ for name, m in modules}

    unmatched: list[str] = []
    unsupported: list[str] = []
    skipped: dict[str, str] = {}
    claims: dict[str, list[TargetScope]] = {}
    for scope in targets:
        match = scope.match(modules)
        for name, hits in match.by_name.items():
            if hits and not is_linear[name]:
                unsupported.append(f"{name!r} ({class_of[name]})")
        for label, hits in itertools.chain(match.by_name.items(), match.by_pattern.items(), match.by_type.items()):
            if scope.validate and not any(is_linear[h] for h in hits):
                what = "" if not hits else f" (only non-Linear modules: {hits[:5]}{'...' if len(hits) > 5 else ''})"
                unmatched.append(f"{scope!r}: {_entry_kind(match, label)} {label!r}{what}")
        for name in match.all_names():
            if is_linear[name]:
                claims.setdefault(name, []).append(scope)
            elif name and name not in scope.names and not _is_private(name):
                skipped[name] = f"{class_of[name]} is not an nn.Linear"

    ignored_match = ignored_scope.match(modules)
    if ignored_scope.validate:
        unmatched += [f"{ignored_scope!r}: {entry}" for entry in ignored_match.unmatched()]
    ignored_names = set(ignored_match.all_names())

    if unsupported:
        raise UnsupportedModuleError(
            "these modules are named exactly in a TargetScope but are not nn.Linear (only nn.Linear, "
            "its subclasses and registered Linear-like types such as transformers' Conv1D can be sparsified; "
            "see pl_actsparse.core.layer.register_linear_like): " + ", ".join(unsupported)
        )
    if unmatched:
        raise UnmatchedScopeError(
            "these scope entries match no nn.Linear of the model (names are qualified module names from "
            "model.named_modules(); patterns use re.fullmatch): " + "; ".join(unmatched)
        )
    conflicts = {n: s for n, s in claims.items() if len(s) > 1 and n not in ignored_names}
    if conflicts:
        detail = "; ".join(f"{n!r} by {' and '.join(repr(s) for s in scopes)}" for n, scopes in conflicts.items())
        raise ConflictingScopesError(f"layers claimed by more than one TargetScope (each layer needs one target): {detail}")

    order = [name for name, _ in modules]
    chosen = [n for n in order if n in claims and n not in ignored_names]
    if not chosen:
        raise NothingToSparsifyError(
            f"no layer left to sparsify: the target scopes matched {len(claims)} nn.Linear layer(s) and "
            f"ignored_scope removed {len([n for n in claims if n in ignored_names])} of them"
        )
    return SparsityPlan(
        targets={n: targets[claims[n][0]] for n in chosen},
        claimed_by={n: claims[n][0] for n in chosen},
        skipped=[(n, skipped[n]) for n in order if n in skipped and n not in ignored_names],
        ignored=[n for n in order if n in claims and n in ignored_names],
    )


def _is_private(name: str) -> bool:
    """Storage of other tools (NNCF's ``__nncf_hooks``) is nobody's layer: never list it as skipped."""
    return any(part.startswith("__") for part in name.split("."))


def _entry_kind(match: Any, label: str) -> str:
    if label in match.by_name:
        return "name"
    if label in match.by_pattern:
        return "pattern"
    return "type"


def prepare_activation_sparsity(
    model: nn.Module,
    target_sparsity_by_scope: Mapping[TargetScope, float],
    ignored_scope: IgnoredScope | None = None,
    *,
    gradient_mode: GradientMode | str = GradientMode.MASKED,
) -> SparsityPlan:
    """Install pass-through sparsifiers on the planned layers, to be calibrated later.

    Use this when sparsifiers must exist before the model is wrapped (DDP) but calibration data comes later.
    A layer that was already calibrated keeps its threshold unless its target changes.
    """
    gradient_mode = _gradient_mode(gradient_mode)
    plan = plan_activation_sparsity(model, target_sparsity_by_scope, ignored_scope)
    modules = dict(model.named_modules())
    for name, target in plan.targets.items():
        module = modules[name]
        retarget = is_sparsified(module) and module._actsparse.target != target
        install_sparsifier(module, target, gradient_mode)
        if retarget:
            module._actsparse.mode = SparsifierMode.PASSTHROUGH
    model.__dict__["_actsparse_plan"] = plan
    return plan


def _gradient_mode(value: GradientMode | str) -> GradientMode:
    try:
        return GradientMode(value)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in GradientMode)
        raise InvalidTargetError(f"gradient_mode must be one of {valid}, got {value!r}") from None


def _check_options(num_calibration_batches: Any, transform_fn: Any, max_batches_in_flight: Any = None) -> None:
    for name, value in (("num_calibration_batches", num_calibration_batches), ("max_batches_in_flight", max_batches_in_flight)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise InvalidTargetError(f"{name} must be a positive integer or None, got {value!r}")
    if transform_fn is not None and not callable(transform_fn):
        raise InvalidTargetError(f"transform_fn must be callable or None, got {transform_fn!r}")


def _check_token_mask(token_mask: Any) -> None:
    """``token_mask`` must be ``"auto"``, ``None`` or a callable (checked before any module changes)."""
    try:
        resolve_mask_fn(token_mask)
    except TypeError as exc:
        raise TokenMaskError(str(exc)) from None


def _peek(dataset: Iterable[Any]) -> Iterable[Any]:
    """Fail on empty data before anything changes, without consuming an item."""
    try:
        iterator = iter(dataset)
    except TypeError:
        raise EmptyDatasetError(f"calibration data must be iterable (a DataLoader, list, ...), got {type(dataset).__qualname__}") from None
    try:
        first = next(iterator)
    except StopIteration:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return []  # this rank's shard is empty; calibration checks the global total
        raise EmptyDatasetError("the calibration data is empty: it yielded no item") from None
    return itertools.chain([first], iterator)


@dataclass
class _Snapshot:
    was_sparsified: bool
    threshold: torch.Tensor | None = None
    extra: dict[str, Any] | None = None


def _snapshot(modules: dict[str, nn.Module], names: Iterable[str]) -> dict[str, _Snapshot]:
    snaps = {}
    for n in names:
        m = modules[n]
        if is_sparsified(m):
            snaps[n] = _Snapshot(True, m.activation_threshold.detach().clone(), m.get_extra_state())
        else:
            snaps[n] = _Snapshot(False)
    return snaps


def _restore(modules: dict[str, nn.Module], snaps: dict[str, _Snapshot]) -> None:
    for n, snap in snaps.items():
        m = modules[n]
        if not snap.was_sparsified:
            uninstall_sparsifier(m)
        elif is_sparsified(m):
            if m.activation_threshold.shape == snap.threshold.shape:
                m.activation_threshold.copy_(snap.threshold)
            else:  # a per-channel threshold replaced a scalar one, or back
                m._buffers[THRESHOLD_BUFFER] = snap.threshold.clone()
            m.set_extra_state(snap.extra)


def calibrate_activation_sparsity(
    model: nn.Module,
    dataset: Iterable[Any],
    *,
    layers: Iterable[str] | None = None,
    num_calibration_batches: int | None = None,
    transform_fn: Callable[[Any], Any] | None = None,
    progress: bool = True,
    sync_across_processes: bool | None = None,
    max_batches_in_flight: int | None = None,
    token_mask: str | Callable[[Any], torch.Tensor | None] | None = "auto",
) -> SparsityReport:
    """(Re)calibrate sparsified layers at their current targets and return the report.

    ``layers`` limits calibration to some layer names (default: every sparsified layer). The report carries
    the calibration histograms in ``report.statistics``. If anything fails, every layer keeps the threshold
    it had. ``token_mask`` and the other options are those of :func:`sparsify_activations`.
    """
    _check_options(num_calibration_batches, transform_fn, max_batches_in_flight)
    _check_token_mask(token_mask)
    modules = dict(model.named_modules())
    present = [n for n, _ in sparsified_layers(model)]
    if not present:
        raise NotSparsifiedError("the model has no sparsified layer: call sparsify_activations or prepare_activation_sparsity first")
    names = present if layers is None else list(layers)
    unknown = [n for n in names if n not in present]
    if unknown:
        raise NotSparsifiedError(f"cannot calibrate {unknown}: not sparsified layers of the model; sparsified layers are {present}")
    items = _peek(dataset)
    snaps = _snapshot(modules, names)
    try:
        stats = calibrate_layers(
            model,
            [(n, modules[n]) for n in names],
            items,
            transform_fn=transform_fn,
            num_calibration_batches=num_calibration_batches,
            max_batches_in_flight=max_batches_in_flight,
            progress=progress,
            sync_across_processes=sync_across_processes,
            token_mask=token_mask,
        )
    except BaseException:
        _restore(modules, snaps)
        raise
    _record(modules, stats)
    report = activation_sparsity_report(model)
    report.statistics = stats
    return report


def _record(modules: dict[str, nn.Module], stats: dict[str, LayerStatistics]) -> None:
    for name, st in stats.items():
        state = modules[name]._actsparse
        state.calibration_sparsity = st.achieved
        state.calibration_elements = st.elements


def sparsify_activations(
    model: nn.Module,
    dataset: Iterable[Any],
    target_sparsity_by_scope: Mapping[TargetScope, float],
    ignored_scope: IgnoredScope | None = None,
    *,
    num_calibration_batches: int | None = None,
    transform_fn: Callable[[Any], Any] | None = None,
    gradient_mode: GradientMode | str = GradientMode.MASKED,
    progress: bool = True,
    sync_across_processes: bool | None = None,
    max_batches_in_flight: int | None = None,
    token_mask: str | Callable[[Any], torch.Tensor | None] | None = "auto",
) -> nn.Module:
    """Sparsify the inputs of the selected Linear layers and calibrate exact thresholds, in place.

    Each layer's threshold is the exact quantile of ``|x|`` over all of its calibration elements, measured
    with every selected layer already sparsified (one forward pass over the data, see
    :mod:`pl_actsparse.core.calibration`). Elements are the inputs of real tokens (``token_mask``) in every
    call of the layer: a module called several times per forward is calibrated over all its calls.
    Calling it again on a sparsified model recalibrates the selected
    layers (new targets allowed) and never stacks a second sparsifier; sparsified layers that the new recipe
    does not select keep their thresholds.

    Args:
        model: any ``nn.Module``; layers are found by qualified name in ``model.named_modules()``.
        dataset: an iterable of calibration items (a DataLoader, a list of tensors, ...).
        target_sparsity_by_scope: ``{TargetScope(...): fraction of inputs to zero}``, each in [0, 1].
        ignored_scope: layers never to sparsify.
        num_calibration_batches: use at most this many items of ``dataset``.
        transform_fn: maps an item to model inputs; by default the item itself. Inputs that are a dict are
            passed as keyword arguments, a tuple or list as positional arguments, anything else as the single
            argument (so a loader of ``(input, label)`` pairs needs ``transform_fn=lambda b: b[0]``).
        gradient_mode: ``"masked"`` or ``"ste"``, how gradients cross the zeroing when training afterwards.
        progress: show a progress bar over layers.
        sync_across_processes: sum calibration statistics over ``torch.distributed`` ranks (default: when a
            process group with several ranks is initialized).
        max_batches_in_flight: bound memory by running batches in lockstep groups of this size (default: all
            at once, which is exact; smaller groups make calibration streaming and approximately exact).
        token_mask: which input elements are data. ``"auto"`` (default): a dict item's ``attention_mask``
            (bool/0-1 ``[batch, seq]``, 1 = real token) masks padding, other items count every element;
            ``None``: every element counts; a callable ``item -> bool mask [batch, seq]`` (or ``None``) for
            other layouts. It receives the item as ``dataset`` yields it, before ``transform_fn``.

    Raises:
        TokenMaskError: ``token_mask`` is not one of these (before any change), or a layer's input has no
            leading ``[batch, seq]`` (or flattened ``[batch * seq]``) axes matching the mask (the model is
            restored).
        CalibrationConvergenceError: layers called several times per forward that feed each other reached no
            thresholds within ``COUPLED_TOLERANCE`` (0.002) of their fixed points (model restored; see
            ``docs/calibration.md``).

    Returns:
        The same model object. :func:`activation_sparsity_report` tells what was done.

    >>> import torch
    >>> from torch import nn
    >>> from pl_actsparse import sparsify_activations, remove_activation_sparsity, TargetScope
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> data = [torch.randn(8, 16) for _ in range(4)]
    >>> _ = sparsify_activations(net, data, {TargetScope(types=[nn.Linear]): 0.5}, progress=False)
    >>> x = net[0].sparsify_input(torch.cat(data))
    >>> float((x == 0).float().mean())
    0.5
    >>> _ = remove_activation_sparsity(net)
    >>> type(net[0]) is nn.Linear
    True
    """
    _check_options(num_calibration_batches, transform_fn, max_batches_in_flight)
    _check_token_mask(token_mask)
    mode = _gradient_mode(gradient_mode)
    plan = plan_activation_sparsity(model, target_sparsity_by_scope, ignored_scope)
    items = _peek(dataset)
    modules = dict(model.named_modules())
    snaps = _snapshot(modules, plan.targets)
    previous_plan = model.__dict__.get("_actsparse_plan")
    try:
        for name, target in plan.targets.items():
            install_sparsifier(modules[name], target, mode)
        model.__dict__["_actsparse_plan"] = plan
        stats = calibrate_layers(
            model,
            [(n, modules[n]) for n in plan.targets],
            items,
            transform_fn=transform_fn,
            num_calibration_batches=num_calibration_batches,
            max_batches_in_flight=max_batches_in_flight,
            progress=progress,
            sync_across_processes=sync_across_processes,
            token_mask=token_mask,
        )
    except BaseException:
        _restore(modules, snaps)
        if previous_plan is None:
            model.__dict__.pop("_actsparse_plan", None)
        else:
            model.__dict__["_actsparse_plan"] = previous_plan
        raise
    _record(modules, stats)
    return model


def remove_activation_sparsity(model: nn.Module, scope: TargetScope | None = None) -> nn.Module:
    """Give every sparsified layer (or those in ``scope``) back its original class, bit-for-bit.

    The module objects and their Parameters were never replaced, so nothing is copied back: the threshold
    buffer and the sparsifier state are deleted and the class restored.
    """
    chosen = list(sparsified_layers(model))
    if scope is not None:
        if not isinstance(scope, TargetScope):
            raise InvalidScopeError(f"scope must be a TargetScope or None, got {scope!r}")
        chosen = [(n, m) for n, m in chosen if scope.matches(n, m)]
        if not chosen:
            raise NotSparsifiedError(f"{scope!r} matches no sparsified layer of the model")
    for _, m in chosen:
        uninstall_sparsifier(m)
    if not any(True for _ in sparsified_layers(model)):
        model.__dict__.pop("_actsparse_plan", None)
    return model


def set_target_sparsity(model: nn.Module, targets: Mapping[str, float] | float) -> None:
    """Change targets of sparsified layers (a number applies to all); they pass inputs through until recalibrated."""
    layers = dict(sparsified_layers(model))
    if not layers:
        raise NotSparsifiedError("the model has no sparsified layer")
    if not isinstance(targets, Mapping):
        targets = {n: targets for n in layers}
    unknown = [n for n in targets if n not in layers]
    if unknown:
        raise NotSparsifiedError(f"{unknown} are not sparsified layers; sparsified layers are {list(layers)}")
    checked = {n: validate_target(v, repr(n)) for n, v in targets.items()}
    for n, v in checked.items():
        state = layers[n]._actsparse
        if state.target != v:
            state.target = v
            state.mode = SparsifierMode.PASSTHROUGH


def load_activation_sparsity(
    model: nn.Module,
    state_dict: Mapping[str, Any] | str | os.PathLike,
    *,
    prefix: str = "",
    strict: bool = True,
) -> nn.Module:
    """Load a sparsified state dict (or checkpoint file) into a plain model, installing sparsifiers first.

    Layers whose keys carry ``activation_threshold`` are sparsified, then the whole state dict is loaded with
    ``strict``. A Lightning checkpoint (a dict with ``"state_dict"``) works too; ``prefix`` strips the
    LightningModule attribute path (e.g. ``"model."``).
    """
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = torch.load(state_dict, map_location="cpu", weights_only=True)
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    if prefix:
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    modules = dict(model.named_modules())
    suffix = THRESHOLD_BUFFER
    names = [k[: -len(suffix)].rstrip(".") for k in state_dict if k == suffix or k.endswith("." + suffix)]
    if not names:
        raise NotSparsifiedError(
            f"the state dict has no '{suffix}' entry, so it holds no sparsified layer"
            + (f" under prefix {prefix!r}" if prefix else "")
        )
    missing = [n for n in names if n not in modules]
    if missing:
        raise NotSparsifiedError(f"the state dict sparsifies layers the model does not have: {missing}")
    wrong = [f"{n!r} ({type(modules[n]).__qualname__})" for n in names if not is_linear_like(modules[n])]
    if wrong:
        raise UnsupportedModuleError(f"the state dict sparsifies modules that are not nn.Linear here: {wrong}")
    snaps = _snapshot(modules, names)
    for n in names:
        extra = state_dict.get(f"{n}._extra_state" if n else "_extra_state")
        install_sparsifier(modules[n], extra["target"] if isinstance(extra, Mapping) else 0.0)
    try:
        model.load_state_dict(state_dict, strict=strict)
    except BaseException:
        _restore(modules, snaps)
        raise
    return model
