"""Sparsifying ``nn.Linear`` layers.

A layer is sparsified *in place* by swapping its class for a subclass that thresholds the input before the
original ``forward`` (the technique ``torch.nn.utils.parametrize`` uses). Why not a wrapper module around it:

* the module object, its ``weight``/``bias`` Parameter objects and its qualified name stay the same, so
  optimizers, DDP buckets, tied weights and ``isinstance(m, nn.Linear)`` checks keep working;
* state-dict keys stay the same (``...up_proj.weight``), plus one buffer ``activation_threshold``;
* removal restores the original class and deletes what was added: the very same object comes back,
  bit-for-bit.

The threshold is a persistent 0-dim buffer; the target, the calibration result and the state live in
``_extra_state`` so a checkpoint carries everything a report needs.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterator

import torch
from torch import nn

__all__ = [
    "SparsifierMode",
    "GradientMode",
    "ActivationSparsifierMixin",
    "SparseActivationLinear",
    "is_sparsified",
    "sparsified_layers",
    "install_sparsifier",
    "uninstall_sparsifier",
    "original_module_class",
    "THRESHOLD_BUFFER",
    "ADAPTER_INPUT_KWARG",
    "weight_nbytes",
    "threshold_summary",
]

THRESHOLD_BUFFER = "activation_threshold"

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
        """Zero ``|x| <= threshold``.

        A multiply by the keep-mask: ``torch.where`` costs twice as much on CPU. A threshold of -inf keeps
        everything and +inf zeroes everything (an infinite input times zero stays NaN, as it should).
        """
        keep = x.abs() > self.activation_threshold
        if torch.is_grad_enabled() and x.requires_grad and self._actsparse.gradient_mode is GradientMode.STE:
            return _StraightThroughMask.apply(x, keep)
        return x * keep

    def activation_input(self, input: torch.Tensor) -> torch.Tensor:
        """What this layer computes on: ``input`` (any shape ``[..., in_features]``, float) thresholded as the
        mode says, after every observer has seen the raw ``input``.

        The one entry point of the input processing: the layer's own ``forward`` calls it, and so does the
        input hook of an adapter wrapper around this layer (:mod:`pl_actsparse.core.adapters`), so that the base
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
        if state.observers:
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
    def get_extra_state(self) -> dict[str, Any]:
        s = self._actsparse
        return {
            "target": s.target,
            "calibrated": s.mode is SparsifierMode.SPARSIFYING,
            "gradient_mode": s.gradient_mode.value,
            "calibration_sparsity": s.calibration_sparsity,
            "calibration_elements": s.calibration_elements,
        }

    def set_extra_state(self, state: Any) -> None:
        s = self._actsparse
        s.target = float(state["target"])
        s.mode = SparsifierMode.SPARSIFYING if state.get("calibrated") else SparsifierMode.PASSTHROUGH
        s.gradient_mode = GradientMode(state.get("gradient_mode", "masked"))
        s.calibration_sparsity = state.get("calibration_sparsity")
        s.calibration_elements = int(state.get("calibration_elements", 0))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # A dense checkpoint has no threshold: keep this layer's current threshold and state instead of
        # failing strict loading. The weights load as usual; recalibrate if they changed.
        own = [prefix + THRESHOLD_BUFFER, prefix + "_extra_state"]
        absent = [k for k in own if k not in state_dict]
        before = len(missing_keys)
        incoming = state_dict.get(prefix + THRESHOLD_BUFFER)
        current = self._buffers[THRESHOLD_BUFFER]
        if isinstance(incoming, torch.Tensor) and incoming.shape != current.shape:
            # a per-channel threshold (shape [in_features], see pl_actsparse.tuning.weight_aware) into a scalar one, or back
            self._buffers[THRESHOLD_BUFFER] = torch.empty(incoming.shape, dtype=current.dtype, device=current.device)
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if absent:
            missing_keys[before:] = [k for k in missing_keys[before:] if k not in absent]

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        s = self._actsparse
        t = self.activation_threshold
        shown = f"{float(t):.4g}" if t.numel() == 1 else f"per-channel[{t.numel()}]"
        return f"{base}, target_sparsity={s.target:g}, threshold={shown}, mode={s.mode.value}"

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


def _sparse_class_for(cls: type) -> type:
    if cls not in _SPARSE_CLASSES:
        _SPARSE_CLASSES[cls] = type(
            f"SparseActivation{cls.__name__}",
            (ActivationSparsifierMixin, cls),
            {"__module__": __name__, "__doc__": f"{cls.__qualname__} with a sparsified input."},
        )
    return _SPARSE_CLASSES[cls]


def _rebuild_sparse(func: Callable, args: tuple, state: Any):
    obj = func(*args)
    obj.__class__ = _sparse_class_for(type(obj))
    if state is not None:
        obj.__setstate__(state)
    return obj


def is_sparsified(module: nn.Module) -> bool:
    """Whether a module carries an activation sparsifier."""
    return isinstance(module, ActivationSparsifierMixin)


def original_module_class(module: nn.Module) -> type:
    """The class the module had before :func:`install_sparsifier` swapped it."""
    cls = type(module)
    # Sparse classes are built as (ActivationSparsifierMixin, OriginalClass).
    return cls.__bases__[-1] if issubclass(cls, ActivationSparsifierMixin) else cls


def sparsified_layers(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """Qualified names and modules of every sparsified layer, in model order."""
    for name, module in model.named_modules():
        if is_sparsified(module):
            yield name, module  # type: ignore[misc]


def install_sparsifier(
    module: nn.Linear, target: float, gradient_mode: GradientMode | str = GradientMode.MASKED
) -> nn.Linear:
    """Turn one Linear into a sparsified one (pass-through until calibrated), or retarget it if it already is."""
    if is_sparsified(module):
        module._actsparse.target = float(target)  # type: ignore[union-attr]
        module._actsparse.gradient_mode = GradientMode(gradient_mode)  # type: ignore[union-attr]
        return module
    if not isinstance(module, nn.Linear):
        raise TypeError(f"only nn.Linear and its subclasses can be sparsified, got {type(module).__qualname__}")
    device = module.weight.device if isinstance(module.weight, torch.Tensor) else None
    module.__class__ = _sparse_class_for(type(module))
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
    module.__class__ = orig
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
    return _tensor_nbytes(weight) if isinstance(weight, torch.Tensor) else 0


def _tensor_nbytes(t: torch.Tensor) -> int:
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_nbytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def threshold_summary(threshold: torch.Tensor) -> float:
    """One number for a threshold in tables and logs: the value of a scalar threshold, the mean of a
    per-channel one (shape ``[in_features]``, see :mod:`pl_actsparse.tuning.weight_aware`)."""
    t = threshold.detach()
    return float(t) if t.numel() == 1 else float(t.float().mean())
