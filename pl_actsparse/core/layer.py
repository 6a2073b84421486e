"""Sparsifying ``nn.Linear`` layers.

A layer is sparsified *in place* by swapping its class for a subclass that thresholds the input before the
original ``forward`` (the technique ``torch.nn.utils.parametrize`` uses). Why not a wrapper module around it:

* the module object, its ``weight``/``bias`` Parameter objects and its qualified name stay the same, so
  optimizers, DDP buckets, tied weights and ``isinstance(m, nn.Linear)`` checks keep working;
* state-dict keys stay the same (``...up_proj.weight``), plus one buffer ``activation_threshold``;
* removal restores the original class and deletes what was added: the very same object comes back,
  bit-for-bit.

The threshold is a persistent 0-dim buffer; the target, the calibration result and the state live in
``_extra_state``, a small float64 tensor (:func:`encode_sparsifier_state`), so a checkpoint (``torch.save``,
safetensors, HF ``save_pretrained``) carries everything a report needs in tensors only.
"""

from __future__ import annotations

import contextlib
import math
import sys
import types
import warnings
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from pl_actsparse.errors import CheckpointError, NotSparsifiedError, UnsupportedModuleError

__all__ = [
    "SparsifierMode", "GradientMode", "ActivationSparsifierMixin", "SparseActivationLinear", "is_sparsified",
    "sparsified_layers", "sparsifier_state", "SparsifierStateView", "sparse_class_for", "install_sparsifier",
    "uninstall_sparsifier", "original_module_class", "THRESHOLD_BUFFER", "STATE_KEY", "ADAPTER_INPUT_KWARG",
    "weight_nbytes", "threshold_summary", "fit_threshold_buffer", "encode_sparsifier_state", "decode_sparsifier_state",
    "SPARSIFIER_STATE_FORMAT", "LinearLikeSpec", "register_linear_like", "linear_like_spec", "is_linear_like",
    "linear_like_weight_t", "linear_like_weight", "supported_layer_types", "LINEAR_LIKE_SOURCES", "preserved",
]

THRESHOLD_BUFFER = "activation_threshold"
#: State-dict suffix of a layer's sparsifier state (torch's key for ``get_extra_state()``).
STATE_KEY = "_extra_state"

#: Keyword an adapter wrapper's input hook passes down to its sparsified base layer (peft forwards the
#: wrapper's keyword arguments to ``base_layer``): "your input is already processed, do not threshold it twice".
ADAPTER_INPUT_KWARG = "_actsparse_input_done"


class SparsifierMode(str, Enum):
    """What a sparsified layer does with its input."""

    PASSTHROUGH = "passthrough"  # installed, not calibrated yet: input untouched
    CALIBRATING = "calibrating"  # input goes to the running calibration session
    SPARSIFYING = "sparsifying"  # |x| <= threshold is zeroed


class GradientMode(str, Enum):
    """How gradients flow through the zeroing during training."""

    MASKED = "masked"  # gradient only through kept inputs (the exact derivative)
    STE = "ste"  # straight-through: gradient as if nothing was zeroed


Observer = Callable[[nn.Module, torch.Tensor, torch.Tensor], None]


@dataclass
class SparsifierState:
    """Per-layer bookkeeping that is not a tensor."""

    target: float
    mode: SparsifierMode = SparsifierMode.PASSTHROUGH
    gradient_mode: GradientMode = GradientMode.MASKED
    calibration_sparsity: float | None = None  # achieved on the calibration data, all layers sparsified
    calibration_elements: int = 0
    session: Any = None  # the calibration session while CALIBRATING
    observers: dict[int, Observer] = field(default_factory=dict)


class _StraightThroughMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x * keep

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


