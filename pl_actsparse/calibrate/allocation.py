"""Per-layer levels under a byte budget: loss-increase curves from one backward pass, then the convex optimum.

**Curves** (:func:`fisher_curves`). Zeroing input element ``x_i`` of a layer changes the loss by about
``-x_i g_i + (x_i g_i)^2 / 2`` with ``g_i = dL/dx_i``; summed over the calibration data the first-order term
cancels near a trained optimum and the second is the empirical-Fisher (Optimal Brain Damage, LeCun et al.
1990) estimate. One forward and backward pass of the *dense* model (about 3 forward passes of cost) gives, per
layer, the histogram of ``|x|`` and of ``(x g)^2 / 2`` over the same bins, hence the estimated loss increase
``D_l(s)`` of every level ``s``: the summed score of the ``s`` fraction of smallest ``|x|``. Each layer is its
own unit (q/k/v read one tensor but get their own levels: the kernel skips columns per layer).

**Allocation** (:func:`allocate_levels`). Minimise ``sum_l D_l(s_l)`` subject to
``sum_l bytes_l s_l = budget * sum_l bytes_l``: each curve is replaced by its lower convex hull and hull
segments of all units are taken by increasing loss per byte until the budget is met, the last one in part
(the Lagrangian optimum of the convexified problem; it meets the budget exactly).

**Search** (:func:`search_levels`). The curves are second-order estimates at the dense point; at 40-60% the
real loss is far outside that regime. The optimum is recomputed for a few reweightings of the curves (an
exponent, and an exchange rate between sublayer kinds such as attention and MLP) and the one with the least
real next-token loss on the calibration data wins (one forward pass per candidate).

On stories260K with all seven projections this beats a TEAL-style greedy inside each block (see
``docs/allocation.md`` for the measured table and what each ingredient buys).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pl_actsparse.calibrate.histogram import COARSE_BINS, abs_keys, merge_coarse
from pl_actsparse.calibrate.distributed import Distributed
from pl_actsparse.calibrate.running import call_model, default_transform_fn, hooks_removed, logits_of, map_tensors, mask_of, model_device, to_device
from pl_actsparse.calibrate.sequential import input_gradients, sequential_input_gradients
from pl_actsparse.config import CalibrationConfig
from pl_actsparse.core.layer import linear_like_spec, weight_nbytes
from pl_actsparse.core.masking import attention_mask_of, resolve_mask_fn, select_tokens
from pl_actsparse.errors import EmptyDatasetError, InvalidOptionError, InvalidTargetError, NonFiniteActivationError

__all__ = ["fisher_curves", "gradient_scales", "allocate_levels", "lower_hull", "next_token_nll", "search_levels", "SEARCH_POWERS", "SEARCH_RATES", "SEARCH_FRACTION", "MAX_RATED_KINDS", "QUANTILE_SAMPLE"]

#: Levels at which the curves are read (the allocation interpolates between them).
GRID = tuple(i / 50 for i in range(48))  # 0 .. 0.94
#: Candidates of :func:`search_levels`: curve exponents ``p`` and log exchange rates ``a`` (every pair is scored).
SEARCH_POWERS = (1.0, 1.284, 1.649)  # exp(0), exp(0.25), exp(0.5)
SEARCH_RATES = (0.0, 0.7, 1.4)
#: :func:`search_levels` scores on every k-th calibration item, this fraction of them (at least one).
SEARCH_FRACTION = 0.5
#: At most this many sublayer kinds get a rate of their own in :func:`search_levels` (more share one).
MAX_RATED_KINDS = 2
#: At most this many elements of a layer input give :func:`search_levels` its quantile (a strided sample).
QUANTILE_SAMPLE = 1 << 14


def fisher_curves(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    items: Iterable[Any],
    loss_fn: Callable[[Any, Any], Any],
    config: CalibrationConfig,
) -> dict[str, list[tuple[float, float]]]:
    """``{layer name: [(level, estimated loss increase), ...]}`` at the levels of :data:`GRID`, from one forward
    and backward pass of ``model`` over ``items`` (the model should be dense: sparsified layers pass through
    under :func:`~pl_actsparse.core.layer.activation_sparsity_disabled`).

    ``loss_fn(output, batch, mask) -> (summed loss, count)``, ``batch`` the item itself (:func:`next_token_nll` by default,
    which reads the model inputs ``transform_fn(batch)``; any other result is an :class:`InvalidOptionError`). Only real
    tokens count (``config.token_mask``, as in calibration): padding never shifts a level's threshold.
    Parameters' ``.grad`` are not touched (gradients are taken with respect to the layer inputs only).

    With ``config.method == "sequential"`` the backward goes block by block in the memory of block-wise
    calibration (:func:`~pl_actsparse.calibrate.sequential.sequential_input_gradients`: the cached block inputs
    of one batch and one block's activations, not every block's; ``config.offload`` applies); the curves are
    the whole-model ones up to float rounding. A model that does not fit the scheme runs whole, with a warning.

    Statistics are summed over ``torch.distributed`` ranks (``config.sync_across_processes``), so every rank gets
    the same curves.

    Raises:
        EmptyDatasetError: ``items`` is empty (on every rank), or the loss gives no signal (every score 0, e.g. no
            real next-token prediction).
        NonFiniteActivationError: a layer's input (named), or the loss gradient at it, is not finite. (Call it outside
            inference mode, ``torch.inference_mode(False)``; inference-tensor batches are cloned.)
    """
    counts = {n: torch.zeros(COARSE_BINS, dtype=torch.float64) for n, _ in layers}
    scores = {n: torch.zeros(COARSE_BINS, dtype=torch.float64) for n, _ in layers}
    dtypes: dict[str, torch.dtype] = {}

    def add(got: list, mask: torch.Tensor | None) -> None:
        for name, x, g in got:  # real tokens only, as calibration counts them
            x = select_tokens(x, mask, layer=name)
            dtypes[name] = x.dtype
            keys = abs_keys(x).cpu()
            keys = (keys >> 16 if x.dtype == torch.float32 else keys).long()
            counts[name] += torch.bincount(keys, minlength=COARSE_BINS).double()
            if g is not None:
                s = (x.float() * select_tokens(g, mask, layer=name).float()).pow(2).reshape(-1).double().cpu() / 2
                scores[name] += torch.bincount(keys, weights=s, minlength=COARSE_BINS)

    dist = _gradient_pass(model, layers, items, loss_fn, config, add)
    summed = {name: merge_coarse(name, dtypes.get(name, torch.float32), c, dist)[1] for name, c in counts.items()}  # NaN/inf: an error
    curves = {}
    for name, c in summed.items():  # summed over ranks: every rank allocates the same levels
        cum_c, cum_s = c.cumsum(0), dist.sum_(scores[name]).cumsum(0)
        if not math.isfinite(float(cum_s[-1])):
            raise NonFiniteActivationError(f"the loss gradient at the input of layer {name!r} is not finite (NaN or inf): a non-finite loss")
        idx = torch.searchsorted(cum_c, torch.tensor([s * float(cum_c[-1]) for s in GRID], dtype=torch.float64))
        curves[name] = [(s, 0.0 if s == 0 else float(cum_s[min(int(i), COARSE_BINS - 1)])) for s, i in zip(GRID, idx)]
    if curves and not any(c[-1][1] > 0 for c in curves.values()):  # levels would follow layer order, not the loss
        raise EmptyDatasetError("the calibration data gave the allocation no loss signal (every layer's score is 0): no real "
                                "next-token prediction (sequences of one real token?) or a loss that does not depend on these layers")
    return curves


def _checked_loss(loss_fn: Callable[[Any, Any, Any], Any], device: Any) -> Callable[[Any, Any, Any, Any], tuple[torch.Tensor, Any]]:
    """``(output, model inputs, item, mask) -> loss_fn(output, the item on device, mask)``, the model inputs for
    :func:`next_token_nll` (a regression's targets are in the item, not in ``transform_fn(item)``), refusing any result
    but ``(summed loss: a 0-dim tensor, count: one number >= 0)`` with an :class:`InvalidOptionError` naming what came
    back (a scalar alone, or a per-sample loss vector, which would otherwise be read as its first element and a count)."""
    def call(output: Any, inputs: Any, item: Any, mask: Any) -> tuple[torch.Tensor, Any]:
        got = loss_fn(output, inputs if loss_fn is next_token_nll else to_device(item, device), mask)
        if (isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], torch.Tensor) and got[0].dim() == 0
                and isinstance(got[1], (int, float, torch.Tensor)) and torch.as_tensor(got[1]).numel() == 1 and float(got[1]) >= 0):
            return got
        kind = lambda v: f"Tensor{list(v.shape)}" if isinstance(v, torch.Tensor) else repr(v)[:40]  # noqa: E731
        raise InvalidOptionError(f"loss_fn must return (summed loss as a 0-dim tensor, count >= 0), got "
                                 f"{'(' + ', '.join(map(kind, got)) + ')' if isinstance(got, tuple) else kind(got)}")
    return call


def _gradient_pass(model: nn.Module, layers: Sequence[tuple[str, nn.Module]], items: Iterable[Any], loss_fn: Callable,
                   config: CalibrationConfig, add: Callable[[list, Any], None]) -> Distributed:
    """One forward and backward per item (block by block with the sequential method): ``add([(name, input, its
    gradient)], token mask)``; returns the ranks' :class:`Distributed` of ``config``. :class:`EmptyDatasetError` when
    no rank has an item."""
    transform = config.transform_fn or default_transform_fn
    mask_fn, device = resolve_mask_fn(config.token_mask), model_device(model)
    loss_fn, dist = _checked_loss(loss_fn, device), Distributed(config.sync_across_processes, device)
    items = [map_tensors(item, lambda t: t.clone() if t.is_inference() else t) for item in items]  # saved for backward
    if dist.count(len(items)) == 0:
        raise EmptyDatasetError("the calibration data is empty: it yielded no item")
    if config.method != "sequential" or not sequential_input_gradients(model, layers, items, loss_fn, config, add):
        for item in items:
            inputs = to_device(transform(item), device)
            mask = mask_of(mask_fn, item)
            add(input_gradients(layers, lambda: (loss_fn(call_model(model, inputs), inputs, item, mask)[0], None, []))[0], mask)
    return dist


_OTHER_MODELS = ": give the model's loss as calibration={'loss_fn': f}, f(output, inputs, mask) -> (summed loss, count)"


def next_token_nll(output: Any, inputs: Any, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Default loss of the allocation: summed next-token NLL of a causal LM and the number of predictions.

    ``inputs`` are token ids ``[B, T]`` (the model input; a dict's ``input_ids``, a tuple's first item),
    ``output`` logits ``[B, T, V]`` (or an object with ``.logits``, or a tuple whose first item is the logits).
    ``mask`` (bool ``[B, T]``, default: a dict input's ``attention_mask``) marks real tokens: a prediction
    counts only when its input and its target are both real, so padding (right or left) adds nothing.

    Raises:
        InvalidOptionError: the inputs are not token ids ``[B, T]`` or do not match the logits or the mask.
    """
    if isinstance(inputs, Mapping):
        mask = attention_mask_of(inputs) if mask is None else mask
        inputs = inputs.get("input_ids")
    elif isinstance(inputs, (tuple, list)):
        inputs = inputs[0]
    logits = logits_of(output)
    if not isinstance(inputs, torch.Tensor) or inputs.dtype not in (torch.int64, torch.int32) or inputs.dim() != 2:
        raise InvalidOptionError(
            f"the default loss is next-token NLL on token ids [B, T]; these inputs are not token ids{_OTHER_MODELS}")
    if logits.shape[:2] != inputs.shape:
        raise InvalidOptionError(f"logits {tuple(logits.shape)} do not match token ids {tuple(inputs.shape)}{_OTHER_MODELS}")
    y = inputs[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), y.flatten(), reduction="none")
    if mask is None:
        return losses.sum(), y.numel()
    if tuple(mask.shape) != tuple(inputs.shape):
        raise InvalidOptionError(f"token mask {tuple(mask.shape)} does not match token ids {tuple(inputs.shape)}")
    m = mask.to(inputs.device).bool()
    keep = (m[:, :-1] & m[:, 1:]).flatten()
    return losses[keep].sum(), int(keep.sum())


