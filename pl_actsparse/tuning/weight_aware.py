"""Weight-aware scoring: zero input channel ``i`` when ``|x_i| * ||W[:, i]||_2 <= tau`` (WINA's criterion).

An input that meets a large weight column matters more to the output than one that meets a small column.
Because ``||W[:, i]||`` is a static per-channel scale ``c_i``, the rule is the same as a **per-channel
threshold** ``|x_i| <= tau / c_i``: the layer's ``activation_threshold`` buffer becomes a vector of shape
``[in_features]`` and the zeroing ``x * (|x| > threshold)`` (and any sparse kernel that compares against a
threshold) stays exactly the same, only with a broadcast threshold.

Calibration stays exact and one-pass: during the pass each selected layer sees ``x * c`` (a forward
pre-hook) while its weight is temporarily ``W / c``, so the core calibration chooses ``tau`` as the exact
quantile of ``|x_i| * c_i`` over all calibration elements, with all layers sparsified together; then the
weights are put back (the very same tensors, bit-for-bit) and the threshold becomes ``tau / c``.
The achieved fraction of zeroed inputs is the target, as with plain ``|x|``.

Measured on stories260K (``benchmarks/sensitivity_sweep.py``, ``docs/allocation.md``): a small but consistent
perplexity gain at equal sparsity. Layers that read the same tensor can share one scale
(``share_groups=True``, the norm over the group's stacked weights) so that they keep one mask.

Recalibrating a scored model with the plain :func:`~pl_actsparse.calibrate_activation_sparsity` fills the
vector with one value, i.e. goes back to plain ``|x|``; call :func:`sparsify_activations_weight_aware`
again to keep the score.
"""

from __future__ import annotations

import math
from pl_actsparse.calibrate.running import check_batches, hooks_removed
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from pl_actsparse.api import dense_gradient_pass, plan_activation_sparsity, sparsify_activations
from pl_actsparse.calibrate.allocation import gradient_scales
from pl_actsparse.calibrate.groups import find_shared_input_groups
from pl_actsparse.config import CalibrationConfig, check_choice
from pl_actsparse.core.layer import THRESHOLD_BUFFER, linear_like_weight, linear_like_weight_t
from pl_actsparse.errors import InvalidOptionError, UnsupportedModuleError
from pl_actsparse.integrations import layer_map
from pl_actsparse.core.scopes import IgnoredScope, TargetScope

__all__ = ["weight_column_norms", "sparsify_activations_weight_aware", "is_weight_aware", "SCORES"]

#: ``score=`` of :func:`sparsify_activations_weight_aware`: the per-channel scale ``c_i`` of ``|x_i| * c_i``.
SCORES = ("weight", "fisher")


def weight_column_norms(layers: nn.Linear | Sequence[nn.Linear]) -> torch.Tensor:
    """``||W[:, i]||_2`` per input channel (fp32), over the stacked output rows of one or several layers."""
    if isinstance(layers, nn.Module):
        layers = [layers]
    with torch.no_grad():
        w = torch.cat([linear_like_weight(m).detach().float() for m in layers], dim=0)  # [out, in], Conv1D too
        return w.norm(dim=0)


def _input_axis(name: str, module: nn.Module, wrapped: Any) -> int:
    """The axis of ``module.weight`` that runs over input features: 1 for ``nn.Linear``, 0 for a layer storing
    ``W^T`` (GPT-2's ``Conv1D``); an error for a weight that cannot be rescaled in place (quantized: an int8
    layer's property or a tensor subclass) or a layer whose peft adapter reads the same (unscaled) input."""
    w = module._parameters.get("weight")
    why = ("a peft adapter around it reads the same input; merge the adapters first (merge_and_unload())" if name in wrapped else
           None if w is not None and type(w.data) is torch.Tensor else
           "its weight is quantized or not a plain Parameter; score the float model, then quantize (the thresholds carry over)")
    if why is None and isinstance(module, nn.Linear):
        return 1
    if why is None and linear_like_weight_t(module) is w:
        return 0
    raise UnsupportedModuleError(f"weight-aware scoring rescales each selected layer's input and weight during calibration, which "
                                 f"layer {name!r} ({type(module).__qualname__}) does not allow: {why or 'its weight is not W or W^T'}")


def is_weight_aware(module: nn.Module) -> bool:
    """Whether a sparsified layer has a per-channel (weight-aware) threshold."""
    t = getattr(module, THRESHOLD_BUFFER, None)
    return isinstance(t, torch.Tensor) and t.dim() == 1