class ActivationSparsifierMixin:
    """Behaviour added to a Linear class; never instantiated on its own."""

    _actsparse: SparsifierState
    activation_threshold: torch.Tensor

    # -- the thresholding -------------------------------------------------------------------------
    def sparsify_input(self, x: torch.Tensor) -> torch.Tensor:
        """Zero ``|x| <= threshold``: by ``hardshrink`` (one kernel; the multiply and its backward cost 7x more) eagerly on
        CPU with masked gradients and a finite scalar threshold, else by a multiply by the keep-mask (``torch.where`` costs
        twice as much; -inf keeps everything, +inf zeroes everything and an infinite input stays NaN). Same values and gradients."""
        if (self._actsparse.gradient_mode is GradientMode.MASKED and x.device.type == "cpu" and self.activation_threshold.dim() == 0
                and not torch.compiler.is_compiling() and math.isfinite(tau := float(self.activation_threshold))):
            return torch.nn.functional.hardshrink(x, max(tau, 0.0))
        keep = x.abs() > self.activation_threshold
        if torch.is_grad_enabled() and x.requires_grad and self._actsparse.gradient_mode is GradientMode.STE:
            return _StraightThroughMask.apply(x, keep)
        return x * keep

    def activation_input(self, input: torch.Tensor) -> torch.Tensor:
        """What this layer computes on: ``input`` (any shape ``[..., in_features]``, float) thresholded as the
        mode says, after every observer has seen the raw ``input``.

        The one entry point of the input processing: the layer's own ``forward`` calls it, and so does the
        input hook of an adapter wrapper around this layer (:mod:`pl_actsparse.integrations.peft`), so that the base
        layer and the adapter branches all receive the same thresholded input.

        Traceable by ``torch.compile(fullgraph=True)`` in the pass-through and sparsifying modes (observers
        included when they are traceable, as :class:`~pl_actsparse.measure.metric.ActivationSparsity`'s are).
        Calibrating mode runs only eagerly: calibration switches compilation off while it runs.
        """
        state = self._actsparse
        mode = state.mode
        if mode is SparsifierMode.SPARSIFYING:
            x = self.sparsify_input(input)
        elif mode is SparsifierMode.CALIBRATING:
            x = state.session.arrive(self, input)
        else:
            x = input
        if state.observers and (torch.compiler.is_compiling() or torch._C._current_graph_task_id() == -1):
            # not during backward: activation checkpointing's recomputation is no new data for any metric
            for observer in list(state.observers.values()):
                observer(self, input, x)
        return x

    def forward(self, input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        if kwargs.pop(ADAPTER_INPUT_KWARG, False):
            x = input  # an adapter wrapper already ran activation_input on its (and so this layer's) input
        else:
            x = self.activation_input(input)
        return super().forward(x, *args, **kwargs)  # type: ignore[misc]

    # -- state dict -------------------------------------------------------------------------------
    def get_extra_state(self) -> torch.Tensor:
        """The sparsifier state as a small float64 tensor (see :func:`encode_sparsifier_state`).

        A tensor, not a dict, so that ``safetensors`` and HF ``save_pretrained`` can store it.
        """
        return encode_sparsifier_state(self._actsparse)

    def set_extra_state(self, state: Any) -> None:
        """Restore the state saved by :meth:`get_extra_state` (a tensor, or the dict of pl-actsparse 0.1)."""
        d = decode_sparsifier_state(state)
        s = self._actsparse
        s.target = d["target"]
        s.mode = SparsifierMode.SPARSIFYING if d["calibrated"] else SparsifierMode.PASSTHROUGH
        s.gradient_mode = GradientMode(d["gradient_mode"])
        s.calibration_sparsity = d["calibration_sparsity"]
        s.calibration_elements = d["calibration_elements"]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # A dense checkpoint (neither threshold nor state) keeps this layer's threshold and state instead of
        # failing strict loading: the weights load as usual; recalibrate if they changed. A checkpoint with
        # only one of the two (safetensors files of 0.1 lost the dict state) cannot be restored as saved:
        # a loaded threshold still makes the layer sparsifying, the absent key stays missing (strict loading
        # fails) and a warning names the layer (never a silently dense layer).
        tkey, skey = prefix + THRESHOLD_BUFFER, prefix + STATE_KEY
        has_t, has_s = tkey in state_dict, skey in state_dict
        before = len(missing_keys)
        fit_threshold_buffer(self, state_dict.get(tkey))
        if has_s:
            try:
                decode_sparsifier_state(state_dict[skey])
            except CheckpointError as e:
                error_msgs.append(f"{prefix or 'the model'}: {e}")
                return
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if not has_t and not has_s:
            missing_keys[before:] = [k for k in missing_keys[before:] if k not in (tkey, skey)]
            return
        if has_t and not has_s:
            self._actsparse.mode = SparsifierMode.SPARSIFYING
            self._actsparse.calibration_sparsity = None
            self._actsparse.calibration_elements = 0
        elif has_s and not has_t:
            self._actsparse.mode = SparsifierMode.PASSTHROUGH  # no threshold to apply
        else:
            return
        # torch lists the absent key as missing (load_state_dict(strict=True) then raises; strict=False
        # returns it). The layer cannot tell which one was asked for, so it warns in both cases.
        lost = skey if has_t else tkey
        warnings.warn(
            f"{prefix.rstrip('.') or 'the model'}: the state dict has {'a threshold' if has_t else 'a sparsifier state'} "
            f"but no {lost.rpartition('.')[2]!r}; "
            + ("the layer sparsifies with the loaded threshold, but its target and calibration figures are unknown"
               if has_t else "the layer passes its input through until calibrated"),
            UserWarning,
            stacklevel=4,
        )

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        s = self._actsparse
        return f"{base}, target_sparsity={s.target:g}, threshold={threshold_text(self.activation_threshold)}, mode={s.mode.value}"

    # -- pickling of dynamically created subclasses -------------------------------------------------
    def __reduce_ex__(self, protocol: int):
        reduced = super().__reduce_ex__(protocol)  # type: ignore[misc]
        cls = type(self)
        if getattr(sys.modules.get(cls.__module__), cls.__name__, None) is cls:
            return reduced  # importable by name: pickles as usual
        # A class made at run time cannot be found by name: pickle the original class and rebuild at load.
        func, args, *rest = reduced
        orig = original_module_class(self)
        return (_rebuild_sparse, (func, tuple(orig if a is cls else a for a in args), rest[0] if rest else None))


class SparseActivationLinear(ActivationSparsifierMixin, nn.Linear):
    """An ``nn.Linear`` whose input is thresholded; what a plain Linear becomes when sparsified."""


_SPARSE_CLASSES: dict[type, type] = {nn.Linear: SparseActivationLinear}


# -- Linear-like layer types ------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearLikeSpec:
    """How to read a Linear-like layer type: ``y = x @ W^T + b`` over the last axis of ``x``.

    ``in_features(m)``/``out_features(m)`` give the widths, ``weight_t(m)`` the weight as ``[in, out]``
    (a view is fine: it is read, never written). ``weight(m)`` (``[out, in]``) is derived from it.
    """

    cls: type
    in_features: Callable[[nn.Module], int]
    out_features: Callable[[nn.Module], int]
    weight_t: Callable[[nn.Module], torch.Tensor]


_LINEAR_LIKE: dict[type, LinearLikeSpec] = {
    nn.Linear: LinearLikeSpec(nn.Linear, lambda m: m.in_features, lambda m: m.out_features, lambda m: m.weight.t())
}


def register_linear_like(
    cls: type,
    *,
    in_features: Callable[[nn.Module], int],
    out_features: Callable[[nn.Module], int],
    weight_t: Callable[[nn.Module], torch.Tensor],
) -> LinearLikeSpec:
    """Declare ``cls`` (an ``nn.Module`` computing ``y = x @ weight_t + bias`` over the last axis) sparsifiable.

    After registration, scopes select it like an ``nn.Linear``, calibration, the metric, reports and
    removal (bit for bit) handle it, and :func:`pl_actsparse.export.convert.export_for_inference` reads
    ``weight_t(module)`` (``[in, out]``) for the sparse kernels. Subclasses of ``cls`` are covered too.
    ``transformers``' ``Conv1D`` (GPT-2) is registered this way as soon as transformers is imported.

    Raises:
        TypeError: ``cls`` is not an ``nn.Module`` subclass or an accessor is not callable.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_linear_like needs an nn.Module subclass, got {cls!r}")
    for what, fn in (("in_features", in_features), ("out_features", out_features), ("weight_t", weight_t)):
        if not callable(fn):
            raise TypeError(f"register_linear_like: {what} must be a callable module -> value, got {fn!r}")
    spec = LinearLikeSpec(cls, in_features, out_features, weight_t)
    _LINEAR_LIKE[cls] = spec
    return spec


#: Callables ``() -> [(class, accessors of register_linear_like)]`` asked on each lookup for Linear-like types
#: whose library has been imported since (a model holding one implies it): :mod:`pl_actsparse.integrations`
#: adds its dispatch point here (GPT-2's Conv1D), so core imports no third-party integration.
LINEAR_LIKE_SOURCES: list[Callable[[], list[tuple[type, dict[str, Callable[[nn.Module], Any]]]]]] = []


def _load_lazy_specs() -> None:
    for source in LINEAR_LIKE_SOURCES:
        for cls, accessors in source():
            register_linear_like(cls, **accessors)


def linear_like_spec(module_or_cls: nn.Module | type) -> LinearLikeSpec | None:
    """The :class:`LinearLikeSpec` of a module (or class), through its MRO; sparsified layers count as
    their original class. ``None`` for a module that is not Linear-like."""
    cls = original_module_class(module_or_cls)
    _load_lazy_specs()
    return next((_LINEAR_LIKE[base] for base in cls.__mro__ if base in _LINEAR_LIKE), None)


def is_linear_like(module: nn.Module) -> bool:
    """Whether ``module`` can be sparsified: an ``nn.Linear`` (or subclass) or a registered Linear-like type."""
    return linear_like_spec(module) is not None


def supported_layer_types() -> list[type]:
    """The layer classes that can be sparsified (their subclasses too), ``nn.Linear`` first."""
    _load_lazy_specs()
    return list(_LINEAR_LIKE)


def linear_like_weight_t(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear-like layer as ``[in_features, out_features]`` (the sparse kernels' layout;
    a view of the stored weight, no copy). Raises :class:`~pl_actsparse.errors.UnsupportedModuleError` for
    other modules."""
    spec = linear_like_spec(module)
    if spec is None:
        raise UnsupportedModuleError(f"{type(module).__qualname__} is not a Linear-like layer (see register_linear_like)")
    return spec.weight_t(module)


def linear_like_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear-like layer as ``[out_features, in_features]`` (``nn.Linear``'s layout; a view)."""
    if isinstance(module, nn.Linear):
        return module.weight
    return linear_like_weight_t(module).t()


def sparse_class_for(cls: type) -> type:
    """The class a Linear-like ``cls`` takes while sparsified (``SparseActivation<cls>``, created once)."""
    if cls not in _SPARSE_CLASSES:
        namespace: dict[str, Any] = {"__module__": __name__, "__doc__": f"{cls.__qualname__} with a sparsified input."}
        spec = linear_like_spec(cls)
        if spec is not None and not issubclass(cls, nn.Linear):
            # consumers read in_features/out_features as on an nn.Linear: give them while sparsified
            for attr, fn in (("in_features", spec.in_features), ("out_features", spec.out_features)):
                if not hasattr(cls, attr):
                    namespace[attr] = property(fn)
        _SPARSE_CLASSES[cls] = type(f"SparseActivation{cls.__name__}", (ActivationSparsifierMixin, cls), namespace)
    return _SPARSE_CLASSES[cls]


def _rebuild_sparse(func: Callable, args: tuple, state: Any):
    obj = func(*args)
    obj.__class__ = sparse_class_for(type(obj))
    if state is not None:
        obj.__setstate__(state)
    return obj


def is_sparsified(module: nn.Module) -> bool:
    """Whether a module carries an activation sparsifier."""
    return isinstance(module, ActivationSparsifierMixin)


class SparsifierStateView:
    """A read-only, live view of one sparsified layer's state (see :func:`sparsifier_state`).

    ``target`` (float, fraction of inputs to zero, in [0, 1]); ``threshold`` (the ``activation_threshold``
    buffer, detached: a 0-dim tensor, or ``[in_features]`` per channel; the layer's dtype); ``mode``
    (:class:`SparsifierMode`: pass-through until calibrated); ``gradient_mode`` (:class:`GradientMode`);
    ``calibration_sparsity`` (fraction zeroed on the calibration data, ``None`` before calibration);
    ``calibration_elements`` (input elements calibrated on, an int); ``observers`` (a read-only mapping
    key -> ``fn(module, input, output)`` of the callables that see every input).
    """

    __slots__ = ("_module",)

    def __init__(self, module: nn.Module) -> None:
        self._module = module

    target = property(lambda self: self._module._actsparse.target)
    mode = property(lambda self: self._module._actsparse.mode)
    gradient_mode = property(lambda self: self._module._actsparse.gradient_mode)
    calibration_sparsity = property(lambda self: self._module._actsparse.calibration_sparsity)
    calibration_elements = property(lambda self: self._module._actsparse.calibration_elements)

    @property
    def threshold(self) -> torch.Tensor:
        return self._module.activation_threshold.detach()

    @property
    def observers(self) -> Mapping[Any, Observer]:
        return MappingProxyType(self._module._actsparse.observers)

    def __repr__(self) -> str:
        return (f"SparsifierStateView(target={self.target}, mode={self.mode.value}, "
                f"threshold={threshold_summary(self.threshold):.4g}, calibration_sparsity={self.calibration_sparsity})")


def sparsifier_state(module: nn.Module) -> SparsifierStateView:
    """The state of a sparsified layer, read-only and live (it follows later calibrations and retargets).

    >>> from torch import nn
    >>> from pl_actsparse.core.layer import install_sparsifier, sparsifier_state
    >>> state = sparsifier_state(install_sparsifier(nn.Linear(4, 2), 0.5))
    >>> state.target, state.mode.value, state.calibration_sparsity
    (0.5, 'passthrough', None)

    Raises:
        NotSparsifiedError: ``module`` carries no sparsifier (the message names its class).
    """
    if not is_sparsified(module):
        raise NotSparsifiedError(f"{type(module).__qualname__} is not a sparsified layer: it has no sparsifier state")
    return SparsifierStateView(module)


_UNSPARSED: dict[type, type] = {}  # original_module_class's rebuilt derived classes


def original_module_class(module: nn.Module | type) -> type:
    """The class the module had before :func:`install_sparsifier` swapped it. A class another library derived from
    the sparse one since (``torch.nn.utils.parametrize``'s ``ParametrizedSparseActivationLinear``) gives the same
    derived class built over the original one (``ParametrizedLinear``, made once per class)."""
    cls = module if isinstance(module, type) else type(module)
    if not issubclass(cls, ActivationSparsifierMixin):
        return cls
    if cls.__bases__[0] is ActivationSparsifierMixin:
        return cls.__bases__[-1]  # sparse classes are built as (ActivationSparsifierMixin, Original)
    if cls not in _UNSPARSED:
        _UNSPARSED[cls] = type(cls.__name__.replace("SparseActivation", ""), tuple(map(original_module_class, cls.__bases__)),
                               {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")})
    return _UNSPARSED[cls]


def sparsified_layers(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """Qualified names and modules of every sparsified layer, in model order."""
    for name, module in model.named_modules():
        if is_sparsified(module):
            yield name, module  # type: ignore[misc]


#: Functions ``module -> torch.device | None`` telling where the threshold of a layer whose weight is on ``meta``
#: (offloaded) must live; :mod:`pl_actsparse.integrations` registers accelerate's hook reader here.
PLACEMENT_SOURCES: list[Callable[[nn.Module], torch.device | None]] = []


def _threshold_device(module: nn.Module) -> torch.device | None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    if weight.device.type == "meta":  # offloaded: where the first placement source says, else meta
        return next((d for source in PLACEMENT_SOURCES if (d := source(module)) is not None), weight.device)
    return weight.device


def rebind_instance_forward(module: nn.Module, old_cls: type, new_cls: type) -> None:
    """After ``module.__class__`` changed from ``old_cls`` to ``new_cls``: every instance attribute ``forward`` or
    ``_old_forward`` (where accelerate's dispatch hooks keep the bound forward they call) that is ``old_cls.forward``
    bound to ``module`` becomes ``new_cls.forward`` bound to it, so the class swap reaches what actually runs."""
    for attr in ("forward", "_old_forward"):
        bound = module.__dict__.get(attr)
        if isinstance(bound, types.MethodType) and bound.__self__ is module and bound.__func__ is old_cls.forward:
            module.__dict__[attr] = types.MethodType(new_cls.forward, module)


def install_sparsifier(
    module: nn.Linear, target: float, gradient_mode: GradientMode | str = GradientMode.MASKED
) -> nn.Linear:
    """Turn one Linear into a sparsified one (pass-through until calibrated), or retarget it if it already is."""
    if is_sparsified(module):  # a new target makes it pass through until recalibrated; the same one keeps its threshold
        s = module._actsparse  # type: ignore[union-attr]
        if s.target != float(target):
            s.target, s.mode = float(target), SparsifierMode.PASSTHROUGH
        s.gradient_mode = GradientMode(gradient_mode)
        return module
    if not is_linear_like(module):
        raise UnsupportedModuleError(
            f"only nn.Linear, its subclasses and registered Linear-like types can be sparsified "
            f"(see register_linear_like), got {type(module).__qualname__}"
        )
    device = _threshold_device(module)
    old_cls = type(module)
    module.__class__ = sparse_class_for(old_cls)
    rebind_instance_forward(module, old_cls, module.__class__)  # accelerate's stored forward must reach the sparsifier
    module.register_buffer(THRESHOLD_BUFFER, torch.tensor(-math.inf, dtype=torch.float32, device=device))
    module._actsparse = SparsifierState(target=float(target), gradient_mode=GradientMode(gradient_mode))
    return module


def uninstall_sparsifier(module: nn.Module) -> nn.Module:
    """Give back the original class; parameters were never touched, so the module is as it was."""
    if not is_sparsified(module):
        return module
    orig = original_module_class(module)
    del module._buffers[THRESHOLD_BUFFER]
    module._non_persistent_buffers_set.discard(THRESHOLD_BUFFER)
    del module.__dict__["_actsparse"]
    sparse_cls, module.__class__ = type(module), orig
    rebind_instance_forward(module, sparse_cls, orig)
    return module


def weight_nbytes(module: nn.Module) -> int:
    """Bytes of the weight a layer stores, i.e. what one decode step reads from memory for it.

    The one answer used by every report, metric, sweep and allocation. The stored representation counts, not
    the float weight a quantized layer hands out on access:

    * a layer with its own ``weight_nbytes`` (``Int8WeightLinear``, the exported layers): that figure;
    * a tensor-subclass weight (torchao's quantized tensors): the bytes of its inner tensors, recursively;
    * any other weight (float, or an int8 parameter as NNCF stores it): ``numel * element_size``.

    Returns ``0`` for a module without a weight.
    """
    own = getattr(module, "weight_nbytes", None)
    if isinstance(own, int) and not isinstance(own, bool):
        return own
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) and linear_like_spec(module) is not None:
        weight = linear_like_weight_t(module)  # a registered Linear-like type storing its weight elsewhere
    return _tensor_nbytes(weight) if isinstance(weight, torch.Tensor) else 0


def _tensor_nbytes(t: torch.Tensor) -> int:
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_nbytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def threshold_text(t: torch.Tensor) -> str:
    """A threshold in a layer's repr (sparsified or exported): its value, ``per-channel[n]``, ``?`` on meta."""
    return "?" if t.is_meta else f"{float(t):.4g}" if t.numel() == 1 else f"per-channel[{t.numel()}]"


def threshold_summary(threshold: torch.Tensor) -> float:
    """One number for a threshold in tables and logs: the value of a scalar threshold, the mean of a
    per-channel one (shape ``[in_features]``, see :mod:`pl_actsparse.tuning.weight_aware`)."""
    t = threshold.detach()
    return float(t) if t.numel() == 1 else float(t.float().mean())


# -- preserving layer state around trial settings (sweep, allocation) -------------------------------------


def snapshot_layers(modules: dict[str, nn.Module], names: Iterable[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor] | None]:
    """What :func:`restore_layers` needs to put ``names`` back: per layer its threshold and encoded sparsifier
    state (:meth:`~ActivationSparsifierMixin.get_extra_state`), ``None`` when it is not sparsified. ``modules``
    is ``dict(model.named_modules())``."""
    return {n: (modules[n].activation_threshold.detach().clone(), modules[n].get_extra_state())
            if is_sparsified(modules[n]) else None for n in names}


def restore_layers(modules: dict[str, nn.Module], snaps: dict[str, tuple[torch.Tensor, torch.Tensor] | None]) -> None:
    """Put layers back as :func:`snapshot_layers` saw them (threshold of any shape, state; a layer sparsified
    since is un-sparsified, bit for bit; one removed since is installed again)."""
    for n, snap in snaps.items():
        m = modules[n]
        if snap is None:
            uninstall_sparsifier(m)
            continue
        threshold, extra = snap
        removed = not is_sparsified(m)
        if removed:  # removed since: install again, as it was
            install_sparsifier(m, decode_sparsifier_state(extra)["target"])
        if removed or m.activation_threshold.shape != threshold.shape:  # or per-channel <-> scalar since
            m._buffers[THRESHOLD_BUFFER] = threshold.clone()
        else:
            m.activation_threshold.copy_(threshold)
        m.set_extra_state(extra)


@contextlib.contextmanager
def preserved(model: nn.Module, names: Iterable[str] | None = None, *, on_error_only: bool = False) -> Iterator[nn.Module]:
    """Run a block that sparsifies, retargets or recalibrates layers, then put them back as they were
    (``on_error_only=True``: only if the block raises, so that a failed call changes nothing).

    On exit (normal or by an exception) every layer in ``names`` (default: the model's sparsified layers) gets
    back its threshold (scalar or per-channel, same shape), its target, mode, gradient mode and calibration
    record; a layer that was not sparsified before is un-sparsified (its original class, bit-for-bit). The
    model's recipe plan (``model._actsparse_plan``) is restored too, or removed if there was none.
    Weights are not touched (nothing in the package changes them while sparsifying).

    Used by the sweep and the allocation, which try many settings on the user's model and must leave it as
    they found it.

    Raises:
        KeyError: a name in ``names`` is not a module of ``model``.
    """
    modules = dict(model.named_modules())
    names = [n for n, _ in sparsified_layers(model)] if names is None else list(names)
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"preserved(): {missing} are not modules of the model")
    snaps = snapshot_layers(modules, names)
    plan_before, kept = model.__dict__.get("_actsparse_plan"), False
    try:
        yield model
        kept = on_error_only
    finally:
        if not kept:
            restore_layers(modules, snaps)
            if plan_before is None:
                model.__dict__.pop("_actsparse_plan", None)
            else:
                model.__dict__["_actsparse_plan"] = plan_before


#: Version of the layout written by :func:`encode_sparsifier_state` (its element 0).
SPARSIFIER_STATE_FORMAT = 1
_STATE_LEN = 6
_GRADIENT_CODES = {GradientMode.MASKED: 0.0, GradientMode.STE: 1.0}


def fit_threshold_buffer(module: nn.Module, incoming: Any) -> None:
    """Before loading a state dict into ``module`` (a sparsified or an exported layer): reshape its threshold buffer
    to a loaded one of the other kind, one value <-> per channel ``[in_features]`` (see
    :mod:`pl_actsparse.tuning.weight_aware`); any other shape (``[out_features]``, ``[in, 1]`` broadcasting over
    tokens) is left to torch to refuse (size mismatch)."""
    current = module._buffers[THRESHOLD_BUFFER]
    if (isinstance(incoming, torch.Tensor) and incoming.shape != current.shape and incoming.dim() <= 1
            and incoming.numel() in (1, module.in_features)):
        module._buffers[THRESHOLD_BUFFER] = torch.empty(incoming.shape, dtype=current.dtype, device=current.device)


def encode_sparsifier_state(state: Any) -> torch.Tensor:
    """A layer's sparsifier state as a float64 CPU tensor of shape ``[6]`` (what ``_extra_state`` holds).

    Elements: ``[format (1), target, calibrated (0/1), gradient mode (0 masked, 1 ste),
    calibration_sparsity (NaN when unknown), calibration_elements]``. float64 holds the target and the
    calibration figures exactly (element counts up to 2**53); ``module.to(dtype)`` never touches it (it is
    not a buffer, it is built on every ``state_dict()`` call). ``state`` is a layer's ``_actsparse`` or a
    dict as returned by :func:`decode_sparsifier_state`.
    """
    d = state if isinstance(state, dict) else {
        "target": state.target, "calibrated": state.mode is SparsifierMode.SPARSIFYING, "gradient_mode": state.gradient_mode,
        "calibration_sparsity": state.calibration_sparsity, "calibration_elements": state.calibration_elements}
    cs = d.get("calibration_sparsity")
    return torch.tensor(
        [SPARSIFIER_STATE_FORMAT, float(d["target"]), float(bool(d["calibrated"])), _GRADIENT_CODES[GradientMode(d.get("gradient_mode", "masked"))],
         math.nan if cs is None else float(cs), float(d.get("calibration_elements", 0))],
        dtype=torch.float64,
    )


def decode_sparsifier_state(saved: Any) -> dict[str, Any]:
    """Read a saved sparsifier state: the tensor of :func:`encode_sparsifier_state`.

    Returns ``{"target": float, "calibrated": bool, "gradient_mode": "masked"|"ste",
    "calibration_sparsity": float | None, "calibration_elements": int}``.

    Raises :class:`~pl_actsparse.errors.CheckpointError` naming what is wrong (not a tensor, unknown format, wrong
    shape, a target outside [0, 1], a non-integer element count).
    """
    if not isinstance(saved, torch.Tensor):
        raise CheckpointError(f"a sparsifier state must be a tensor, got {type(saved).__qualname__}")
    v = saved.detach().to("cpu", torch.float64).reshape(-1)
    if v.numel() != _STATE_LEN or float(v[0]) != SPARSIFIER_STATE_FORMAT:
        raise CheckpointError(f"sparsifier state must be a tensor of {_STATE_LEN} values starting with format {SPARSIFIER_STATE_FORMAT}, "
                              f"got shape {tuple(saved.shape)} starting with {float(v[0]) if v.numel() else None}")
    fmt, target, calibrated, gm, cs, n = v.tolist()
    codes = {c: m.value for m, c in _GRADIENT_CODES.items()}
    if calibrated not in (0.0, 1.0) or gm not in codes or not (n >= 0 and n == int(n)):
        raise CheckpointError(f"malformed sparsifier state {v.tolist()}: calibrated must be 0/1, gradient mode "
                              f"0/1 and the element count a non-negative integer")
    out = {"target": target, "calibrated": calibrated == 1.0, "gradient_mode": codes[gm],
           "calibration_sparsity": None if math.isnan(cs) else cs, "calibration_elements": int(n)}
    if not 0.0 <= out["target"] <= 1.0:
        raise CheckpointError(f"malformed sparsifier state: target {out['target']!r} is not in [0, 1]")
    return out


@contextlib.contextmanager
def activation_sparsity_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` dense for a moment (e.g. a dense reference pass inside ``validation_step``).

    Sparsified layers pass their input through and their observers are paused, so sparsity metrics do not
    count the dense pass. Thresholds and calibration state are untouched; the modes and observers come back
    on exit, also when the body raises.
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
