"""Inference-only int8 layers: the int8 sparse GEMV while decoding, dequantize + GEMM for prefill.

:func:`pl_actsparse.export.convert.export_for_inference` swaps every
:class:`~pl_actsparse.core.int8.Int8WeightLinear` (sparsified or not) for an :class:`Int8SparseInferenceLinear`
sharing its int8 buffers, and reads torchao's weight-only int8 weights too. See ``docs/int8.md``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from pl_actsparse.core.int8 import Int8WeightLinear
from pl_actsparse.errors import InvalidOptionError
from pl_actsparse.core.layer import THRESHOLD_BUFFER, threshold_text
from pl_actsparse.export.linear import SparseInferenceLinear, check_export_options, exported_state, exported_threshold
from pl_actsparse.kernels import cpu as _cpu
from pl_actsparse.kernels import int8_cpu as _int8
from pl_actsparse.kernels.int8_cpu import int8_dense_linear, int8_sparse_linear, resolve_int8_backend

__all__ = ["Int8SparseInferenceLinear", "DEFAULT_INT8_MAX_SPARSE_TOKENS"]

#: Largest token count routed to the int8 sparse kernel by :class:`Int8SparseInferenceLinear`, by backend.
#: The C++ kernel reads the union of the tokens' rows once and does one FMA per token and weight, which beats
#: dequantizing the whole weight for a GEMM up to a handful of tokens; the torch fallback only for one.
DEFAULT_INT8_MAX_SPARSE_TOKENS = {"cpp": 8, "torch": 1}


class Int8SparseInferenceLinear(nn.Module):
    """Inference-only int8 layer: sparse int8 GEMV for few tokens, dequantize + GEMM for many.

    Buffers: ``qweight_t`` int8 ``[in, out]``, ``scale``, ``zero_point`` (as in :class:`Int8WeightLinear`),
    ``activation_threshold`` (0-dim, or per channel ``[in_features]`` as the float layer's; ``-inf`` for a layer that
    was not sparsified: the kernel then reads every row, a dense int8 GEMV) and ``bias`` (or ``None``). Calls with at most ``max_sparse_tokens`` tokens use
    :func:`~pl_actsparse.kernels.int8_cpu.int8_sparse_linear`; larger ones
    :func:`~pl_actsparse.kernels.int8_cpu.int8_dense_linear` on the masked input. Both compute
    ``F.linear(x.masked_fill(|x| <= t, 0), dequantized W, bias)`` with fp32 accumulation; the output has
    ``x``'s dtype. No backward.
    """

    qweight_t: Tensor
    scale: Tensor
    zero_point: Tensor
    activation_threshold: Tensor

    def __init__(self, layer: Int8WeightLinear, *, max_sparse_tokens: Optional[int] = None) -> None:
        super().__init__()
        if not isinstance(layer, Int8WeightLinear):
            raise TypeError(f"expected an Int8WeightLinear, got {type(layer).__qualname__}")
        check_export_options(max_sparse_tokens)
        self.in_features = layer.in_features
        self.out_features = layer.out_features
        self.mode = layer.mode
        self.granularity = layer.granularity
        self.weight_dtype = layer.weight_dtype
        self.max_sparse_tokens = max_sparse_tokens
        self.backend = resolve_int8_backend(build=False)
        self.register_buffer("qweight_t", layer.qweight)
        self.register_buffer("scale", layer.scale)
        self.register_buffer("zero_point", layer.zero_point)
        # not saved for a layer that was not sparsified (-inf): the state dict keeps the keys of the model exported
        self.register_buffer(THRESHOLD_BUFFER, exported_threshold(layer, self.in_features, layer.qweight.device),
                             persistent=THRESHOLD_BUFFER in layer._buffers)
        b = layer.bias
        self.register_buffer("bias", None if b is None else b.detach())
        #: The sparsifier state of the exported layer (see :func:`~pl_actsparse.core.layer.decode_sparsifier_state`), saved as ``_extra_state``.
        self.sparsity_state = exported_state(layer)
        self.train(layer.training)

    # -- saving and loading: SparseInferenceLinear's, with the keys of a sparsified Int8WeightLinear -----------
    # (``qweight`` holds the same [in, out] codes as qweight_t), so an exported int8 model's checkpoint loads into
    # a model quantized with quantize_weights_int8; the sparsifier state is the exported layer's, as there
    get_extra_state = SparseInferenceLinear.get_extra_state
    set_extra_state = SparseInferenceLinear.set_extra_state
    _save_to_state_dict = SparseInferenceLinear._save_to_state_dict
    _load_from_state_dict = SparseInferenceLinear._load_from_state_dict
    _WEIGHT_KEYS = ("qweight", "qweight_t")  # (saved, held)
    _normal = SparseInferenceLinear._normal

    def _saved_tensors(self) -> dict[str, Optional[Tensor]]:
        return {"bias": self.bias, "qweight": self.qweight_t, "scale": self.scale, "zero_point": self.zero_point,
                THRESHOLD_BUFFER: None if THRESHOLD_BUFFER in self._non_persistent_buffers_set else self.activation_threshold}

    def _held_weight(self, saved: Tensor) -> Tensor:
        return saved

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the stored weight: int8 codes plus scales and zero points."""
        return sum(t.numel() * t.element_size() for t in (self.qweight_t, self.scale, self.zero_point))

    def sparse_token_limit(self) -> int:
        if self.max_sparse_tokens is not None:
            return self.max_sparse_tokens
        return DEFAULT_INT8_MAX_SPARSE_TOKENS.get(self.backend, 1)

    def _direct_args(self) -> Optional[tuple]:
        # Per-call conversions of the custom op, done once: (row_scale, row_zero, col_scale, col_zero, bias)
        # as contiguous fp32 vectors, rebuilt when a buffer is replaced or changed in place (load_state_dict, .to()).
        ts = (self.qweight_t, *(self._normal(n) for n in ("scale", "zero_point", "bias")))
        key = (self.mode, *((id(t), 0 if t is None or t is ts[0] else t._version) for t in ts))
        cached = self.__dict__.get("_direct")
        if cached is not None and cached[0] == key:
            return cached[1]
        if self.qweight_t.device.type != "cpu" or not self.qweight_t.is_contiguous():
            return None
        zp = self.zero_point if self.mode == "asym" else None
        args = _int8.int8_kernel_args(self.qweight_t, self.scale, zp, self.bias)
        self.__dict__["_direct"] = (key, args, ts)  # ts: keeps the ids in the key unique
        return args

    def forward(self, x: Tensor) -> Tensor:
        """The masked int8 product; output in ``x``'s dtype, or the autocast dtype under ``torch.autocast``
        (as ``F.linear``). With autograd recording, the differentiable dense path (gradients reach ``x``)."""
        if x.shape[-1] != self.in_features:
            raise InvalidOptionError(f"expected input with {self.in_features} features, got shape {tuple(x.shape)}")
        dev = x.device.type
        if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
            with torch.autocast(dev, enabled=False):
                return self._forward(x).to(torch.get_autocast_dtype(dev))
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        zp = self.zero_point if self.mode == "asym" else None
        if torch.compiler.is_compiling():
            # one differentiable op choosing sparse/dense at run time (no graph break, recorded by torch.export)
            limit = self.sparse_token_limit() if x.device.type == "cpu" else 0
            return int8_sparse_linear(x, self.activation_threshold, self.qweight_t, self.scale, zp, self.bias, limit)
        ntok = x.numel() // self.in_features
        grad = torch.is_grad_enabled() and x.requires_grad
        if not grad and x.device.type == "cpu" and ntok <= self.sparse_token_limit():
            # whether the kernel is loaded now, not what self.backend said at construction (a layer unpickled
            # or built before the kernel was must still take the fast path once the first call has built it)
            if _int8.load_int8_extension(build=False):
                args = self._direct_args()
                if args is not None and _cpu.get_backend() != "torch":
                    # Eager decoding: the kernel directly (the custom op's Python checks cost ~0.2 ms/call).
                    t = _cpu.effective_threshold(self.activation_threshold, x.dtype)
                    y = _int8.int8_sparse_gemv_direct(x.reshape(-1, self.in_features).contiguous(), t, self.qweight_t, *args)
                    return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
            return int8_sparse_linear(x, self.activation_threshold, self.qweight_t, self.scale, zp, self.bias)
        return int8_dense_linear(_cpu.zero_small(x, self.activation_threshold), self.qweight_t, self.scale, zp, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"int8 {self.mode}, threshold={threshold_text(self.activation_threshold)}, backend={self.backend!r}"
        )

    def to_linear(self) -> nn.Linear:
        """The (unsparsified) module this layer was exported from, with the same int8 codes, scales and zero
        points, bit for bit: an :class:`Int8WeightLinear` sharing the buffers, or, for a layer exported from
        torchao's int8 (``Int8WeightOnlyConfig``), the original module class holding a torchao tensor of the
        same type, codes (transposed back), scales and zero points. Used by
        :func:`pl_actsparse.remove_activation_sparsity` on exported models."""
        codes = self.__dict__.get("_codes_restore")
        if codes is not None:  # a library's int8 weight (torchao), rebuilt from these buffers
            rebuild, info, bias_dtype = codes
            weight = rebuild(self.qweight_t.t().contiguous(), self.scale, self.zero_point)
            return info.build(weight, None if self.bias is None else self.bias.detach().to(bias_dtype), self)
        new = Int8WeightLinear(self.in_features, self.out_features, bias=False, mode=self.mode,
                               granularity=self.granularity, device="meta", dtype=self.weight_dtype)
        new.qweight, new.scale, new.zero_point = self.qweight_t, self.scale, self.zero_point
        new.bias = None if self.bias is None else nn.Parameter(self.bias.detach().to(self.weight_dtype))
        new.train(self.training)
        return new