def sparsify_activations_weight_aware(
    model: nn.Module,
    dataset: Iterable[Any],
    target_sparsity_by_scope: Mapping[TargetScope, float],
    ignored_scope: IgnoredScope | None = None,
    *,
    score: str = "weight",
    share_groups: bool = False,
    groups: Sequence[Sequence[str]] | None = None,
    calibration: CalibrationConfig | Mapping[str, Any] | str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """:func:`~pl_actsparse.sparsify_activations` with the score ``|x_i| * c_i`` instead of ``|x_i|``.

    ``score="weight"``: ``c_i = ||W[:, i]||`` (WINA). ``score="fisher"``: ``c_i = E[(dL/dx_i)^2] ** (1/4)`` over the
    data's real tokens, from one forward and backward pass of the dense model (loss: ``calibration``'s ``loss_fn``,
    default next-token NLL on token ids; :func:`~pl_actsparse.calibrate.allocation.gradient_scales`): the channels
    the loss is sensitive to are zeroed later. With ``allocation="auto"`` it is the best model-wide setting measured on stories260K
    (``docs/allocation.md``). ``share_groups``: layers that read the same tensor and have equal targets use one scale
    (stacked weight columns; summed ``E[g^2]``), so they share one threshold vector and one mask (not with
    ``allocation="auto"``, which gives each member its own level: one scale, own masks); ``groups`` overrides
    the detection (:func:`~pl_actsparse.calibrate.groups.find_shared_input_groups`). ``calibration`` and the other
    keyword arguments (``allocation``, ``gradient_mode``) go to :func:`~pl_actsparse.sparsify_activations`.

    Raises:
        InvalidOptionError: an unknown ``score``; with ``"fisher"`` and no ``loss_fn``, inputs that are not token ids;
            with ``"fisher"``, parameters made under ``torch.inference_mode`` (before any change).
        InvalidOptionError, TokenMaskError: an invalid ``calibration`` (before any change).
        UnsupportedModuleError: a selected layer with quantized weights or under a peft adapter (before any change).

    >>> import torch
    >>> from torch import nn
    >>> from pl_actsparse import TargetScope
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(16, 4))
    >>> data = [torch.randn(64, 16)]
    >>> _ = sparsify_activations_weight_aware(net, data, {TargetScope(names=["0"]): 0.5},
    ...                                       calibration={"progress": False})
    >>> tuple(net[0].activation_threshold.shape), float((net[0].sparsify_input(data[0]) == 0).float().mean())
    ((16,), 0.5)
    """
    check_choice(score, "score", SCORES)
    config = CalibrationConfig.from_value(calibration)
    plan = plan_activation_sparsity(model, target_sparsity_by_scope, ignored_scope)
    modules = dict(model.named_modules())
    names = list(plan.targets)
    wrapped = layer_map(modules.items()).wrapper_of
    axes = {n: _input_axis(n, modules[n], wrapped) for n in names}  # every layer checked before any change
    if share_groups or score == "fisher":  # read more than once
        dataset = dataset if isinstance(dataset, (list, tuple)) else list(check_batches(dataset))
    if score == "fisher":
        layers = [(n, modules[n]) for n in names]
        with dense_gradient_pass(model, layers, config, "score='fisher'", ", or use score='weight'") as (pass_config, loss_fn):
            fisher = gradient_scales(model, layers, dataset, pass_config, loss_fn)
    scales: dict[str, torch.Tensor] = {n: fisher[n] if score == "fisher" else weight_column_norms(modules[n]) for n in names}
    if share_groups:
        if groups is None:
            groups = find_shared_input_groups(model, dataset[0], names, transform_fn=config.transform_fn) if dataset else []
        for g in groups:
            for t in dict.fromkeys(plan.targets[n] for n in g if n in plan.targets):  # the members of each target
                ms = [n for n in g if plan.targets.get(n) == t]
                if len(ms) > 1:  # one scale for the group: stacked columns, or the summed E[g^2]
                    shared = (sum(fisher[n] ** 4 for n in ms) ** 0.25 if score == "fisher"  # type: ignore[misc]
                              else weight_column_norms([modules[n] for n in ms]))
                    for n in ms:
                        scales[n] = shared
    handles: list = []
    originals: dict[str, nn.Parameter] = {}  # a layer's own scaled Parameter meanwhile: a tied weight (GPT-2's lm_head) stays
    try:
        with hooks_removed(handles):
            for n in names:
                m = modules[n]
                c = scales[n].to(m.weight.device)
                w = originals[n] = m._parameters["weight"]
                safe = torch.where(c > 0, c, torch.ones_like(c))
                if axes[n] == 0:  # the weight is stored as W^T (GPT-2's Conv1D)
                    safe = safe[:, None]
                m._parameters["weight"] = nn.Parameter((w.detach().float() / safe).to(w.dtype), requires_grad=w.requires_grad)
                handles.append(m.register_forward_pre_hook(lambda _m, args, c=c: (args[0] * c.to(args[0].dtype), *args[1:])))  # x * c
            sparsify_activations(model, dataset, target_sparsity_by_scope, ignored_scope, calibration=config, **kwargs)
    finally:
        for n, w in originals.items():
            modules[n]._parameters["weight"] = w
    for n in names:
        m = modules[n]
        thr = m._buffers[THRESHOLD_BUFFER]
        tau = float(thr.reshape(-1)[0])
        c = scales[n].to(thr.device)
        vec = (torch.full_like(c, tau) if math.isinf(tau) or math.isnan(tau) else
               torch.where(c > 0, tau / c.clamp_min(torch.finfo(torch.float32).tiny), torch.full_like(c, math.inf if tau >= 0 else -math.inf)))
        m._buffers[THRESHOLD_BUFFER] = vec.to(torch.float32)
    return model
