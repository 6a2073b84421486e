"""Exact thresholds from histograms of float bit patterns, and the one rule that finalizes a layer's threshold.

``|x|`` of a float, read as an unsigned integer, sorts like the float, so a histogram over bit patterns is an
exact order statistic: bf16/fp16 use all 2**15 non-negative patterns; fp32 the top 16 bits, then the low 16 bits
inside the one bin that holds the order statistic. Integer counts merge across DDP ranks by summing. The stored
coarse histogram also gives thresholds for other targets with no pass over data (:func:`threshold_for_target`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from pl_actsparse.core.recipe import validate_target
from pl_actsparse.errors import NonFiniteActivationError, UnsupportedModuleError

if TYPE_CHECKING:
    from pl_actsparse.calibrate.distributed import Distributed

__all__ = [
    "COARSE_BINS", "FINE_BINS", "INT_VIEW", "LayerStatistics", "abs_keys", "coarse_histogram", "fine_histogram",
    "bits_to_float", "check_input_dtype", "fine_bin", "threshold_from_histogram", "summed_fine", "merge_coarse", "finalize",
    "threshold_for_target",
]

COARSE_BINS = 1 << 15  # non-negative bit patterns of a 16-bit float, or the top 16 bits of a float32
FINE_BINS = 1 << 16  # low 16 bits of a float32
#: The integer dtype each supported float dtype is read as.
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
_NONFINITE_KEY = {torch.float32: 0x7F80, torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


def check_input_dtype(name: str, x: torch.Tensor) -> None:
    """Raise ``TypeError`` naming layer ``name`` when its input ``x`` is not float32, bfloat16 or float16 (and see :func:`check_data`)."""
    check_data(f"layer {name!r}", x)
    if x.dtype not in INT_VIEW:
        raise TypeError(f"layer {name!r} received a {x.dtype} input; calibration supports float32, bfloat16 and float16")


def check_data(what: str, x: torch.Tensor) -> None:
    """Raise :class:`UnsupportedModuleError` naming ``what`` when ``x`` is on ``meta`` (a model built without weights)."""
    if x.is_meta:
        raise UnsupportedModuleError(f"{what} received a meta tensor: the model has no weights (built under accelerate's "
                                     "init_empty_weights or on device='meta'); load them first (from_pretrained, load_state_dict(assign=True))")


def abs_keys(x: torch.Tensor) -> torch.Tensor:
    """Bit patterns of ``|x|`` as non-negative integers (ordered like ``|x|``)."""
    if x.dtype not in INT_VIEW:
        raise TypeError(f"calibration supports float32, bfloat16 and float16 inputs, got {x.dtype}")
    bits = x.detach().reshape(-1).view(INT_VIEW[x.dtype])
    return bits & (0x7FFFFFFF if x.dtype == torch.float32 else 0x7FFF)


def coarse_histogram(x: torch.Tensor) -> torch.Tensor:
    """Mergeable first-level statistic of one input tensor (int64 counts, on the tensor's device)."""
    keys = abs_keys(x)
    if x.dtype == torch.float32:
        keys = keys >> 16
    return torch.bincount(keys, minlength=COARSE_BINS)


def fine_histogram(x: torch.Tensor, coarse_bin: int) -> torch.Tensor:
    """Low-16-bit counts of the float32 elements that fall in one coarse bin."""
    keys = abs_keys(x)
    inside = keys[(keys >> 16) == coarse_bin]
    return torch.bincount(inside & 0xFFFF, minlength=FINE_BINS)


def bits_to_float(bits: int, dtype: torch.dtype) -> float:
    """The float of ``dtype`` whose bit pattern is ``bits``."""
    return float(torch.tensor([bits], dtype=INT_VIEW[dtype]).view(dtype).float().item())


@dataclass
class LayerStatistics:
    """The calibration result of one layer, kept so reports and sweeps need no second pass.

    ``coarse`` counts the real-token input elements (padding excluded by the token mask) of *every* call of
    the layer during calibration; ``zeroed`` of them satisfy ``|x| <= threshold`` with all layers sparsified.
    """

    name: str
    target: float
    dtype: torch.dtype
    coarse: torch.Tensor  # int64 [COARSE_BINS] on CPU, summed over all batches (and ranks)
    threshold: float = -math.inf
    zeroed: int = 0
    calls: int = 1  # most calls of the layer in one forward pass; the statistic covers all of them
    rounds: int = 1  # calibration passes needed (more than one only for layers called several times)

    @property
    def elements(self) -> int:
        return int(self.coarse.sum())

    @property
    def achieved(self) -> float:
        """Fraction of calibration elements with ``|x| <= threshold``, all layers sparsified together."""
        n = self.elements
        return self.zeroed / n if n else 0.0


def _choose(counts_le: torch.Tensor, target_count: float) -> int:
    """Index of the candidate count closest to the target; ties go to fewer zeroed elements (argmin's first minimum)."""
    return int(torch.argmin((counts_le.double() - target_count).abs()))


def _first_bin_reaching(cum: torch.Tensor, want: float) -> int:
    return int(torch.searchsorted(cum, torch.tensor(math.ceil(want), dtype=cum.dtype)))


def fine_bin(coarse: torch.Tensor, target: float) -> int | None:
    """The coarse bin whose fine histogram :func:`threshold_from_histogram` asks for (float32 inputs), or
    ``None`` when it asks for none (target 0 or 1, no element)."""
    coarse = coarse.to("cpu", torch.int64)
    n = int(coarse.sum())
    if target <= 0.0 or target >= 1.0 or n == 0:
        return None
    return _first_bin_reaching(torch.cumsum(coarse, 0), target * n)


def threshold_from_histogram(
    coarse: torch.Tensor,
    target: float,
    dtype: torch.dtype,
    fine_fn: Callable[[int], torch.Tensor] | None = None,
) -> tuple[float, int]:
    """Threshold whose zeroed count is the achievable count closest to ``target * N``.

    Returns ``(threshold, zeroed_count)``. Target 0 gives ``-inf`` (nothing zeroed, not even exact zeros);
    target 1 gives ``+inf`` (everything zeroed, also on unseen data). With ties (many equal values) the exact
    target may be unreachable; the closest reachable fraction is chosen, rounding towards less zeroing.
    For float32, ``fine_fn(bin)`` must return the summed fine histogram of that coarse bin.
    """
    coarse = coarse.to("cpu", torch.int64)
    n = int(coarse.sum())
    if target <= 0.0 or n == 0:
        return -math.inf, 0
    if target >= 1.0:
        return math.inf, n
    want = target * n
    cum = torch.cumsum(coarse, 0)
    if dtype != torch.float32:
        keys = torch.nonzero(coarse).flatten()
        candidates = torch.cat([torch.zeros(1, dtype=torch.int64), cum[keys]])
        i = _choose(candidates, want)
        if i == 0:
            return -math.inf, 0
        return bits_to_float(int(keys[i - 1]), dtype), int(candidates[i])
    # float32: the optimum is either "everything below bin b" or a value inside bin b, where b is the
    # first coarse bin whose cumulative count reaches the target.
    b = _first_bin_reaching(cum, want)
    below = int(cum[b - 1]) if b > 0 else 0
    if fine_fn is None:
        raise TypeError("threshold_from_histogram: float32 statistics need fine_fn (the fine histogram of a bin)")
    fine = fine_fn(b).to("cpu")
    low = torch.nonzero(fine).flatten()
    candidates = torch.cat([torch.tensor([below], dtype=fine.dtype), below + torch.cumsum(fine, 0)[low]])
    i = _choose(candidates, want)
    if i == 0:
        if below == 0:
            return -math.inf, 0
        # any value in [max of earlier bins, min of bin b) zeroes the same elements: use the bin's lower edge - 1 ulp
        return bits_to_float((b << 16) - 1, dtype), below
    return bits_to_float((b << 16) | int(low[i - 1]), dtype), int(round(float(candidates[i])))


def summed_fine(selected: Sequence[torch.Tensor], device: torch.device | None) -> Callable[[int], torch.Tensor]:
    """``local_fine`` for :func:`finalize`: the fine counts of a bin summed over the tensors ``selected`` (on ``device``)."""

    def fine(b: int) -> torch.Tensor:
        local = torch.zeros(FINE_BINS, dtype=torch.int64, device=device)
        for sel in selected:
            local += fine_histogram(sel, b).to(local.device)
        return local

    return fine


def merge_coarse(name: str, dtype: torch.dtype | None, local: torch.Tensor | None, dist: "Distributed") -> tuple[torch.dtype, torch.Tensor]:
    """The dtype all ranks agree on and the coarse histogram summed over ranks (on CPU) of layer ``name``.

    ``dtype``/``local`` are ``None`` on a rank that saw no input of the layer.

    Raises:
        NonFiniteActivationError: some input element was NaN or infinite.
    """
    dtype = dist.agreed_dtype(dtype)
    coarse = dist.sum_(local if local is not None else torch.zeros(COARSE_BINS, dtype=torch.int64)).to("cpu")
    bad = int(coarse[_NONFINITE_KEY[dtype] :].sum())
    if bad:
        raise NonFiniteActivationError(
            f"layer {name!r} received {bad} non-finite input value(s) (NaN or inf) during calibration; "
            "a threshold needs finite activations: check the model and the calibration data"
        )
    return dtype, coarse


def finalize(
    name: str,
    target: float,
    dtype: torch.dtype,
    coarse: torch.Tensor,
    local_fine: Callable[[int], torch.Tensor | None],
    dist: "Distributed",
    *,
    carried: torch.Tensor | None = None,
    calls: int = 1,
) -> LayerStatistics:
    """The threshold of one layer from its merged coarse histogram (:func:`merge_coarse`): the one finalization
    rule of every calibration method. Nothing is written into the layer.

    ``local_fine(bin)`` gives this rank's fine counts of a coarse bin (``None``: none seen); they are summed over
    ranks. ``carried`` (streaming lockstep) is the coarse histogram of earlier groups, whose elements are gone:
    in the fine histogram they are spread evenly over the bin's sub-bins.
    """

    def fine(b: int) -> torch.Tensor:
        local = local_fine(b)
        local = dist.sum_((torch.zeros(FINE_BINS, dtype=torch.int64) if local is None else local).to(torch.int64)).to("cpu")
        if carried is None or not int(carried[b]):
            return local
        return local.double() + float(carried[b]) / FINE_BINS

    total = coarse if carried is None else coarse + carried
    threshold, zeroed = threshold_from_histogram(total, target, dtype, fine)
    return LayerStatistics(name, target, dtype, total, threshold, zeroed, calls=calls)


def threshold_for_target(stats: LayerStatistics, target: float) -> float:
    """Threshold zeroing a fraction ``target`` of the inputs ``stats`` describes, with no pass over data.

    Exact for bf16/fp16 statistics (identical to what calibration chooses on the same inputs); for fp32,
    linearly interpolated inside the 2**-7-wide (relative) bin that holds the order statistic.
    Target 0 gives ``-inf`` and 1 gives ``+inf``, as in calibration.

    >>> import torch
    >>> from pl_actsparse.calibrate.histogram import LayerStatistics, coarse_histogram
    >>> x = torch.randn(10000, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    >>> st = LayerStatistics("l", 0.5, torch.bfloat16, coarse_histogram(x))  # as measured at target 0.5
    >>> t = threshold_for_target(st, 0.3)
    >>> round(float((x.abs() <= t).float().mean()), 2)
    0.3
    """
    target = validate_target(target, repr(stats.name))
    coarse = stats.coarse.to("cpu", torch.int64)
    n = int(coarse.sum())
    if stats.dtype != torch.float32 or n == 0 or not 0.0 < target < 1.0:  # exact, or -inf / +inf as calibration gives
        return threshold_from_histogram(coarse, target, stats.dtype)[0]
    want = target * n
    cum = torch.cumsum(coarse, 0)
    b = min(_first_bin_reaching(cum, want), coarse.numel() - 1)
    below = int(cum[b - 1]) if b > 0 else 0
    count = int(coarse[b])
    lo, hi = bits_to_float(b << 16, torch.float32), bits_to_float((b + 1) << 16, torch.float32)
    if count == 0 or want <= below:
        return bits_to_float((b << 16) - 1, torch.float32) if b > 0 else -math.inf
    # Values in the bin are assumed spread uniformly over [lo, hi); the exact one is within the bin.
    frac = min(max((want - below) / count, 0.0), 1.0)
    return lo + frac * (hi - lo)
