"""The plain-PyTorch API: plan, sparsify, calibrate, remove, load.

Everything the Lightning callback does goes through these functions, so non-Lightning users get the same
behaviour. All input is validated before the first module is changed, and a failed calibration puts every
layer back as it was.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from pl_actsparse.integrations import (
    forward_patch_problem, is_tool_storage, layer_map, shared_offload_hooks, sync_adapter_hooks,
)
from pl_actsparse.calibrate import calibrate as _calibrate, chosen_method
from pl_actsparse.calibrate.allocation import GRID, fisher_curves, next_token_nll, search_levels
from pl_actsparse.calibrate.histogram import LayerStatistics
from pl_actsparse.calibrate.running import check_batches
from pl_actsparse.core.checkpoint import SavedSparsifier, read_state_dict, saved_sparsifiers
from pl_actsparse.config import CalibrationConfig, check_choice
from pl_actsparse.errors import (
    CheckpointError, ConflictingScopesError, EmptyDatasetError, InvalidOptionError, InvalidScopeError,
    InvalidTargetError, NothingToSparsifyError, NotSparsifiedError, UnmatchedScopeError, UnsupportedModuleError,
)
from pl_actsparse.core.layer import (
    STATE_KEY, THRESHOLD_BUFFER, GradientMode, activation_sparsity_disabled, install_sparsifier, is_linear_like,
    is_sparsified, preserved, sparsified_layers, uninstall_sparsifier,
)
from pl_actsparse.core.module_state import preserved_modes, state_dict_fit
from pl_actsparse.measure.report import SparsityReport, activation_sparsity_report
from pl_actsparse.core.recipe import validate_target
from pl_actsparse.core.scopes import IgnoredScope, TargetScope

__all__ = [
    "SparsityPlan", "plan_activation_sparsity", "prepare_activation_sparsity", "calibrate_activation_sparsity",
    "sparsify_activations", "remove_activation_sparsity", "load_activation_sparsity",
    "install_sparsifiers_from_state_dict", "from_pretrained", "set_target_sparsity",
]


@dataclass
class SparsityPlan:
    """Which layer gets which target, resolved and validated against one model."""

    targets: dict[str, float]  # layer name -> target sparsity, in model order
    claimed_by: dict[str, TargetScope] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # matched by pattern/type but not a Linear
    ignored: list[str] = field(default_factory=list)  # Linear layers a target scope matched and IgnoredScope removed


def validated_targets(target_sparsity_by_scope: Mapping[TargetScope, float]) -> dict[TargetScope, float]:
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
    model: nn.Module, target_sparsity_by_scope: Mapping[TargetScope, float], ignored_scope: IgnoredScope | None = None,
) -> SparsityPlan:
    """Resolve scopes to layers and check everything, without touching the model.

    Raises (all ``ValueError`` subclasses): :class:`InvalidTargetError`, :class:`InvalidScopeError`,
    :class:`UnmatchedScopeError` (listing every entry that matched no ``nn.Linear``),
    :class:`UnsupportedModuleError` (an exact name that is not an ``nn.Linear``),
    :class:`ConflictingScopesError`, :class:`NothingToSparsifyError`.

    Adapters (peft LoRA/DoRA, see :mod:`pl_actsparse.integrations.peft`): an entry that selects an adapter wrapper
    (``.*up_proj``), its base layer or its whole subtree (``.*up_proj.*``) selects *the input of the adapted
    projection*, planned under the base layer's name (``...up_proj.base_layer``); the adapter branches
    (``lora_A``, ``lora_B`` ...) are never planned on their own (listed in ``skipped``; an exact name of one
    raises :class:`UnsupportedModuleError`, as does any entry reaching an adapter type other than LoRA/DoRA).
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

    targets = validated_targets(target_sparsity_by_scope)

    modules = list(model.named_modules())
    is_linear = {name: is_linear_like(m) for name, m in modules}
    class_of = {name: type(m).__qualname__ for name, m in modules}
    layers = layer_map(modules)  # what selected names stand for with wrapper layers (peft adapters); else themselves

    unmatched: list[str] = []
    unsupported: list[str] = []
    refused: dict[str, str] = {}  # name -> why it cannot be selected, raised unless ignored
    skipped: dict[str, str] = {}
    claims: dict[str, list[TargetScope]] = {}
    for scope in targets:
        match = scope.match(modules)
        for name, hits in match.by_name.items():
            sel = layers.select(name, exact=True)
            if hits and not sel.refused and not is_linear[sel.layer]:
                unsupported.append(f"{name!r} ({class_of[name]})")
        for label, hits in itertools.chain(match.by_name.items(), match.by_pattern.items(), match.by_type.items()):
            sels = [layers.select(h, exact=False) for h in hits]
            if scope.validate and not any(s.refused or (s.layer is not None and is_linear[s.layer]) for s in sels):
                kind = "name" if label in match.by_name else "pattern" if label in match.by_pattern else "type"
                hint = {"name": " (a regular expression? pass it as patterns=[...])" if set(label) & set("*+?[]()|\\^$") else "",
                        "type": " (a class, its __name__ such as 'Linear' or its full path 'torch.nn.modules.linear.Linear')"}.get(kind, "")
                what = hint if not hits else f" (only non-Linear modules: {hits[:5]}{'...' if len(hits) > 5 else ''})"
                unmatched.append(f"{scope!r}: {kind} {label!r}{what}")
        for name in match.all_names():
            sel = layers.select(name, exact=name in scope.names)
            if sel.refused:
                refused[name] = sel.refused
            elif sel.skipped:
                skipped[name] = sel.skipped
            elif is_linear[sel.layer]:
                if scope not in claims.setdefault(sel.layer, []):
                    claims[sel.layer].append(scope)
            elif name and name not in scope.names and not is_tool_storage(name):
                skipped[name] = f"{class_of[name]} is not an nn.Linear"

    ignored_match = ignored_scope.match(modules)
    if ignored_scope.validate:
        unmatched += [f"{ignored_scope!r}: {entry}" for entry in ignored_match.unmatched()]
    ignored_names = {layers.canonical(n) for n in ignored_match.all_names()} | set(ignored_match.all_names())
    unsupported += [msg for n, msg in refused.items() if n not in ignored_names]

    if unsupported:
        raise UnsupportedModuleError(
            "these modules are named exactly in a TargetScope but are not nn.Linear (only nn.Linear, "
            "its subclasses and registered Linear-like types such as transformers' Conv1D can be sparsified; "
            "see pl_actsparse.core.layer.register_linear_like): " + ", ".join(unsupported)
        )
    if unmatched:
        linear = [n for n, lin in is_linear.items() if lin and not is_tool_storage(n)]
        raise UnmatchedScopeError(
            "these scope entries match no nn.Linear of the model (names are qualified module names from "
            "model.named_modules(); patterns use re.fullmatch): " + "; ".join(unmatched)
            + f"; the model's nn.Linear layers ({len(linear)}): {', '.join(linear[:6])}{', ...' if len(linear) > 6 else ''}"
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
    _check_reachable(dict(modules), chosen)
    return SparsityPlan(
        targets={n: targets[claims[n][0]] for n in chosen}, claimed_by={n: claims[n][0] for n in chosen},
        skipped=[(n, skipped[n]) for n in order if n in skipped and n not in ignored_names],
        ignored=[n for n in order if n in claims and n in ignored_names],
    )


def _check_reachable(modules: dict[str, nn.Module], names: Iterable[str]) -> None:
    """Raise :class:`UnsupportedModuleError` for layers whose forward would never reach a sparsifier."""
    stuck = [f"{n!r}: {p}" for n in names if (p := forward_patch_problem(modules[n])) is not None]
    if stuck:
        raise UnsupportedModuleError("these layers' forward would not apply a calibrated threshold: " + "; ".join(stuck))


def prepare_activation_sparsity(
    model: nn.Module, target_sparsity_by_scope: Mapping[TargetScope, float], ignored_scope: IgnoredScope | None = None,
    *, gradient_mode: GradientMode | str = GradientMode.MASKED, levels: Mapping[str, float] | None = None,
) -> SparsityPlan:
    """Install pass-through sparsifiers on the planned layers, to be calibrated later.

    Use this when sparsifiers must exist before the model is wrapped (DDP) but calibration data comes later.
    A layer that was already calibrated keeps its threshold unless its target changes. ``levels`` (``{layer
    name: target}``, e.g. levels an ``allocation`` chose for these scopes) replace the scope's value for those
    layers; the plan keeps which scope claims each layer (the report's per-scope budget line). Raises
    :class:`InvalidTargetError` for a level outside [0, 1] or of a layer the scopes do not select (before any change).
    """
    gradient_mode = _gradient_mode(gradient_mode)
    plan = plan_activation_sparsity(model, target_sparsity_by_scope, ignored_scope)
    bad = {n: v for n, v in (levels or {}).items() if n not in plan.targets or not 0.0 <= v <= 1.0}
    if bad:
        raise InvalidTargetError(f"levels {bad} are not in [0, 1] or name no layer these scopes select ({list(plan.targets)})")
    plan.targets.update({n: float(v) for n, v in (levels or {}).items()})
    modules = dict(model.named_modules())
    for name, target in plan.targets.items():
        install_sparsifier(modules[name], target, gradient_mode)  # a layer with a new target passes through until calibrated
    sync_adapter_hooks(model)
    model.__dict__["_actsparse_plan"] = plan
    return plan


def _gradient_mode(value: GradientMode | str) -> GradientMode:
    return GradientMode(check_choice(value, "gradient_mode", tuple(m.value for m in GradientMode)))


def _peek(dataset: Iterable[Any]) -> Iterable[Any]:
    """Fail on empty data (or one tensor) before anything changes, without consuming an item."""
    try:
        iterator = iter(check_batches(dataset, "calibration data"))
    except TypeError:
        raise EmptyDatasetError(f"calibration data must be iterable (a DataLoader, list, ...), got {type(dataset).__qualname__}") from None
    try:
        first = next(iterator)
    except StopIteration:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return []  # this rank's shard is empty; calibration checks the global total
        raise EmptyDatasetError("the calibration data is empty: it yielded no item") from None
    return itertools.chain([first], iterator)


def _guarded_calibrate(model: nn.Module, modules: dict[str, nn.Module], names: Iterable[str], items: Iterable[Any], config: CalibrationConfig) -> dict[str, LayerStatistics]:
    """Calibrate the layers ``names`` (in eval(): frozen submodules stay so), with every submodule's
    ``training`` flag put back on exit and accelerate's offload hooks safe for several batches in flight."""
    with preserved_modes(model), shared_offload_hooks(model):
        return _calibrate(model, [(n, modules[n]) for n in names], items, config)


def calibrate_activation_sparsity(
    model: nn.Module, dataset: Iterable[Any], *, layers: Iterable[str] | None = None,
    calibration: CalibrationConfig | Mapping[str, Any] | str | None = None,
) -> SparsityReport:
    """(Re)calibrate sparsified layers at their current targets and return the report.

    ``layers`` limits calibration to some layer names (default: every sparsified layer). The report carries
    the calibration histograms in ``report.statistics``. If anything fails, every layer keeps the threshold
    it had. ``calibration`` is as for :func:`sparsify_activations`. A per-channel (weight-aware) threshold becomes one
    value, with a ``UserWarning`` naming the layers.

    Raises:
        InvalidOptionError, TokenMaskError: an invalid ``calibration`` (before any change).
        NotSparsifiedError: the model has no sparsified layer, or ``layers`` names another module.
        UnsupportedModuleError: a layer's forward would not apply the new threshold (accelerate hooks dispatched
            with ``offload_buffers=True`` after sparsifying hold a copy; another forward patch), before any change.
        EmptyDatasetError: the data yields no item.
    """
    config = CalibrationConfig.from_value(calibration)
    modules = dict(model.named_modules())
    present = [n for n, _ in sparsified_layers(model)]
    if not present:
        raise NotSparsifiedError("the model has no sparsified layer: call sparsify_activations or prepare_activation_sparsity first")
    inactive = layer_map(modules.items()).branch_of  # peft copies the forward does not call (modules_to_save)
    names = [n for n in present if n not in inactive] if layers is None else list(layers)
    unknown = [n for n in names if n not in present]
    if unknown:
        raise NotSparsifiedError(f"cannot calibrate {unknown}: not sparsified layers of the model; sparsified layers are {present}")
    _check_reachable(modules, names)
    items = _peek(dataset)
    sync_adapter_hooks(model)  # adapters wrapped around already-sparsified layers (peft applied afterwards)
    vector = [n for n, t in ((n, modules[n]._buffers[THRESHOLD_BUFFER]) for n in names) if t.dim() == 1 and bool((t != t[:1]).any())]
    with preserved(model, names, on_error_only=True):
        stats = _guarded_calibrate(model, modules, names, items, config)
    _record(modules, stats)
    if vector:
        warnings.warn(f"calibrate_activation_sparsity: the per-channel (weight-aware) thresholds of {vector[:3]}{' ...' * (len(vector) > 3)} are now "
                      "one value each (plain |x|); sparsify_activations_weight_aware recalibrates with the score", UserWarning, stacklevel=2)
    report = activation_sparsity_report(model)
    report.statistics = stats
    return report


def _record(modules: dict[str, nn.Module], stats: dict[str, LayerStatistics]) -> None:
    for name, st in stats.items():
        state = modules[name]._actsparse
        state.calibration_sparsity = st.achieved
        state.calibration_elements = st.elements


#: ``allocation=`` of :func:`sparsify_activations`: how a scope's value is spread over its layers.
ALLOCATIONS = ("uniform", "auto", "fisher")


@contextlib.contextmanager
def dense_gradient_pass(model: nn.Module, layers: Sequence[tuple[str, nn.Module]], config: CalibrationConfig,
                        what: str, hint: str = "") -> Iterator[tuple[CalibrationConfig, Callable[..., Any]]]:
    """The setting of a gradient pass over the dense model (``allocation="auto"``/``"fisher"``, ``score="fisher"``):
    sparsity off, eval mode, autograd on whatever the caller's mode, every module's mode put back on exit; yields the
    config with the method chosen for ``layers`` and the loss (``config.loss_fn``, default next-token NLL).

    Raises:
        InvalidOptionError: parameters made under ``torch.inference_mode`` (no gradient reaches through them), naming
            ``what`` needs it, before any change.
    """
    if frozen := [n for n, p in model.named_parameters() if p.is_inference()][:3]:
        raise InvalidOptionError(f"{what} needs a gradient pass, which cannot use parameters made under torch.inference_mode "
                                 f"({frozen}...); build or load the model outside inference mode{hint}")
    with activation_sparsity_disabled(model), preserved_modes(model), torch.inference_mode(False):
        model.eval()
        yield config.replace(method=chosen_method(model, layers, config)), config.loss_fn or next_token_nll


def _allocated(model: nn.Module, plan: SparsityPlan, items: list[Any], config: CalibrationConfig, allocation: str) -> dict[str, float]:
    """Per-layer levels meeting each scope's byte budget (:mod:`pl_actsparse.calibrate.allocation`)."""
    modules = dict(model.named_modules())
    layers = [(n, modules[n]) for n in plan.targets]
    with dense_gradient_pass(model, layers, config, f"allocation={allocation!r}", ", or use allocation='uniform'") as (pass_config, loss_fn):
        try:
            curves = fisher_curves(model, layers, items, loss_fn, pass_config)  # block by block where calibration goes so
        except InvalidOptionError as exc:  # the next-token loss needs a causal LM on token ids
            if config.loss_fn is not None:
                raise
            raise InvalidOptionError(f"allocation={allocation!r} scores layers with the next-token loss of a causal LM called on token "
                                     f"ids [B, T], which does not fit here ({exc}); or use allocation='uniform'") from None
        budgets: dict[Any, tuple[list[str], float]] = {}  # scope -> (its layers, its byte budget)
        for n, t in plan.targets.items():
            budgets.setdefault(plan.claimed_by.get(n), ([], t))[0].append(n)
        return search_levels(model, layers, items, curves, list(budgets.values()), config, loss_fn, allocation == "auto")[0]


def check_allocation(allocation: Any, target_sparsity_by_scope: Mapping[Any, Any]) -> str:
    """``allocation`` if it is one of ``ALLOCATIONS`` and every budget fits it, for :func:`sparsify_activations` and the
    callback's constructor.

    Raises:
        InvalidOptionError: an unknown ``allocation``.
        InvalidTargetError: a byte budget above the allocation's highest level (``GRID[-1]``, 0.94), naming the scope.
    """
    check_choice(allocation, "allocation", ALLOCATIONS)
    if over := [(s, v) for s, v in target_sparsity_by_scope.items() if allocation != "uniform" and float(v) > GRID[-1]]:
        raise InvalidTargetError(f"allocation={allocation!r} reads levels up to {GRID[-1]}, so a byte budget must be <= {GRID[-1]}; "
                                 f"got {over[0][1]} for {over[0][0]!r}")
    return allocation


def sparsify_activations(
    model: nn.Module, dataset: Iterable[Any], target_sparsity_by_scope: Mapping[TargetScope, float],
    ignored_scope: IgnoredScope | None = None, *,
    calibration: CalibrationConfig | Mapping[str, Any] | str | None = None,
    gradient_mode: GradientMode | str = GradientMode.MASKED,
    allocation: str = "uniform",
) -> nn.Module:
    """Sparsify the inputs of the selected Linear layers and calibrate exact thresholds, in place.

    Each layer's threshold is the exact quantile of ``|x|`` over all of its calibration elements, measured
    with every selected layer already sparsified (one forward pass over the data, see
    :mod:`pl_actsparse.calibrate`). Elements are the inputs of real tokens (``token_mask``) in every
    call of the layer: a module called several times per forward is calibrated over all its calls.
    Calling it again on a sparsified model recalibrates the selected
    layers (new targets allowed) and never stacks a second sparsifier; sparsified layers that the new recipe
    does not select keep their thresholds.

    Args:
        model: any ``nn.Module``; layers are found by qualified name in ``model.named_modules()``.
        dataset: an iterable of calibration items (a DataLoader, a list of tensors, ...).
        target_sparsity_by_scope: ``{TargetScope(...): fraction of inputs to zero}``, each in [0, 1].
        ignored_scope: layers never to sparsify.
        calibration: how thresholds are calibrated: a :class:`~pl_actsparse.config.CalibrationConfig` (whose
            docstring gives every field: ``method``, ``num_batches``, ``transform_fn``, ``token_mask``, ``offload``,
            ``max_batches_in_flight``, ``in_block``, ``progress``, ``sync_across_processes``, ``loss_fn``), a mapping
            of its fields (YAML), a method name (``"lockstep"``, ``"sequential"``, ``"auto"``) or ``None`` (the
            defaults). Items are ``dataset``'s as it yields them: a loader of ``(input, label)`` pairs needs
            ``transform_fn=lambda b: b[0]``.
        gradient_mode: ``"masked"`` or ``"ste"``, how gradients cross the zeroing when training afterwards.
        allocation: ``"uniform"`` (default): every layer of a scope gets the scope's target. ``"auto"``: each
            scope's value is a *byte budget*, the fraction of the scope's weight bytes skipped per token,
            spread over its layers by :mod:`pl_actsparse.calibrate.allocation`: empirical-Fisher loss curves
            from one forward and backward pass of the dense model, their convex optimum, and a search over 9
            reweightings of the curves scored by the real loss on half the data (12-16 dense forward passes in
            all with calibration on stories260K, benchmarks/results/allocation.json); ``"fisher"``: the curves' optimum without
            the search. The allocated levels are then calibrated exactly. The loss is ``calibration``'s
            ``loss_fn`` (default: next-token NLL, which needs a causal LM on token ids); ``dataset`` is iterated
            several times (a one-shot iterator is read into a list first).

    Raises:
        InvalidOptionError: an invalid ``calibration`` field, ``gradient_mode`` or ``allocation`` (before any change).
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
    >>> _ = sparsify_activations(net, data, {TargetScope(types=[nn.Linear]): 0.5}, calibration={"progress": False})
    >>> x = net[0].sparsify_input(torch.cat(data))
    >>> float((x == 0).float().mean())
    0.5
    >>> _ = remove_activation_sparsity(net)
    >>> type(net[0]) is nn.Linear
    True
    """
    config = CalibrationConfig.from_value(calibration)
    mode = _gradient_mode(gradient_mode)
    plan = plan_activation_sparsity(model, target_sparsity_by_scope, ignored_scope)
    check_allocation(allocation, target_sparsity_by_scope)  # before the passes over the data
    items = _peek(dataset)
    modules = dict(model.named_modules())
    levels = None  # allocation="uniform": each scope's target
    if allocation != "uniform":
        items = list(itertools.islice(items, config.num_batches))  # read twice: the curves, then calibration
        levels = _allocated(model, plan, items, config, allocation)
    try:
        with preserved(model, plan.targets, on_error_only=True):
            plan = prepare_activation_sparsity(model, target_sparsity_by_scope, ignored_scope, gradient_mode=mode, levels=levels)
            stats = _guarded_calibrate(model, modules, plan.targets, items, config)
    except BaseException:
        sync_adapter_hooks(model)
        raise
    _record(modules, stats)
    return model


def remove_activation_sparsity(model: nn.Module, scope: TargetScope | None = None) -> nn.Module:
    """Give every sparsified layer (or those in ``scope``) back its original class, bit-for-bit.

    The module objects and their Parameters were never replaced, so nothing is copied back: the threshold
    buffer and the sparsifier state are deleted and the class restored.

    Exported layers (:func:`~pl_actsparse.export.convert.export_for_inference`) are replaced by the plain
    modules they came from (see :meth:`~pl_actsparse.export.linear.SparseInferenceLinear.to_linear`): the
    same weight tensor where the export kept it, else ``W^T`` transposed back, which is exact; an exported
    int8 layer becomes the :class:`~pl_actsparse.core.int8.Int8WeightLinear` it came from. ``scope``
    matches exported layers by name, pattern and the type of the module they give back.

    Raises :class:`NotSparsifiedError` when ``scope`` matches no sparsified or exported layer.
    """
    if scope is not None and not isinstance(scope, TargetScope):
        raise InvalidScopeError(f"scope must be a TargetScope or None, got {scope!r}")
    chosen = list(sparsified_layers(model))
    exported = _exported_restorations(model)
    if scope is not None:
        layers = layer_map(model.named_modules())  # an adapted projection answers to its wrapper's name too
        chosen = [(n, m) for n, m in chosen if any(scope.matches(a, m) for a in layers.aliases(n))]
        exported = [(n, new) for n, new in exported if scope.matches(n, new)]
        if not chosen and not exported:
            raise NotSparsifiedError(f"{scope!r} matches no sparsified layer of the model")
    for _, m in chosen:
        uninstall_sparsifier(m)
    sync_adapter_hooks(model)  # adapter wrappers lose their input hook with their base layer's sparsifier
    for name, new in exported:
        model.set_submodule(name, new)
    if not any(True for _ in sparsified_layers(model)):
        model.__dict__.pop("_actsparse_plan", None)
    return model


def _exported_restorations(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, restored module) for every exported layer; a module shared under two names is rebuilt once."""
    from pl_actsparse.export.int8_linear import Int8SparseInferenceLinear
    from pl_actsparse.export.linear import SparseInferenceLinear

    done: dict[int, nn.Module] = {}
    out = []
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, (SparseInferenceLinear, Int8SparseInferenceLinear)) and name:
            if id(m) not in done:
                done[id(m)] = m.to_linear()
            out.append((name, done[id(m)]))
    return out


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
        install_sparsifier(layers[n], v, layers[n]._actsparse.gradient_mode)  # a new target: pass-through until recalibrated


def install_sparsifiers_from_state_dict(model: nn.Module, state_dict: Any, prefix: str = "") -> list[str]:
    """Install (pass-through) sparsifiers on every layer ``state_dict`` holds a threshold for.

    The one place that maps saved sparsified layers onto a model (the Lightning callback's
    ``on_load_checkpoint`` helper and :func:`load_activation_sparsity` call it). ``state_dict`` is anything
    :func:`pl_actsparse.core.checkpoint.read_state_dict` reads; keys are relative to ``model`` after removing
    ``prefix``. Layers already sparsified keep their sparsifier. Returns the names of the layers found.

    Raises :class:`NotSparsifiedError` when a saved layer is not in the model, :class:`UnsupportedModuleError`
    when it is not an ``nn.Linear`` here, :class:`~pl_actsparse.errors.CheckpointError` for malformed state.
    """
    sd = read_state_dict(state_dict, prefix=prefix)
    saved = saved_sparsifiers(sd)
    _check_saved_layers(model, saved)
    modules = dict(model.named_modules())
    for entry in saved:
        module = modules[entry.name]
        if not is_sparsified(module):
            install_sparsifier(module, entry.state["target"] if entry.state else 0.0)
    sync_adapter_hooks(model)  # peft wrappers of these layers threshold their whole input
    return [e.name for e in saved]


def _check_saved_layers(model: nn.Module, saved: list[SavedSparsifier]) -> None:
    modules = dict(model.named_modules())
    missing = [e.name for e in saved if e.name not in modules]
    if missing:
        raise NotSparsifiedError(f"the state dict sparsifies layers the model does not have: {missing}")
    wrong = [f"{e.name!r} ({type(modules[e.name]).__qualname__})" for e in saved if not is_linear_like(modules[e.name])]
    if wrong:
        raise UnsupportedModuleError(
            f"the state dict sparsifies modules that are not nn.Linear or a registered Linear-like type here: {wrong}"
        )
    _check_reachable(modules, [e.name for e in saved])


def load_activation_sparsity(
    model: nn.Module, state_dict: Mapping[str, Any] | str | os.PathLike, *, prefix: str = "", strict: bool = True,
    _weights_loaded: bool = False,
) -> nn.Module:
    """Load a sparsified state dict, checkpoint file or ``save_pretrained`` folder into a model, in place.

    Layers whose keys carry ``activation_threshold`` are sparsified (a plain model gets sparsifiers
    installed first), then the whole state dict is loaded: weights, thresholds and each layer's sparsifier
    state (``_extra_state``). ``state_dict`` may be a state dict, a Lightning checkpoint (a dict with
    ``"state_dict"``; ``prefix`` strips the LightningModule attribute path, e.g. ``"model."``), a
    ``torch.save`` file, a ``.safetensors`` file, or a folder written by HF ``save_pretrained`` (see
    :func:`from_pretrained`). Weights tied in the model (an HF ``lm_head`` tied to the embedding, which
    ``save_pretrained`` stores once) count as loaded when the tensor they share was.

    ``strict=True``: every key must match (name, shape, tensor kind: a torchao-quantized weight does not fit a
    float one) and every saved threshold must come with its sparsifier state; otherwise nothing is changed (all
    of this is checked before the first tensor is copied) and :class:`~pl_actsparse.errors.CheckpointError`
    names what is wrong and the fix. ``strict=False``: what matches is loaded, the rest is warned about; a threshold without state still makes a sparsifying layer
    (never a silently dense one) and each thing that could not be restored is warned about.

    Raises :class:`NotSparsifiedError` (no threshold in the state dict, or layers the model lacks),
    :class:`UnsupportedModuleError` (a saved layer that is not an ``nn.Linear`` here),
    :class:`~pl_actsparse.errors.CheckpointError` (malformed or incomplete state, strict mismatches),
    :class:`InvalidOptionError` (``strict`` not a bool).
    """
    if not isinstance(strict, bool):
        raise InvalidOptionError(f"load_activation_sparsity: strict must be True or False, got {strict!r}")
    sd = read_state_dict(state_dict, prefix=prefix)
    saved = saved_sparsifiers(sd)
    if not saved:
        raise NotSparsifiedError(
            f"the state dict has no '{THRESHOLD_BUFFER}' entry, so it holds no sparsified layer"
            + (f" under prefix {prefix!r}" if prefix else "")
        )
    _check_saved_layers(model, saved)
    stateless = [e.name for e in saved if e.state is None]
    if stateless and strict:
        raise CheckpointError(
            f"the state dict has thresholds but no sparsifier state ('{STATE_KEY}') for {stateless}: their "
            "targets and calibration figures cannot be restored (a safetensors file written by pl-actsparse 0.1 "
            "loses them). Pass strict=False to load them as sparsifying layers with unknown targets, or recalibrate"
        )
    names = [e.name for e in saved]  # checked by _check_saved_layers
    warned = [e.key(STATE_KEY) for e in saved if e.state is None]  # the layers warn about these
    loadable, problems = state_dict_fit(model, sd, names, weights_loaded=_weights_loaded, may_miss=warned)
    if problems and strict:  # found before anything is copied
        raise CheckpointError(
            f"the state dict does not fit {type(model).__name__} (nothing was loaded): " + "; ".join(problems)
            + ". Pass strict=False to load what matches"
        )
    try:
        with preserved(model, names, on_error_only=True):
            install_sparsifiers_from_state_dict(model, sd)
            model.load_state_dict(loadable, strict=False)
            if problems:
                warnings.warn(f"load_activation_sparsity: not loaded: {'; '.join(problems)}", UserWarning, stacklevel=2)
    finally:
        sync_adapter_hooks(model)
    return model


def from_pretrained(model_cls: Any, path: str | os.PathLike, *, strict: bool = True, **kwargs: Any) -> nn.Module:
    """Load a sparsified model saved with HF ``save_pretrained``: ``model_cls.from_pretrained`` plus sparsity.

    ``model_cls`` is an HF model class or auto class (``AutoModelForCausalLM``); ``kwargs`` go to its
    ``from_pretrained`` (``torch_dtype``, ...). HF builds the dense model (and lists the thresholds and
    ``_extra_state`` entries as unexpected keys, which it ignores); :func:`load_activation_sparsity` then
    installs the sparsifiers and loads the thresholds and states of the folder (the weights are HF's), so every
    layer sparsifies exactly as when it was saved, also under ``device_map`` with cpu/disk offload (see
    ``docs/integrations.md``). Models saved after :func:`~pl_actsparse.export.convert.export_for_inference` store
    their weights in the ``nn.Linear`` layout and load as sparsified models: export them again.

    Everything comes from tensors in the folder (``model.safetensors`` by default); nothing is unpickled.
    Raises what :func:`load_activation_sparsity` raises.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        raise CheckpointError(f"from_pretrained needs a local save_pretrained folder, got {path!r}")
    if not hasattr(model_cls, "from_pretrained"):
        raise TypeError(f"model_cls must have a from_pretrained method (an HF model or auto class), got {model_cls!r}")
    model = model_cls.from_pretrained(path, **kwargs)
    # HF loaded the weights (also those accelerate offloads to cpu/disk under device_map): add the sparsity only
    return load_activation_sparsity(model, path, strict=strict, _weights_loaded=True)
