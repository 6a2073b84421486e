"""Export sparsified layers for fast CPU decoding.

A sparsified layer zeroes its inputs with ``|x| <= activation_threshold`` before an ordinary linear. During
training and calibration that is a mask and a dense matmul; at inference the zeros are worth something only
if the kernel skips the weight rows they multiply. :func:`export_for_inference` swaps every sparsified
``nn.Linear`` for a :class:`SparseInferenceLinear`, which stores ``W^T`` (the layout the sparse GEMV reads)
and per call picks

* the sparse kernel (:func:`pl_actsparse.kernels.sparse_linear`) for at most ``max_sparse_tokens`` tokens
  (decoding), and
* a dense product of the masked input for more tokens (prefill, batched scoring), where a GEMM wins.

Both paths compute ``F.linear(x.masked_fill(|x| <= t, 0), W, b)``. See ``docs/inference.md``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pl_actsparse.kernels import cpu as _cpu
from pl_actsparse.kernels.cpu import sparse_linear, sparse_linear_cpu, to_kernel_layout

__all__ = [
    "ExportedLayer",
    "SparseInferenceLinear",
    "default_max_sparse_tokens",
    "export_for_inference",
    "exported_layers",
    "is_sparsified_linear",
]

THRESHOLD_BUFFER = "activation_threshold"

# fp32 bytes of W^T converted per step by the low-precision dense path (stays well inside a typical L3).
_DENSE_CHUNK_BYTES = 8 << 20


def is_sparsified_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a sparsified layer: an ``nn.Linear`` carrying an ``activation_threshold`` buffer.

    Kept as the single detection point so that it can be swapped for the core library's helper.
    """
    return isinstance(module, nn.Linear) and THRESHOLD_BUFFER in module._buffers


def _applies_threshold(module: nn.Module) -> bool:
    # The core's layers are pass-through until calibrated (their forward ignores the buffer then).
    state = getattr(module, "_actsparse", None)
    if state is None or not hasattr(state, "mode"):
        return True
    return str(getattr(state.mode, "value", state.mode)) == "sparsifying"


def default_max_sparse_tokens(
    dtype: torch.dtype, backend: Optional[str] = None, weight_bytes: Optional[int] = None
) -> int:
    """The measured token count up to which the sparse kernel beats the dense path (see ``docs/inference.md``).

    ``backend`` is ``"cpp"`` or ``"torch"``; ``None`` resolves the configured one without compiling. Layers
    smaller than the backend's :data:`~pl_actsparse.kernels.MIN_SPARSE_WEIGHT_BYTES` get 0 (always dense).
    """
    if backend is None:
        backend = _cpu.resolve_backend(build=False)
    if weight_bytes is not None and weight_bytes < _cpu.MIN_SPARSE_WEIGHT_BYTES.get(backend, 0):
        return 0
    table = _cpu.DEFAULT_MAX_SPARSE_TOKENS
    return table.get((backend, dtype), table.get((backend, None), 1))


