"""Export sparsified layers for fast CPU decoding.

A sparsified layer zeroes its inputs with ``|x| <= activation_threshold`` before an ordinary linear. During
training and calibration that is a mask and a dense matmul; at inference the zeros are worth something only
if the kernel skips the weight rows they multiply. :func:`export_for_inference` swaps every sparsified
``nn.Linear`` for a :class:`SparseInferenceLinear`, which stores ``W^T`` (the layout the sparse GEMV reads)
and per call picks

* the sparse kernel (:func:`pl_actsparse.kernels.sparse_linear`) for at most ``max_sparse_tokens`` tokens
  (decoding), and
* a dense product of the masked input for more tokens (prefill, batched scoring), where a GEMM wins: on the
  shared ``W^T``, or with ``prefill="prepacked"`` on a second copy of it prepacked for the CPU's GEMM library.

Both paths compute ``F.linear(x.masked_fill(|x| <= t, 0), W, b)``. See ``docs/inference.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pl_actsparse.core.layer import (
    STATE_KEY, THRESHOLD_BUFFER, SparsifierMode, decode_sparsifier_state, encode_sparsifier_state, fit_threshold_buffer, is_sparsified,
    linear_like_spec, original_module_class, sparsifier_state, threshold_text,
)
from pl_actsparse.errors import InvalidOptionError
from pl_actsparse.kernels import cpu as _cpu, cuda as _cuda  # cuda imports triton only when its kernel first runs
from pl_actsparse.kernels.cpu import sparse_linear, sparse_linear_cpu, to_kernel_layout, zero_small
from pl_actsparse.kernels.dispatch import dense_linear_t, packed_linear, prepack_weight, sparse_token_crossover
from pl_actsparse.kernels.sparse_op import linear_t_fake

__all__ = ["SparseInferenceLinear", "check_export_options", "default_max_sparse_tokens", "is_sparsified_linear", "sparse_inference_linear"]

PREFILL_MODES = ("shared", "prepacked")


def check_export_options(max_sparse_tokens: Any, prefill: Any = "shared") -> None:
    """The one check of the export options (:func:`~pl_actsparse.export.convert.export_for_inference`, before any
    change, and each layer's constructor). Raises ``InvalidOptionError``: ``max_sparse_tokens`` not None or an int >= 0,
    ``prefill`` not in :data:`PREFILL_MODES`."""
    if max_sparse_tokens is not None and (not isinstance(max_sparse_tokens, int) or isinstance(max_sparse_tokens, bool) or max_sparse_tokens < 0):
        raise InvalidOptionError(f"max_sparse_tokens must be an int >= 0 (0: always dense) or None (the measured crossover), got {max_sparse_tokens!r}")
    if prefill not in PREFILL_MODES:
        raise InvalidOptionError(f"prefill must be one of {PREFILL_MODES}, got {prefill!r}")


def is_sparsified_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a sparsified layer: an ``nn.Linear`` (or a Linear-like type registered with
    :func:`pl_actsparse.core.layer.register_linear_like`, e.g. GPT-2's ``Conv1D``) carrying an
    ``activation_threshold`` buffer.
    """
    return THRESHOLD_BUFFER in module._buffers and linear_like_spec(module) is not None


def applies_threshold(module: nn.Module) -> bool:
    """Whether the layer's threshold acts: the core's layers are pass-through until calibrated."""
    return not is_sparsified(module) or sparsifier_state(module).mode is SparsifierMode.SPARSIFYING


def default_max_sparse_tokens(
    dtype: torch.dtype, backend: Optional[str] = None, weight_bytes: Optional[int] = None,
    weight_t: Optional[Tensor] = None,
) -> int:
    """The token count up to which the sparse kernel beats the dense path, measured on this machine for
    ``dtype`` and ``backend`` (:func:`pl_actsparse.kernels.dispatch.sparse_token_crossover`): for the shape
    of ``weight_t`` (``[in, out]`` of ``dtype``; measured on it at first use, kept in memory) or, without
    it, for a reference shape (cached per CPU).

    ``backend`` is ``"cpp"`` or ``"torch"``; ``None`` resolves the configured one without compiling. Layers
    smaller than the backend's :data:`~pl_actsparse.kernels.MIN_SPARSE_WEIGHT_BYTES` get 0 (always dense).
    """
    if backend is None:
        backend = _cpu.resolve_backend(build=False)
    if weight_t is not None and weight_bytes is None:
        weight_bytes = weight_t.numel() * weight_t.element_size()
    if weight_bytes is not None and weight_bytes < _cpu.MIN_SPARSE_WEIGHT_BYTES.get(backend, 0):
        return 0
    return sparse_token_crossover(dtype, backend, weight_t=weight_t)


def _token_limit(device: str, dtype: torch.dtype, weight_t: Tensor, limit: Optional[int], backend: Optional[str] = None) -> int:
    """Largest token count per call that an exported layer sends to the sparse kernel on ``device`` (a device
    type) for inputs of ``dtype``: ``limit`` where set (CPU; CUDA with Triton), else the CPU's measured
    :func:`default_max_sparse_tokens` or the Triton GEMV's ``CUDA_MAX_SPARSE_TOKENS``; -1 (always dense) on
    CUDA without Triton and other devices."""
    if device == "cuda":
        if not _cuda.triton_available():
            return -1
        return _cuda.CUDA_MAX_SPARSE_TOKENS if limit is None else limit
    if device != "cpu":
        return -1
    if limit is not None:
        return limit
    if dtype == weight_t.dtype:  # measured on this layer's shape at first use
        return default_max_sparse_tokens(dtype, backend, weight_t=weight_t)
    return default_max_sparse_tokens(dtype, backend, weight_t.numel() * dtype.itemsize)


class SparseInferenceLinear(nn.Module):
    """Inference-only stand-in for a sparsified ``nn.Linear``, holding ``W^T`` for the sparse kernel.

    Parameters (``requires_grad=False``): ``weight_t`` ``[in, out]`` and optional ``bias``. The buffer
    ``activation_threshold`` (``threshold``: a float or a tensor of 1 or ``in_features`` values) is 0-dim or
    per-channel ``[in_features]`` (e.g. :func:`pl_actsparse.tuning.weight_aware.sparsify_activations_weight_aware`'s
    ``tau / c_i``); inputs with ``|x| <= threshold`` count as zero, compared as that expression compares them
    (:func:`~pl_actsparse.kernels.effective_threshold`). Raises ``InvalidOptionError`` for another number of values.

    ``max_sparse_tokens``: calls with at most this many tokens (``x.numel() // in_features``) use the sparse
    kernel, larger ones the dense path. ``None`` uses :func:`default_max_sparse_tokens` for the input dtype,
    the layer size and the backend chosen at construction. ``prefill``: ``"shared"`` (the dense path reads
    ``W^T``) or ``"prepacked"``: eager CPU dense-path calls without autograd use a second copy of ``W^T``
    prepacked for oneDNN (:func:`~pl_actsparse.kernels.dispatch.prepack_weight`, ``extra_weight_bytes``), no
    parameter: never saved, dropped by :meth:`to_linear`, pickling and copying, rebuilt when next needed if
    ``W^T`` changed (loading, ``.to()``). Not a layer for training: there is no backward.
    """

    weight_t: Tensor
    activation_threshold: Tensor

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *, threshold: float | Tensor = -math.inf,
        max_sparse_tokens: Optional[int] = None, prefill: str = "shared", device: Any = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        check_export_options(max_sparse_tokens, prefill)
        self.prefill = prefill
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.max_sparse_tokens = max_sparse_tokens
        self.backend = _cpu.resolve_backend(build=False)
        self.weight_t = nn.Parameter(torch.empty(in_features, out_features, **factory), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.register_parameter("weight", None)  # W is held only as W^T (`layer.weight is None`, as before)
        thr = as_threshold(threshold if isinstance(threshold, Tensor) else torch.tensor(float(threshold)), in_features)
        #: The sparsifier state of the exported layer (see :func:`decode_sparsifier_state`), saved as ``_extra_state``.
        self.sparsity_state = plain_exported_state(bool(torch.isfinite(thr).all()))
        self.register_buffer(THRESHOLD_BUFFER, thr.to(device))
        nn.init.normal_(self.weight_t, std=in_features**-0.5)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, max_sparse_tokens: Optional[int] = None, prefill: str = "shared",
    ) -> "SparseInferenceLinear":
        """Build from a sparsified ``nn.Linear`` (its ``activation_threshold`` buffer is required).

        The new layer copies the threshold (one value or per channel, :func:`exported_threshold`) and shares the
        bias tensor; ``W^T`` is the only new copy (with ``prefill="prepacked"`` also its packed copy, made now).
        """
        if THRESHOLD_BUFFER not in linear._buffers or linear._buffers[THRESHOLD_BUFFER] is None:
            raise ValueError(f"{type(linear).__name__} has no {THRESHOLD_BUFFER!r} buffer; it is not sparsified")
        spec = linear_like_spec(linear)
        if spec is None:
            raise ValueError(f"{type(linear).__name__} is not a Linear-like layer (see register_linear_like)")
        weight_t = spec.weight_t(linear)  # [in, out]: GPT-2's Conv1D stores it so, nn.Linear's weight.t()
        weight = weight_t.t()
        new = cls(  # skeleton on the meta device (no allocation), then the real tensors
            spec.in_features(linear),
            spec.out_features(linear),
            bias=getattr(linear, "bias", None) is not None,
            max_sparse_tokens=max_sparse_tokens,
            prefill=prefill,
            device="meta",
            dtype=weight.dtype,
        )
        new.weight_t = nn.Parameter(to_kernel_layout(weight), requires_grad=False)  # Conv1D's is already W^T: no copy
        if getattr(linear, "bias", None) is not None:
            new.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        new.activation_threshold = exported_threshold(linear, new.in_features)
        new.sparsity_state = exported_state(linear)
        new.__dict__["_restore"] = RestoreInfo.of(linear)
        new.__dict__["_weight_in_out"] = _stores_weight_t(linear, weight_t)
        new.train(linear.training)
        new.packed_weight()
        return new

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the weight a decode step reads: ``W^T`` (a prepacked prefill copy is not read while decoding)."""
        return self.weight_t.numel() * self.weight_t.element_size()

    @property
    def extra_weight_bytes(self) -> int:
        """Bytes of the prepacked prefill copy (``prefill="prepacked"``, built now if missing), else 0."""
        p = self.packed_weight()
        return 0 if p is None else p.numel() * p.element_size()

    def packed_weight(self) -> Optional[Tensor]:
        """``W^T`` prepacked for multi-token CPU calls (``prefill="prepacked"``; made now if missing or if ``W^T``
        changed since), else ``None``. Raises ``RuntimeError`` where the weight's dtype/device has no packer."""
        w, cached = self.weight_t, self.__dict__.get("_packed")
        if self.prefill != "prepacked" or w.is_meta:
            self.__dict__.pop("_packed", None)
            return None
        w = self._normal("weight_t")
        key = (id(w), w.data_ptr(), w._version, w.dtype, w.device)
        if cached is None or cached[0] != key:
            self.__dict__["_packed"] = cached = (key, prepack_weight(w))
        return cached[1]

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_packed"}  # opaque: rebuilt when next used

    def sparse_token_limit(self, dtype: torch.dtype) -> int:
        """Largest token count routed to the sparse kernel for CPU inputs of ``dtype``."""
        return _token_limit("cpu", dtype, self.weight_t, self.max_sparse_tokens, self.backend)

    def forward(self, x: Tensor) -> Tensor:
        """``F.linear(x.masked_fill(|x| <= threshold, 0), W, bias)``, with ``F.linear``'s dtype rules.

        * ``x`` must have the weight's dtype, as for ``F.linear`` (else ``RuntimeError``), except under
          ``torch.autocast`` where ``F.linear`` runs in the autocast dtype: then the input is masked in its
          own dtype (as the sparsified layer does before its ``F.linear``), the product is computed in the
          weight's dtype and the output has the autocast dtype (equal to autocast's ``F.linear`` within the
          rounding of that dtype).
        * With autograd recording (``x.requires_grad``), the differentiable dense path is used, so
          gradients reach ``x`` on every path (the weights are frozen).
        * Under ``torch.compile``/``torch.export`` (any grad mode, static or dynamic shapes) the layer is one
          custom op, :func:`sparse_inference_linear`, which chooses between the sparse kernel and the dense
          path at run time, exactly as eager does, and has an autograd formula (gradients reach ``x``).
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with {self.in_features} features, got shape {tuple(x.shape)}")
        wdtype = self.weight_t.dtype
        dev = x.device.type
        autocast = dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev)
        if x.dtype != wdtype:
            if not autocast:
                raise RuntimeError(
                    f"{type(self).__name__}: input dtype {x.dtype} differs from the weight dtype {wdtype}; like "
                    "F.linear, mixed dtypes need torch.autocast or an explicit cast of the input"
                )
            # mask in the input's dtype (the sparsified layer's semantics), then a product in the weight's dtype;
            # |x| <= 0 zeroes exactly the zeros: the masked input gives the same values, zeros skipped
            x = x.masked_fill(x.abs() <= self.activation_threshold, 0).to(wdtype)
            y = self._route(x, threshold=torch.zeros((), device=x.device))
        else:
            y = self._route(x)
        if autocast and y.is_floating_point():
            y = y.to(torch.get_autocast_dtype(dev))
        return y

    def _route(self, x: Tensor, threshold: Optional[Tensor] = None) -> Tensor:
        thr = self.activation_threshold if threshold is None else threshold
        if torch.compiler.is_compiling():
            # One opaque, differentiable node that picks its path at run time: tracing reads no Python state
            # (thread count, measured crossovers), so nothing breaks the graph or specializes it.
            limit = -1 if self.max_sparse_tokens is None else self.max_sparse_tokens
            return sparse_inference_linear(x, thr, self.weight_t, self.bias, limit)
        if not (torch.is_grad_enabled() and x.requires_grad) and x.numel() // self.in_features <= _token_limit(
                x.device.type, x.dtype, self.weight_t, self.max_sparse_tokens, self.backend):
            return self.sparse_forward(x, thr)
        return self.dense_forward(x, thr)

    def sparse_forward(self, x: Tensor, threshold: Optional[Tensor] = None) -> Tensor:
        """The masked product through the sparse kernel (used up to ``max_sparse_tokens`` tokens).

        ``threshold`` defaults to the layer's; ``x`` must have the weight's dtype. Not differentiable.
        """
        thr = self.activation_threshold if threshold is None else threshold
        if torch.compiler.is_compiling():
            return sparse_linear(x, thr, self.weight_t, self.bias)  # one opaque graph node
        # Eager: call the kernel directly; the custom op's dispatch layers cost ~40 us per call.
        if x.device.type == "cuda":
            t = self._threshold_for(x.dtype) if threshold is None else _cpu.effective_threshold(thr, x.dtype)
            return _cuda.sparse_linear_cuda(x, t, self.weight_t, self.bias)
        return sparse_linear_cpu(x, thr, self.weight_t, self.bias)

    def _normal(self, name: str) -> Optional[Tensor]:
        """``self.<name>``, first replaced by a normal copy if it is an inference tensor (made under ``inference_mode``):
        those keep no version counter, so a cache keyed on it would miss in-place changes (``load_state_dict``)."""
        t = getattr(self, name)
        if t is not None and t.is_inference():
            with torch.inference_mode(False):
                setattr(self, name, nn.Parameter(t.clone(), requires_grad=False) if isinstance(t, nn.Parameter) else t.clone())
        return getattr(self, name)

    def _threshold_for(self, dtype: torch.dtype) -> float:
        # The threshold rounded to the input dtype, cached: reading a CUDA buffer costs a device sync.
        t = self._normal(THRESHOLD_BUFFER)
        key = (dtype, id(t), t._version)
        cached = self.__dict__.get("_threshold_cache")
        if cached is None or cached[0] != key:
            cached = (key, _cpu.effective_threshold(t, dtype))
            self.__dict__["_threshold_cache"] = cached
        return cached[1]

    def dense_forward(self, x: Tensor, threshold: Optional[Tensor] = None) -> Tensor:
        """The masked product through a dense GEMM (used above ``max_sparse_tokens`` tokens, and whenever
        autograd records: differentiable with respect to ``x``): the prepacked copy on CPU without autograd
        (``prefill="prepacked"``), else the GEMM measured fastest on ``W^T``."""
        thr = self.activation_threshold if threshold is None else threshold
        xm = zero_small(x, thr)
        if self.prefill == "prepacked" and x.device.type == "cpu" and not (torch.is_grad_enabled() and xm.requires_grad):
            return packed_linear(xm, self.packed_weight(), self.bias)
        return dense_linear_t(xm, self.weight_t, self.bias)  # the GEMM measured fastest here, on W^T itself

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"threshold={threshold_text(self.activation_threshold)}, max_sparse_tokens={self.max_sparse_tokens}, "
            f"backend={self.backend!r}, prefill={self.prefill!r}"
        )

    # -- saving, loading and removal ---------------------------------------------------------------
    def get_extra_state(self) -> Tensor:
        """The sparsifier state of the layer this one was exported from (target, calibration figures), as
        the float64 tensor of :func:`pl_actsparse.core.layer.encode_sparsifier_state`."""
        return encode_sparsifier_state(self.sparsity_state)

    def set_extra_state(self, state: Any) -> None:
        self.sparsity_state = decode_sparsifier_state(state)

    # Saved in the nn.Linear layout (weight [out, in], bias, threshold, state), never as W^T: a plain model loading
    # the file gets the right weights, and load_activation_sparsity / from_pretrained restore the sparsified model
    # from the very same keys as an unexported save. Checkpoints in this layout load (weight_t derived from
    # weight), and so do saves of 0.1 (weight_t) and checkpoints without a sparsifier state: this layer always
    # applies its threshold, so the state is bookkeeping only (it then says "calibrated" iff the threshold is
    # finite). Int8SparseInferenceLinear shares these four methods with its own keys.
    _WEIGHT_KEYS = ("weight", "weight_t")  # (saved, held)

    def _saved_tensors(self) -> dict[str, Optional[Tensor]]:
        w = self.weight_t if self.__dict__.get("_weight_in_out", False) else self.weight_t.t()  # Conv1D: [in, out]
        return {"weight": w, "bias": self.bias, THRESHOLD_BUFFER: self.activation_threshold}

    def _held_weight(self, saved: Tensor) -> Tensor:
        return saved if self.__dict__.get("_weight_in_out", False) else saved.t()

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        for key, t in self._saved_tensors().items():
            if t is not None:
                destination[prefix + key] = t if keep_vars else t.detach()
        if THRESHOLD_BUFFER not in self._non_persistent_buffers_set:  # (an int8 layer not sparsified has neither)
            destination[prefix + STATE_KEY] = self.get_extra_state()

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        (saved, held), skey = (prefix + k for k in self._WEIGHT_KEYS), prefix + STATE_KEY
        if saved in state_dict and held not in state_dict:
            state_dict[held] = self._held_weight(state_dict.pop(saved))
        before = len(missing_keys)
        fit_threshold_buffer(self, state_dict.get(prefix + THRESHOLD_BUFFER))
        if prefix + THRESHOLD_BUFFER in state_dict:  # a sparsified layer's keys: an int8 layer not sparsified takes them
            self._non_persistent_buffers_set.discard(THRESHOLD_BUFFER)
        nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if skey not in state_dict:
            missing_keys[before:] = [k for k in missing_keys[before:] if k != skey]
            if isinstance(self, SparseInferenceLinear):  # the int8 layer keeps the state it was exported with
                finite = bool(torch.isfinite(self.activation_threshold).all()) if not self.activation_threshold.is_meta else False
                self.sparsity_state = dict(self.sparsity_state, calibrated=finite)

    def to_linear(self) -> nn.Linear:
        """The plain (unsparsified) module this layer was exported from, rebuilt.

        Same class, attributes and hooks as the original module, ``requires_grad`` as it was; the weight is
        ``W^T`` transposed back (exact: a transpose moves values, it does not compute them; a prepacked copy is
        not kept), the bias the same tensor. A layer built directly (not by :meth:`from_linear`) comes back as an ``nn.Linear``.
        Used by :func:`pl_actsparse.remove_activation_sparsity` on exported models.
        """
        info = self.__dict__.get("_restore") or RestoreInfo(nn.Linear, None, True, True)  # None: built directly
        if self.__dict__.get("_weight_in_out", False):  # the original stored W^T itself (GPT-2's Conv1D)
            weight = self.weight_t.detach()
        else:
            weight = self.weight_t.detach().t().contiguous()
        return info.build(weight, None if self.bias is None else self.bias.detach(), self)


def _stores_weight_t(module: nn.Module, weight_t: Tensor) -> bool:
    """Whether ``module`` keeps its weight as ``[in, out]`` (``W^T``, like GPT-2's ``Conv1D``) rather than
    ``nn.Linear``'s ``[out, in]``: its registered ``weight_t`` is its ``weight`` itself, not a transposed view."""
    w = getattr(module, "weight", None)
    if not isinstance(w, Tensor) or w is weight_t:
        return isinstance(w, Tensor)
    return w.data_ptr() == weight_t.data_ptr() and w.shape == weight_t.shape and w.stride() == weight_t.stride()


@dataclass
class RestoreInfo:
    """What :meth:`SparseInferenceLinear.to_linear` needs to give back the original module (no weights)."""

    cls: type
    shell: Optional[dict[str, Any]]  # the module's __dict__ without parameters, sparsifier buffer and state
    weight_requires_grad: bool
    bias_requires_grad: bool

    @classmethod
    def of(cls, linear: nn.Linear) -> "RestoreInfo":
        shell = {k: v for k, v in linear.__dict__.items() if k != "_actsparse"}
        shell["_parameters"] = {k: None for k in linear._parameters}
        shell["_buffers"] = {k: v for k, v in linear._buffers.items() if k != THRESHOLD_BUFFER}
        shell["_non_persistent_buffers_set"] = set(linear._non_persistent_buffers_set) - {THRESHOLD_BUFFER}
        w, b = getattr(linear, "weight", None), getattr(linear, "bias", None)
        return cls(original_module_class(linear), shell, bool(w.requires_grad) if isinstance(w, Tensor) else True,
                   bool(b.requires_grad) if b is not None else True)

    def build(self, weight: Tensor, bias: Optional[Tensor], exported: nn.Module) -> nn.Linear:
        """The original module again, holding ``weight`` and ``bias`` (as Parameters, ``requires_grad`` as
        they were), in the train/eval mode of ``exported`` (the layer it is rebuilt from, which also gives the sizes
        of a layer built directly)."""
        if self.shell is None:
            lin = nn.Linear(exported.in_features, exported.out_features, bias=bias is not None, device="meta")
        elif "weight" not in self.shell["_parameters"]:
            raise NotImplementedError(
                f"cannot rebuild the exported {self.cls.__qualname__}: it keeps its weight under another name than "
                "'weight', so only its own code knows how to hold W again; keep the model from before export"
            )
        else:
            lin = self.cls.__new__(self.cls)
            lin.__dict__.update(self.copy_of_shell())
        lin.weight = nn.Parameter(weight, requires_grad=self.weight_requires_grad)
        lin.bias = None if bias is None else nn.Parameter(bias, requires_grad=self.bias_requires_grad)
        return lin.train(exported.training)

    def copy_of_shell(self) -> dict[str, Any]:
        d = dict(self.shell or {})
        for k in ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks"):
            if isinstance(d.get(k), dict):
                d[k] = type(d[k])(d[k])
        d["_non_persistent_buffers_set"] = set(d.get("_non_persistent_buffers_set", ()))
        return d


def exported_state(linear: nn.Module) -> dict[str, Any]:
    """The sparsifier state of a sparsified layer, as :func:`decode_sparsifier_state` returns it."""
    state = getattr(linear, "_actsparse", None)
    if state is not None and hasattr(state, "target"):
        return decode_sparsifier_state(encode_sparsifier_state(state))
    t = linear._buffers.get(THRESHOLD_BUFFER)
    return plain_exported_state(t is not None and bool(torch.isfinite(t).all()))


def as_threshold(t: Tensor, in_features: int) -> Tensor:
    """A copy of threshold ``t`` as an exported layer holds it: 0-dim for one value, else ``[in_features]`` (same
    dtype and device). Raises ``InvalidOptionError`` for any other number of values."""
    if t.numel() not in (1, in_features):
        raise InvalidOptionError(f"{THRESHOLD_BUFFER} must hold 1 or in_features={in_features} values, got shape {tuple(t.shape)}")
    return t.detach().reshape(() if t.numel() == 1 else (in_features,)).clone()


def exported_threshold(layer: nn.Module, in_features: int, device: Any = None) -> Tensor:
    """The threshold an exported layer keeps for ``layer``: :func:`as_threshold` of its ``activation_threshold``,
    or ``-inf`` (on ``device`` without a buffer) where it has none or passes its input through (the core's layers
    before calibration: their forward ignores the buffer)."""
    t = layer._buffers.get(THRESHOLD_BUFFER)
    if t is None or not applies_threshold(layer):
        return torch.tensor(-math.inf, device=device if t is None else t.device)
    return as_threshold(t, in_features)


def plain_exported_state(calibrated: bool = False) -> dict[str, Any]:
    """The state of an exported layer with no sparsifier state of its own: no target, no calibration figures."""
    return {"target": 0.0, "calibrated": calibrated, "gradient_mode": "masked", "calibration_sparsity": None, "calibration_elements": 0}


@torch.library.custom_op("pl_actsparse::sparse_inference_linear", mutates_args=())
def sparse_inference_linear(
    x: Tensor, threshold: Tensor, weight_t: Tensor, bias: Optional[Tensor], max_sparse_tokens: int
) -> Tensor:
    """What :class:`SparseInferenceLinear` computes, with the token-count dispatch inside one op.

    ``F.linear(x.masked_fill(|x| <= threshold, 0), weight_t.T, bias)``: through the sparse kernel for at
    most ``max_sparse_tokens`` tokens, a dense GEMM for more; ``max_sparse_tokens < 0`` uses the crossover
    measured for this shape and dtype (:func:`default_max_sparse_tokens`), decided at run time. The layer
    calls it under ``torch.compile``/``torch.export``, so the graph holds one node whose run-time branch is
    the eager layer's. Differentiable with respect to ``x`` (the weights are frozen).
    """
    ntok = x.numel() // weight_t.shape[0] if weight_t.shape[0] else 0
    if ntok <= _token_limit(x.device.type, x.dtype, weight_t, None if max_sparse_tokens < 0 else max_sparse_tokens):
        if x.device.type == "cuda":
            return _cuda.sparse_linear_cuda(x, _cpu.effective_threshold(threshold, x.dtype), weight_t, bias)
        return sparse_linear_cpu(x, threshold, weight_t, bias)
    return dense_linear_t(zero_small(x, threshold), weight_t, bias)


sparse_inference_linear.register_fake(linear_t_fake)


def _setup_context(ctx, inputs, output) -> None:
    x, threshold, weight_t = inputs[:3]
    ctx.save_for_backward(x, threshold, weight_t)


def _backward(ctx, grad: Tensor):
    x, threshold, weight_t = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:  # d/dx of F.linear(masked x): W^T's rows, zero where x was zeroed
        grad_x = (grad @ weight_t.t().to(grad.dtype)).masked_fill(x.abs() <= threshold, 0).to(x.dtype)
    return grad_x, None, None, None, None


sparse_inference_linear.register_autograd(_backward, setup_context=_setup_context)