def gradient_scales(model: nn.Module, layers: Sequence[tuple[str, nn.Module]], items: Iterable[Any], config: CalibrationConfig,
                    loss_fn: Callable[[Any, Any, Any], Any] = next_token_nll) -> dict[str, torch.Tensor]:
    """Per input channel ``c_i = E[g_i^2] ** (1/4)`` (fp32 ``[in_features]`` per layer name), ``g = dL/dx`` over the real
    tokens of ``items``, from one forward and backward of the (dense) ``model``; summed over ranks.

    The expected loss increase of zeroing ``x_i`` is ``x_i^2 E[g_i^2] / 2`` (Optimal Brain Damage, as in
    :func:`fisher_curves`), so ``|x_i| * E[g_i^2] ** (1/2)`` orders inputs by it; the square root of that scale, halfway
    in log scale between ``|x|`` and that score, is what :func:`~pl_actsparse.tuning.weight_aware.sparsify_activations_weight_aware`
    uses for ``score="fisher"`` (measured on stories260K, ``docs/allocation.md``: the full scale loses at 60%).

    Raises:
        EmptyDatasetError: ``items`` is empty on every rank.
    """
    sums = {n: torch.zeros(linear_like_spec(m).in_features(m) + 1, dtype=torch.float64) for n, m in layers}  # type: ignore[union-attr]

    def add(got: list, mask: torch.Tensor | None) -> None:
        for name, _x, g in got:  # per channel: summed g^2, then the token count
            if g is not None:
                g = select_tokens(g, mask, layer=name).float().reshape(-1, g.shape[-1])
                sums[name] += torch.cat([g.pow(2).sum(0), g.new_tensor([g.shape[0]])]).double().cpu()

    dist = _gradient_pass(model, layers, items, loss_fn, config, add)
    return {n: (s[:-1] / s[-1].clamp(min=1)).pow(0.25).float() for n, s in ((n, dist.sum_(s)) for n, s in sums.items())}


