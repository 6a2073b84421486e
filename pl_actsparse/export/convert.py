"""Model-level export: swap every sparsified layer of a model for its inference layer.

:func:`export_for_inference` (the one export verb) turns sparsified float ``nn.Linear`` layers into
:class:`~pl_actsparse.export.linear.SparseInferenceLinear`, every
:class:`~pl_actsparse.core.int8.Int8WeightLinear` layer (sparsified or not) and sparsified torchao weight-only
int8 layers into :class:`~pl_actsparse.export.int8_linear.Int8SparseInferenceLinear`; :func:`exported_layers`
lists them.
See ``docs/inference.md``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from pl_actsparse import integrations
from pl_actsparse.core.int8 import Int8WeightLinear
from pl_actsparse.core.layer import linear_like_spec, threshold_summary
from pl_actsparse.errors import InvalidOptionError, NotSparsifiedError, UnsupportedModuleError
from pl_actsparse.export.int8_linear import Int8SparseInferenceLinear
from pl_actsparse.export.linear import (
    THRESHOLD_BUFFER, check_export_options, SparseInferenceLinear, applies_threshold, RestoreInfo, exported_state,
    exported_threshold, is_sparsified_linear,
)
from pl_actsparse.kernels import cpu as _cpu
from pl_actsparse.kernels.dispatch import prepack_race, prepack_unavailable, sparse_token_crossover
from pl_actsparse.kernels.int8_cpu import resolve_int8_backend

__all__ = ["ExportedLayer", "export_for_inference", "exported_layers"]


@dataclass(frozen=True)
class ExportedLayer:
    """One layer replaced by :func:`export_for_inference`; ``prefill`` and ``extra_weight_bytes`` (bytes of its
    prepacked copy, 0 without one) are :class:`SparseInferenceLinear`'s (``"shared"``, 0 for int8 layers)."""

    name: str
    in_features: int
    out_features: int
    threshold: float
    max_sparse_tokens: int
    backend: str
    dtype: torch.dtype
    prefill: str = "shared"
    extra_weight_bytes: int = 0