class SparseInferenceLinear(nn.Module):
    """Inference-only stand-in for a sparsified ``nn.Linear``, holding ``W^T`` for the sparse kernel.

    Parameters (``requires_grad=False``): ``weight_t`` ``[in, out]``, optional ``bias``, and ``weight``
    ``[out, in]`` only with ``keep_dense_weight=True`` (it then serves the dense path). The buffer
    ``activation_threshold`` is a 0-dim tensor; inputs with ``|x| <= threshold`` count as zero.

    ``max_sparse_tokens``: calls with at most this many tokens (``x.numel() // in_features``) use the sparse
    kernel, larger ones the dense path. ``None`` uses :func:`default_max_sparse_tokens` for the input dtype,
    the layer size and the backend chosen at construction. Not a layer for training: there is no backward.
    """

    weight_t: Tensor
    activation_threshold: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        threshold: float = -math.inf,
        max_sparse_tokens: Optional[int] = None,
        keep_dense_weight: bool = False,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if max_sparse_tokens is not None and max_sparse_tokens < 0:
            raise ValueError(f"max_sparse_tokens must be >= 0 or None, got {max_sparse_tokens}")
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
        if keep_dense_weight:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        else:
            self.register_parameter("weight", None)
        self.register_buffer(THRESHOLD_BUFFER, torch.tensor(float(threshold), device=device))
        nn.init.normal_(self.weight_t, std=in_features**-0.5)
        if self.weight is not None:
            with torch.no_grad():
                self.weight.copy_(self.weight_t.t())

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        max_sparse_tokens: Optional[int] = None,
        keep_dense_weight: bool = False,
    ) -> "SparseInferenceLinear":
        """Build from a sparsified ``nn.Linear`` (its ``activation_threshold`` buffer is required).

        The new layer copies the threshold and shares the bias tensor and (with ``keep_dense_weight``) the
        weight tensor; ``W^T`` is the only new copy. A layer of the core library that is not calibrated yet
        (pass-through: its forward ignores the buffer) gets the threshold ``-inf``, which zeroes nothing.
        """
        if THRESHOLD_BUFFER not in linear._buffers or linear._buffers[THRESHOLD_BUFFER] is None:
            raise ValueError(f"{type(linear).__name__} has no {THRESHOLD_BUFFER!r} buffer; it is not sparsified")
        threshold = linear._buffers[THRESHOLD_BUFFER]
        if threshold.numel() != 1:
            raise ValueError(f"{THRESHOLD_BUFFER} must hold one value, got shape {tuple(threshold.shape)}")
        weight = linear.weight
        new = cls(  # skeleton on the meta device (no allocation), then the real tensors
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            max_sparse_tokens=max_sparse_tokens,
            device="meta",
            dtype=weight.dtype,
        )
        new.weight_t = nn.Parameter(to_kernel_layout(weight), requires_grad=False)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        if keep_dense_weight:
            new.weight = nn.Parameter(weight.detach(), requires_grad=False)
        if _applies_threshold(linear):
            new.activation_threshold = threshold.detach().reshape(()).clone()
        else:
            new.activation_threshold = torch.tensor(-math.inf, device=threshold.device)
        new.train(linear.training)
        return new

    def sparse_token_limit(self, dtype: torch.dtype) -> int:
        """Largest token count routed to the sparse kernel for inputs of ``dtype``."""
        if self.max_sparse_tokens is not None:
            return self.max_sparse_tokens
        weight_bytes = self.weight_t.numel() * dtype.itemsize
        return default_max_sparse_tokens(dtype, self.backend, weight_bytes)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with {self.in_features} features, got shape {tuple(x.shape)}")
        ntokens = x.numel() // self.in_features
        device = x.device.type
        if device == "cpu" and ntokens <= self.sparse_token_limit(x.dtype):
            return self.sparse_forward(x)
        if device == "cuda" and ntokens <= self._cuda_token_limit():
            return self.sparse_forward(x)
        return self.dense_forward(x)

    def _cuda_token_limit(self) -> int:
        from pl_actsparse.kernels import cuda as triton_gemv

        if not triton_gemv.triton_available():
            return 0
        return triton_gemv.CUDA_MAX_SPARSE_TOKENS if self.max_sparse_tokens is None else self.max_sparse_tokens

    def sparse_forward(self, x: Tensor) -> Tensor:
        """The masked product through the sparse kernel (used up to ``max_sparse_tokens`` tokens)."""
        if torch.compiler.is_compiling():
            return sparse_linear(x, self.activation_threshold, self.weight_t, self.bias)  # one opaque graph node
        # Eager: call the kernel directly; the custom op's dispatch layers cost ~40 us per call.
        if x.device.type == "cuda":
            from pl_actsparse.kernels.cuda import sparse_linear_cuda

            return sparse_linear_cuda(x, self._threshold_for(x.dtype), self.weight_t, self.bias)
        return sparse_linear_cpu(x, self.activation_threshold, self.weight_t, self.bias)

    def _threshold_for(self, dtype: torch.dtype) -> float:
        # The threshold rounded to the input dtype, cached: reading a CUDA buffer costs a device sync.
        t = self.activation_threshold
        key = (dtype, id(t), t._version)
        cached = self.__dict__.get("_threshold_cache")
        if cached is None or cached[0] != key:
            cached = (key, _cpu.effective_threshold(t, dtype))
            self.__dict__["_threshold_cache"] = cached
        return cached[1]

    def dense_forward(self, x: Tensor) -> Tensor:
        """The masked product through a dense GEMM (used above ``max_sparse_tokens`` tokens)."""
        xm = x.masked_fill(x.abs() <= self.activation_threshold, 0)
        if self.weight is not None:
            return F.linear(xm, self.weight, self.bias)
        if xm.device.type != "cpu" or xm.dtype in (torch.float32, torch.float64):
            return F.linear(xm, self.weight_t.t(), self.bias)
        return _lowp_linear_t(xm, self.weight_t, self.bias)

    def extra_repr(self) -> str:
        thr = self.activation_threshold
        thr_s = "?" if thr.is_meta else f"{thr.item():.4g}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"threshold={thr_s}, max_sparse_tokens={self.max_sparse_tokens}, "
            f"backend={self.backend!r}, dense_weight={self.weight is not None}"
        )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Accept checkpoints of the original (dense-layout) layer: derive weight_t from weight.
        wkey, tkey = prefix + "weight", prefix + "weight_t"
        if wkey in state_dict and tkey not in state_dict:
            state_dict[tkey] = state_dict[wkey].t()
            if self.weight is None:
                del state_dict[wkey]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def _lowp_linear_t(xm: Tensor, weight_t: Tensor, bias: Optional[Tensor]) -> Tensor:
    # bf16/fp16 GEMMs against a transposed weight fall back to a scalar loop on CPUs without native bf16
    # (20-50x slower than F.linear), so convert W^T to fp32 a block of rows at a time and use sgemm.
    in_f, out_f = weight_t.shape
    lead = xm.shape[:-1]
    x2 = xm.reshape(-1, in_f).float()
    rows = max(16, _DENSE_CHUNK_BYTES // (4 * max(out_f, 1)))
    acc = bias.float().expand(x2.shape[0], out_f).clone() if bias is not None else x2.new_zeros(x2.shape[0], out_f)
    for i0 in range(0, in_f, rows):
        acc.addmm_(x2[:, i0 : i0 + rows], weight_t[i0 : i0 + rows].float())
    return acc.to(xm.dtype).reshape(*lead, out_f)


@dataclass(frozen=True)
class ExportedLayer:
    """One layer replaced by :func:`export_for_inference`."""

    name: str
    in_features: int
    out_features: int
    threshold: float
    max_sparse_tokens: int
    backend: str
    dtype: torch.dtype


def export_for_inference(
    model: nn.Module,
    *,
    max_sparse_tokens: Optional[int] = None,
    keep_dense_weight: bool = False,
) -> nn.Module:
    """Replace every sparsified ``nn.Linear`` in ``model`` (in place) by a :class:`SparseInferenceLinear`.

    Sparsified :class:`~pl_actsparse.core.int8.Int8WeightLinear` layers become
    :class:`~pl_actsparse.core.int8.Int8SparseInferenceLinear` instead, sharing their int8 buffers
    (``keep_dense_weight`` does not apply to them), so an int8 model stays int8.

    With the default backend this compiles the C++ kernel now (once per machine), not during the first
    decode step. Layers are swapped one at a time, so the extra memory peaks at one layer's ``W^T``; the
    original weights are released unless ``keep_dense_weight`` (they then serve the dense path) or other
    references hold them. Returns ``model``; :func:`exported_layers` lists what was replaced.

    Raises ``ValueError`` if ``model`` contains no sparsified layer.
    """
    # remove_duplicate=False: a module registered under two names is replaced under both (by one new layer).
    targets = [(name, m) for name, m in model.named_modules(remove_duplicate=False) if is_sparsified_linear(m)]
    if not targets:
        n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
        n_done = sum(type(m).__name__ in ("SparseInferenceLinear", "Int8SparseInferenceLinear") for m in model.modules())
        hint = f" ({n_done} layers are already exported)" if n_done else ""
        raise ValueError(
            f"export_for_inference: {type(model).__name__} has no sparsified layer: none of its {n_linear} "
            f"nn.Linear modules carries an {THRESHOLD_BUFFER!r} buffer{hint}. Sparsify and calibrate it first."
        )
    if any(name == "" for name, _ in targets):
        raise ValueError(
            "export_for_inference: the model itself is a sparsified nn.Linear and cannot be replaced in place; "
            "wrap it in a container (e.g. nn.Sequential) or use SparseInferenceLinear.from_linear"
        )
    from pl_actsparse.core.adapters import adapter_map

    adapted = [n for n in adapter_map(model.named_modules()).wrapper_of if n in {name for name, _ in targets}]
    if adapted:
        raise ValueError(
            f"export_for_inference: {len(adapted)} sparsified layer(s) are the base layers of peft adapters "
            f"({', '.join(adapted[:4])}{' ...' if len(adapted) > 4 else ''}); the exported kernel would drop the "
            "adapter branches' thresholding. Merge the adapters first: model = model.merge_and_unload()"
        )
    passthrough = sorted({name for name, m in targets if not _applies_threshold(m)})
    if passthrough:
        warnings.warn(
            f"export_for_inference: {len(passthrough)} sparsified layer(s) are not calibrated (pass-through) and "
            f"are exported with threshold -inf, i.e. without sparsity: {', '.join(passthrough[:8])}"
            + (" ..." if len(passthrough) > 8 else ""),
            UserWarning,
            stacklevel=2,
        )
    if any(m.weight.device.type == "cpu" for _, m in targets) and _cpu.get_backend() != "torch":
        _cpu.resolve_backend(build=True)  # compile now rather than inside the first forward
    from pl_actsparse.kernels.int8_cpu import resolve_int8_backend
    from pl_actsparse.core.int8 import Int8SparseInferenceLinear, Int8WeightLinear

    if any(isinstance(m, Int8WeightLinear) for _, m in targets) and _cpu.get_backend() != "torch":
        resolve_int8_backend(build=True)
    replaced: dict[int, nn.Module] = {}
    targets.reverse()
    while targets:  # pop, so that each original weight can be freed as soon as its layer is swapped
        name, old = targets.pop()
        new = replaced.get(id(old))
        if new is None:
            if isinstance(old, Int8WeightLinear):  # keep the int8 weight: the int8 kernel reads it directly
                new = Int8SparseInferenceLinear(old, max_sparse_tokens=max_sparse_tokens)
                if not _applies_threshold(old):
                    new.activation_threshold.fill_(-math.inf)
            else:
                new = SparseInferenceLinear.from_linear(
                    old, max_sparse_tokens=max_sparse_tokens, keep_dense_weight=keep_dense_weight
                )
            replaced[id(old)] = new
        _set_submodule(model, name, new)
        del old
    return model


def exported_layers(model: nn.Module) -> list[ExportedLayer]:
    """The exported layers of ``model`` (qualified names, sizes, settings), int8 ones included."""
    from pl_actsparse.core.int8 import Int8SparseInferenceLinear

    out = []
    for name, m in model.named_modules():
        if isinstance(m, Int8SparseInferenceLinear):
            dtype, limit = m.qweight_t.dtype, m.sparse_token_limit()
        elif isinstance(m, SparseInferenceLinear):
            dtype = m.weight_t.dtype
            limit = m.sparse_token_limit(dtype)
        else:
            continue
        out.append(
            ExportedLayer(
                name=name,
                in_features=m.in_features,
                out_features=m.out_features,
                threshold=float(m.activation_threshold.item()),
                max_sparse_tokens=limit,
                backend=m.backend,
                dtype=dtype,
            )
        )
    return out


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
