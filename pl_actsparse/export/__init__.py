"""Training layers -> kernel layers: :func:`export_for_inference` swaps each sparsified layer for one that holds
the weight in the sparse kernel's layout (:class:`SparseInferenceLinear`, :class:`Int8SparseInferenceLinear`)."""

from pl_actsparse.export.convert import ExportedLayer, export_for_inference, exported_layers
from pl_actsparse.export.int8_linear import Int8SparseInferenceLinear
from pl_actsparse.export.linear import (
    SparseInferenceLinear, default_max_sparse_tokens, is_sparsified_linear, sparse_inference_linear,
)

__all__ = [
    "ExportedLayer", "Int8SparseInferenceLinear", "SparseInferenceLinear", "default_max_sparse_tokens",
    "export_for_inference", "exported_layers", "is_sparsified_linear", "sparse_inference_linear",
]