def export_for_inference(
    model: nn.Module, *, max_sparse_tokens: Optional[int] = None, prefill: str = "shared",
) -> nn.Module:
    """Replace every sparsified ``nn.Linear`` in ``model`` (in place) by a :class:`SparseInferenceLinear` (``TypeError`` for a
    ``model`` that is no ``nn.Module``, ``InvalidOptionError`` for a ``max_sparse_tokens`` not None or an int >= 0).

    Every :class:`~pl_actsparse.core.int8.Int8WeightLinear` layer, sparsified or not, becomes an
    :class:`~pl_actsparse.export.int8_linear.Int8SparseInferenceLinear` instead, sharing its int8 buffers
    (``prefill`` does not apply to them), so an int8 model stays int8; one without a sparsifier gets threshold
    ``-inf`` (a dense int8 GEMV).

    ``prefill``: ``"shared"`` (default) multiplies prompts (calls above the crossover) by the one stored
    ``W^T``; ``"prepacked"`` (opt-in, CPU float weights) also keeps, for each layer where a race of the two at
    128 tokens on its shape finds it faster (:func:`~pl_actsparse.kernels.dispatch.prepack_race`), a copy of
    ``W^T`` prepacked for oneDNN (as many bytes again), reported by :func:`exported_layers` (``extra_weight_bytes``).

    With the default backend this compiles the C++ kernel now (once per machine), not during the first
    decode step. Layers are swapped one at a time, so the extra memory peaks at one layer's ``W^T``; the
    original weights are released unless other references hold them. Returns ``model``;
    :func:`exported_layers` lists what was replaced.

    Raises :class:`~pl_actsparse.errors.NotSparsifiedError` if ``model`` contains no sparsified layer and no
    ``Int8WeightLinear``; :class:`~pl_actsparse.errors.UnsupportedModuleError` if ``model`` itself is such a
    layer, for the base layers of peft adapters, and for quantized weights no kernel reads;
    :class:`~pl_actsparse.errors.InvalidOptionError` for another ``prefill`` and for ``"prepacked"`` where a
    float layer's weight cannot be packed (not on CPU, fp64, no oneDNN), before any change. Thresholds may hold one
    value or one per input channel (``[in_features]``, weight-aware sparsification); any other shape is an
    ``UnsupportedModuleError`` naming the layer, before any change.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_for_inference: model must be an nn.Module, got {type(model).__qualname__} {model!r:.60}")
    check_export_options(max_sparse_tokens, prefill)
    # remove_duplicate=False: a module registered under two names is replaced under both (by one new layer).
    targets = [(name, m) for name, m in model.named_modules(remove_duplicate=False)
               if is_sparsified_linear(m) or isinstance(m, Int8WeightLinear)]
    if not targets:
        n_linear = sum(linear_like_spec(m) is not None for m in model.modules())
        n_done = sum(isinstance(m, (SparseInferenceLinear, Int8SparseInferenceLinear)) for m in model.modules())
        hint = f" ({n_done} layers are already exported)" if n_done else ""
        raise NotSparsifiedError(
            f"export_for_inference: {type(model).__name__} has no sparsified layer or Int8WeightLinear: none of its "
            f"{n_linear} nn.Linear modules carries an {THRESHOLD_BUFFER!r} buffer{hint}. Sparsify and calibrate it "
            "(or quantize_weights_int8) first."
        )
    if any(name == "" for name, _ in targets):
        raise UnsupportedModuleError(
            f"export_for_inference: the model itself ({type(model).__name__}) is the layer to export and cannot be "
            "replaced in place; wrap it in a container (e.g. nn.Sequential) or use SparseInferenceLinear.from_linear"
        )
    adapted = [n for n in integrations.layer_map(model.named_modules()).wrapper_of if n in {name for name, _ in targets}]
    if adapted:
        raise UnsupportedModuleError(
            f"export_for_inference: {len(adapted)} sparsified layer(s) are the base layers of peft adapters "
            f"({', '.join(adapted[:4])}{' ...' if len(adapted) > 4 else ''}); the exported kernel would drop the "
            "adapter branches' thresholding. Merge the adapters first: model = model.merge_and_unload()"
        )
    passthrough = sorted({name for name, m in targets if not applies_threshold(m)})
    if passthrough:
        warnings.warn(
            f"export_for_inference: {len(passthrough)} sparsified layer(s) are not calibrated (pass-through) and "
            f"are exported with threshold -inf, i.e. without sparsity: {', '.join(passthrough[:8])}"
            + (" ..." if len(passthrough) > 8 else ""),
            UserWarning,
            stacklevel=2,
        )
    if any(_weight_device(m).type == "cpu" for _, m in targets) and _cpu.get_backend() != "torch":
        _cpu.resolve_backend(build=True)  # compile now rather than inside the first forward
    float_weights = [m._parameters.get("weight") for _, m in targets]  # int8 layers have none (own crossover)
    for (name, m), w in zip(targets, float_weights):
        why = prefill == "prepacked" and isinstance(w, Tensor) and w.is_floating_point() and prepack_unavailable(w.dtype, w.device)
        if why:
            raise InvalidOptionError(f"export_for_inference: prefill='prepacked' cannot pack {name!r}: {why}; use prefill='shared'")
        t, width = m._buffers.get(THRESHOLD_BUFFER), linear_like_spec(m).in_features(m)
        if t is not None and t.numel() not in (1, width):  # one value or one per input channel (weight-aware)
            raise UnsupportedModuleError(f"export_for_inference: {THRESHOLD_BUFFER} of {name!r} has shape {tuple(t.shape)}; "
                                         f"the kernels take 1 or in_features={width} values")
    for dtype in {w.dtype for w in float_weights if isinstance(w, Tensor) and w.device.type == "cpu"}:
        sparse_token_crossover(dtype)  # measure the crossover now (once per machine), not in the first forward
    # fail before anything is swapped on a quantized weight the kernels cannot read
    int8 = {id(m): integrations.int8_weight(n, getattr(m, "weight", None)) for n, m in targets}
    if any(isinstance(m, Int8WeightLinear) or int8[id(m)] is not None for _, m in targets) and _cpu.get_backend() != "torch":
        resolve_int8_backend(build=True)
    replaced: dict[int, nn.Module] = {}
    targets.reverse()
    while targets:  # pop, so that each original weight can be freed as soon as its layer is swapped
        name, old = targets.pop()
        new = replaced.get(id(old))
        if new is None:
            if isinstance(old, Int8WeightLinear):  # keep the int8 weight: the int8 kernel reads it directly
                new = Int8SparseInferenceLinear(old, max_sparse_tokens=max_sparse_tokens)
            elif int8[id(old)] is not None:  # a library's int8 codes (torchao), read as they are
                new = _int8_from_codes(name, old, int8.pop(id(old)), max_sparse_tokens)
            else:
                new = SparseInferenceLinear.from_linear(old, max_sparse_tokens=max_sparse_tokens)
                if prefill == "prepacked" and prepack_race(new.weight_t)["prepacked"]:
                    new.prefill = "prepacked"  # measured faster on this shape here: keep the packed copy
                    new.packed_weight()
            replaced[id(old)] = new
        model.set_submodule(name, new)
        del old
    return model


def exported_layers(model: nn.Module) -> list[ExportedLayer]:
    """The exported layers of ``model`` (qualified names, sizes, settings, extra bytes), int8 ones included."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, Int8SparseInferenceLinear):
            dtype, limit, extra = m.qweight_t.dtype, m.sparse_token_limit(), {}
        elif isinstance(m, SparseInferenceLinear):
            dtype, limit = m.weight_t.dtype, m.sparse_token_limit(m.weight_t.dtype)
            extra = {"prefill": m.prefill, "extra_weight_bytes": m.extra_weight_bytes}
        else:
            continue
        out.append(ExportedLayer(name=name, in_features=m.in_features, out_features=m.out_features, dtype=dtype,
                                 threshold=threshold_summary(m.activation_threshold), max_sparse_tokens=limit,
                                 backend=m.backend, **extra))
    return out