def lower_hull(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Lower convex hull of ``(level, cost)`` points sorted by level."""
    hull: list[tuple[float, float]] = []
    for p in points:
        while len(hull) >= 2 and (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0]) >= (p[1] - hull[-2][1]) * (hull[-1][0] - hull[-2][0]):
            hull.pop()
        hull.append(p)
    return hull


def allocate_levels(curves: Mapping[Any, Sequence[tuple[float, float]]], unit_bytes: Mapping[Any, int], budget: float) -> dict[Any, float]:
    """Levels per unit meeting ``sum bytes * level = budget * sum bytes`` with the least convexified cost.

    Raises:
        InvalidTargetError: ``budget`` is outside what the curves cover.
    """
    hulls = {u: lower_hull(sorted(c)) for u, c in curves.items()}
    total = float(sum(unit_bytes[u] for u in hulls))
    lo = sum(unit_bytes[u] * h[0][0] for u, h in hulls.items()) / total
    hi = sum(unit_bytes[u] * h[-1][0] for u, h in hulls.items()) / total
    if not lo - 1e-9 <= budget <= hi + 1e-9:
        raise InvalidTargetError(f"budget {budget} is outside what the measured curves cover ({lo:.4f} to {hi:.4f})")
    levels = {u: h[0][0] for u, h in hulls.items()}
    need = budget * total - sum(unit_bytes[u] * s for u, s in levels.items())
    segments = sorted(((y2 - y1) / (unit_bytes[u] * (x2 - x1)), k, u, x1, x2)
                      for k, (u, h) in enumerate(hulls.items()) for (x1, y1), (x2, y2) in zip(h, h[1:]))
    for _, _, u, x1, x2 in segments:  # a unit's segments come in slope order (convex), so they chain
        if need <= 1e-12:
            break
        take = min(unit_bytes[u] * (x2 - x1), need)
        levels[u] = x1 + take / unit_bytes[u]
        need -= take
    return levels


def search_levels(
    model: nn.Module, layers: Sequence[tuple[str, nn.Module]], items: Sequence[Any], curves: Mapping[str, Sequence[tuple[float, float]]],
    budgets: Sequence[tuple[Sequence[str], float]], config: CalibrationConfig,
    loss_fn: Callable[[Any, Any, Any], Any] = next_token_nll, search: bool = True,
) -> tuple[dict[str, float], int]:
    """Levels meeting each ``(layer names, byte budget)`` of ``budgets``: :func:`allocate_levels` on ``curves``
    reweighted as the real loss prefers; returns ``(levels, candidates scored)``.

    The curves are second-order estimates at the dense point, far from the regime of 40-60% sparsity (on
    stories260K they undervalue attention against the MLP and the spread between layers). Each candidate
    reweights layer ``l``'s curve to ``exp(a) * D_l(s) ** p``: ``p`` from :data:`SEARCH_POWERS`, ``a`` from
    :data:`SEARCH_RATES` per sublayer kind (the layer's parent name without block indices, ``model.layers.self_attn``)
    other than the kind with the most weight bytes (``a = 0``), every combination; beyond
    :data:`MAX_RATED_KINDS` other kinds (peft's per-projection parents, BERT) they share one rate, so a search
    scores at most 27 candidates. The candidate with the least mean
    ``loss_fn`` over every k-th item (:data:`SEARCH_FRACTION` of ``items``) wins; each layer's input is zeroed
    below the quantile of its level over the batch's real tokens (a strided sample of at most
    :data:`QUANTILE_SAMPLE` elements; no calibration pass), one forward pass over those items per candidate.
    Losses are summed over ranks (``config.sync_across_processes``): every rank picks the same candidate.
    ``search=False``: the curves' own optimum, nothing scored.

    Raises:
        InvalidTargetError: a budget is outside what the curves cover.
    """
    transform = config.transform_fn or default_transform_fn
    mask_fn = resolve_mask_fn(config.token_mask)
    device = model_device(model)
    dist, loss_fn = Distributed(config.sync_across_processes, device), _checked_loss(loss_fn, device)
    subset = list(items)[:: max(1, round(1 / SEARCH_FRACTION))]
    nbytes = {n: weight_nbytes(m) for n, m in layers}
    kind = {n: ".".join(p for p in n.split(".")[:-1] if not p.isdigit()) for n in nbytes}  # block indices dropped
    weight = {k: sum(b for n, b in nbytes.items() if kind[n] == k) for k in sorted(set(kind.values()))}
    others = [k for k in weight if k != max(weight, key=weight.__getitem__)]
    groups = [[k] for k in others] if len(others) <= MAX_RATED_KINDS else [others]  # candidates stay <= 3 x 3^2

    def levels_of(power: float, rates: Sequence[float]) -> dict[str, float]:
        scale = {k: math.exp(r) for g, r in zip(groups, rates) for k in g}
        levels: dict[str, float] = {}
        for names, budget in budgets:
            levels.update(allocate_levels({n: [(s, scale.get(kind[n], 1.0) * d**power) for s, d in curves[n]] for n in names},
                                          {n: nbytes[n] for n in names}, budget))
        return levels

    def loss_of(levels: Mapping[str, float]) -> float:
        mask = None

        def cut(args: tuple, name: str) -> tuple:
            x, s = args[0], levels[name]
            real = select_tokens(x, mask, layer=name).abs().flatten() if s > 0 else x.new_zeros(0)
            real = real[:: max(1, real.numel() // QUANTILE_SAMPLE)].float()
            if real.numel() == 0:  # level 0, or no real token in this batch
                return args
            t = real.kthvalue(max(1, min(real.numel(), round(s * real.numel())))).values.to(x.dtype)
            return (x * (x.abs() > t), *args[1:])

        handles = [m.register_forward_pre_hook(lambda _m, a, n=n: cut(a, n)) for n, m in layers]
        total = torch.zeros(2, dtype=torch.float64)
        with hooks_removed(handles), torch.no_grad():
            for item in subset:
                inputs = to_device(transform(item), device)
                mask = mask_of(mask_fn, item)
                loss, count = loss_fn(call_model(model, inputs), inputs, item, mask)
                total += torch.tensor([float(loss), float(count)], dtype=torch.float64)
        total = dist.sum_(total)
        return float(total[0] / total[1].clamp(min=1))

    if not search:
        return levels_of(1.0, [0.0] * len(groups)), 0
    candidates = [levels_of(p, rates) for p in SEARCH_POWERS for rates in itertools.product(SEARCH_RATES, repeat=len(groups))]
    scores = [loss_of(c) for c in candidates]
    return candidates[scores.index(min(scores))], len(candidates)
