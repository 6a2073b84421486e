"""Thresholds from calibration data: :func:`calibrate` over a registry of methods (as llm-compressor's
``CalibrationPipeline``): ``"lockstep"`` (:mod:`~pl_actsparse.calibrate.lockstep`, every batch in flight) and
``"sequential"`` (:mod:`~pl_actsparse.calibrate.sequential`, block by block, the same thresholds bit for bit);
``"auto"`` chooses. Every method finalizes each threshold with :func:`~pl_actsparse.calibrate.histogram.finalize`.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Iterable, Sequence

from torch import nn

from pl_actsparse.calibrate.blocks import find_block_list
from pl_actsparse.calibrate.histogram import LayerStatistics
from pl_actsparse.calibrate.lockstep import calibrate_layers
from pl_actsparse.calibrate.running import forward_is_not_reentrant
from pl_actsparse.calibrate.sequential import calibrate_sequential
from pl_actsparse.config import CalibrationConfig

__all__ = ["calibrate", "chosen_method", "METHODS", "AUTO_SEQUENTIAL_MIN_PARAM_BYTES"]

log = logging.getLogger(__name__)

#: ``method="auto"`` chooses the sequential method when the model has a block list and its parameters take at
#: least this many bytes (256 MiB: about 128M bf16 parameters); smaller models use lockstep, whose activation
#: memory is small next to what the machine holds anyway.
AUTO_SEQUENTIAL_MIN_PARAM_BYTES = 256 << 20

#: The calibration methods by name: ``fn(model, layers, items, config) -> {layer name: LayerStatistics}``.
METHODS: dict[str, Callable[..., dict[str, LayerStatistics]]] = {
    "lockstep": calibrate_layers,
    "sequential": calibrate_sequential,
}


def chosen_method(model: nn.Module, layers: Sequence[tuple[str, nn.Module]], config: CalibrationConfig) -> str:
    """``config.method``, with ``"auto"`` resolved: ``"sequential"`` for a model with a block list whose parameters
    take at least :data:`AUTO_SEQUENTIAL_MIN_PARAM_BYTES`, or of any size when ``config.offload`` is set, else
    ``"lockstep"`` (with a warning when ``offload`` is set: lockstep keeps no cache)."""
    if config.method != "auto":
        return config.method
    name, why = find_block_list(model, [n for n, _ in layers])
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    if name is None or forward_is_not_reentrant(model) or (size < AUTO_SEQUENTIAL_MIN_PARAM_BYTES and config.offload is None):
        log.debug("method='auto' chose lockstep (%s; %d parameter bytes)", why, size)
        if config.offload is not None:
            warnings.warn(f"calibration offload={config.offload!r} is not used: method='auto' chose lockstep, which "
                          f"keeps no cache ({why if name is None else 'the forward is not reentrant'})", stacklevel=3)
        return "lockstep"
    log.info("method='auto' chose sequential: %s", why)
    return "sequential"


def calibrate(model: nn.Module, layers: Sequence[tuple[str, nn.Module]], items: Iterable[Any],
              config: CalibrationConfig) -> dict[str, LayerStatistics]:
    """Calibrate ``layers`` (``(name, sparsified module)`` pairs of ``model``) on ``items`` by ``config.method``
    (:func:`chosen_method`). Every layer ends in sparsifying mode with its threshold; returns the statistics per
    layer name.

    Raises:
        EmptyDatasetError, LayerNotCalledError, NonFiniteActivationError, TokenMaskError,
        CalibrationConvergenceError: see :func:`~pl_actsparse.calibrate.lockstep.calibrate_layers`.
    """
    return METHODS[chosen_method(model, layers, config)](model, layers, items, config)