def _weight_device(m: nn.Module) -> torch.device:
    """Where a layer's weight lives (read from the ``weight`` attribute when there is one: a quantized tensor
    subclass may not support the transpose that ``weight_t`` takes)."""
    w = getattr(m, "weight", None)
    return w.device if isinstance(w, Tensor) else linear_like_spec(m).weight_t(m).device


def _int8_from_codes(name: str, linear: nn.Linear, codes: tuple, max_sparse_tokens: Optional[int]) -> nn.Module:
    """An :class:`~pl_actsparse.export.int8_linear.Int8SparseInferenceLinear` reading a library's int8 codes and
    scales (:func:`pl_actsparse.integrations.int8_weight`: per output channel, ``W = scale * (qdata - zero_point)``)
    in the int8 kernel's ``[in, out]`` layout."""
    qdata, scale, zp, dtype, rebuild = codes
    asym = bool((zp != 0).any())
    shell = Int8WeightLinear(linear.in_features, linear.out_features, bias=False, mode="asym" if asym else "sym",
                             device="meta", dtype=dtype)
    shell.qweight = qdata.detach().t().contiguous()
    shell.scale = scale.detach().float().reshape(1, -1).contiguous()
    shell.zero_point = zp.detach().float().reshape(1, -1).contiguous()
    shell.bias = linear.bias
    new = Int8SparseInferenceLinear(shell, max_sparse_tokens=max_sparse_tokens)
    new.activation_threshold = exported_threshold(linear, linear.in_features)
    new._non_persistent_buffers_set.discard(THRESHOLD_BUFFER)  # sparsified: saved (the shell was not)
    new.sparsity_state = exported_state(linear)
    new.train(linear.training)
    # what to_linear needs to give back the library's module bit for bit (no tensor data kept)
    new.__dict__["_codes_restore"] = (rebuild, RestoreInfo.of(linear), getattr(linear.bias, "dtype", None))
    return new
