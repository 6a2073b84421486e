"""Achieved activation sparsity: the one counter of ``|x| <= threshold`` in the package.

Calibration guarantees the target on the calibration data only. On other text, and while fine-tuning moves
the weights, the fraction of inputs a layer zeroes drifts. :class:`ActivationSparsity` (a torchmetrics
``Metric``) measures it on any data: per layer and overall, element-weighted and weighted by weight bytes (what
a sparse kernel skips), the spread of per-token sparsity, and the thresholds in use. The thin views over it:

* :class:`SparsityCounter`: a context manager with plain-float results, for scripts and benchmarks;
* :class:`DecodeSparsity`: the same count on single-token (decode) calls of any layer carrying an
  ``activation_threshold`` buffer, e.g. exported inference layers (duck-typed: nothing from ``export`` is
  imported here).

**What counts.** Only real tokens: inside ``with token_mask(mask):`` (see :mod:`pl_actsparse.core.masking`)
the inputs at padded positions are left out; every call of a layer counts (a module called twice per forward
is counted twice). Thresholds may be scalar or per-channel (shape ``[in_features]``, broadcast on the last
axis).

**Exact and mergeable.** Every count is an integer state reduced with ``dist_reduce_fx="sum"``, so DDP ranks
merge exactly. The per-token spread is an integer histogram of the number of zeroed features per token (one
bin per possible count by default, so quantiles are exact), and quantiles are read from it
(:func:`quantile_from_histogram`): no statistic has a size limit (``torch.quantile`` refuses more than 2**24
values).
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from pl_actsparse.config import check_choice, positive_int_or_none
from pl_actsparse.core.layer import THRESHOLD_BUFFER, sparsified_layers, weight_nbytes
from pl_actsparse.core.masking import current_token_mask, select_tokens
from pl_actsparse.errors import InvalidOptionError, NotSparsifiedError, TokenMaskError
from pl_actsparse.measure.plot import plot_metric, quantile_key

__all__ = ["ActivationSparsity", "SparsityCounter", "DecodeSparsity", "quantile_from_histogram"]

_LOCK = threading.Lock()  # observers may run in several threads (calibration); module-level so metrics stay picklable


def quantile_from_histogram(values: Tensor, counts: Tensor, q: float, interpolation: str = "lower") -> float:
    """The ``q``-quantile of a multiset given as distinct ``values`` with integer ``counts``.

    Equal to ``torch.quantile(expanded, q, interpolation=...)`` of the expanded multiset, without expanding it
    and without its 2**24-element limit; histograms of several shards are merged by adding ``counts``.
    ``interpolation`` is ``"lower"`` or ``"linear"`` (torch's default). Returns NaN for an empty histogram.

    Raises:
        ValueError: ``q`` outside ``[0, 1]``, an unknown ``interpolation``, or shapes that differ.

    >>> quantile_from_histogram(torch.tensor([0.0, 0.5, 1.0]), torch.tensor([1, 2, 1]), 0.5)
    0.5
    """
    if not 0.0 <= q <= 1.0:
        raise InvalidOptionError(f"q must lie in [0, 1], got {q}")
    check_choice(interpolation, "interpolation", ("lower", "linear"))
    values = values.detach().reshape(-1).to("cpu", torch.float64)
    counts = counts.detach().reshape(-1).to("cpu", torch.int64)
    if values.shape != counts.shape:
        raise InvalidOptionError(f"values {tuple(values.shape)} and counts {tuple(counts.shape)} must have one count per value")
    keep = counts > 0
    values, counts = values[keep], counts[keep]
    total = int(counts.sum())
    if total == 0:
        return math.nan
    order = torch.argsort(values, stable=True)
    values, cum = values[order], torch.cumsum(counts[order], 0)
    pos = q * (total - 1)

    def kth(k: int) -> float:  # the k-th smallest element (0-based)
        return float(values[int(torch.searchsorted(cum, torch.tensor(k, dtype=cum.dtype), right=True))])

    lo = math.floor(pos)
    if interpolation == "lower" or lo == pos:
        return kth(lo)
    a, b = kth(lo), kth(lo + 1)
    return a + (b - a) * (pos - lo)


def _check_threshold(threshold: Tensor | float, d: int, layer: str, device: torch.device) -> Tensor:
    thr = torch.as_tensor(threshold, device=device).detach()
    if thr.numel() != 1 and tuple(thr.shape) != (d,):
        raise InvalidOptionError(
            f"layer {layer!r}: a threshold must be a scalar or per-channel with shape [{d}] (in_features), "
            f"got shape {tuple(thr.shape)}"
        )
    return thr if thr.numel() != 1 else thr.reshape(())


class ActivationSparsity(Metric):
    """Achieved sparsity of sparsified layers: the fraction of input elements with ``|x| <= threshold``.

    Feed it with :meth:`observe` (a context manager that counts every forward of a sparsified model) or call
    :meth:`update` yourself with a layer's *un-sparsified* input and its threshold. :meth:`compute` returns
    a flat ``dict`` of scalar tensors, ready for ``LightningModule.log_dict``:

    * ``sparsity``: element-weighted over all layers; ``weighted_sparsity``: weighted by each layer's weight
      bytes (the share of weight memory a sparse kernel need not read);
    * ``token_sparsity_p5`` / ``token_sparsity_p95``: quantiles of the per-token sparsity over all
      (token, layer) pairs (``quantiles`` changes them; "lower" interpolation, like
      ``torch.quantile(..., interpolation="lower")``);
    * per layer ``<name>/sparsity``, ``<name>/threshold`` (the largest threshold seen; for a per-channel
      threshold its mean, :func:`~pl_actsparse.core.layer.threshold_summary`), and
      ``<name>/token_sparsity_p5`` / ``_p95``. Layers never observed give NaN.

    Only real tokens count when a token mask is set (:func:`pl_actsparse.core.masking.token_mask`, or the
    ``token_mask`` argument of :meth:`update`).

    Args:
        layers: layer names, in model order.
        in_features: input width of each layer (the length of a token's input vector).
        weight_bytes: weight bytes of each layer, for ``weighted_sparsity`` (default: ``in_features``);
            :meth:`from_model` uses :func:`~pl_actsparse.core.layer.weight_nbytes` (stored bytes: int8 and
            torchao-quantized layers count what they store).
        token_bins: resolution of the per-token histogram. ``None`` (default): one bin per possible count of
            zeroed features, so per-token quantiles are exact at any width; an int ``b``: ``b + 1`` bins, exact
            for layers with ``in_features <= b`` (a lower bound within ``1 / b`` otherwise).
        quantiles: which per-token quantiles to report.

    Raises:
        ValueError: an argument above is malformed (named in the message).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from pl_actsparse import sparsify_activations, TargetScope
        >>> from pl_actsparse.measure.metric import ActivationSparsity
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> data = [torch.randn(64, 16) for _ in range(4)]
        >>> _ = sparsify_activations(net, data, {TargetScope(names=["0"]): 0.5}, calibration={"progress": False})
        >>> metric = ActivationSparsity.from_model(net)
        >>> with metric.observe(net):
        ...     for x in data:
        ...         _ = net(x)
        >>> result = metric.compute()
        >>> float(result["0/sparsity"])  # exact on the calibration data
        0.5
        >>> sorted(k for k in result if not k.startswith("0/"))
        ['sparsity', 'token_sparsity_p5', 'token_sparsity_p95', 'weighted_sparsity']
        >>> fig_, ax_ = metric.plot()  # per-layer bars with the p5-p95 spread of per-token sparsity
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    zeroed: Tensor
    elements: Tensor
    token_counts: Tensor
    threshold: Tensor

    def __init__(
        self,
        layers: Sequence[str],
        in_features: Sequence[int],
        weight_bytes: Sequence[int] | None = None,
        *,
        token_bins: int | None = None,
        quantiles: Sequence[float] = (0.05, 0.95),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        layers = [str(n) for n in layers]
        if not layers:
            raise InvalidOptionError("ActivationSparsity needs at least one layer name")
        if len(set(layers)) != len(layers):
            raise InvalidOptionError(f"layer names must be unique, got {layers}")
        in_features = [int(d) for d in in_features]
        if len(in_features) != len(layers) or any(d < 1 for d in in_features):
            raise InvalidOptionError(f"in_features must give one positive width per layer ({len(layers)}), got {in_features}")
        weights = [int(w) for w in (weight_bytes if weight_bytes is not None else in_features)]
        if len(weights) != len(layers) or any(w < 0 for w in weights):
            raise InvalidOptionError(f"weight_bytes must give one non-negative size per layer ({len(layers)}), got {weights}")
        token_bins = positive_int_or_none(token_bins, "token_bins")
        quantiles = tuple(float(q) for q in quantiles)
        if any(not 0.0 <= q <= 1.0 for q in quantiles):
            raise InvalidOptionError(f"quantiles must lie in [0, 1], got {quantiles}")
        self.layers = layers
        self.in_features = in_features
        self.weight_bytes = weights
        self.token_bins = token_bins
        self.quantiles = quantiles
        self._index = {n: i for i, n in enumerate(layers)}
        n = len(layers)
        bins = (max(in_features) if token_bins is None else token_bins) + 1
        self.add_state("zeroed", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("elements", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("token_counts", torch.zeros(n, bins, dtype=torch.long), dist_reduce_fx="sum")
        # identical on every rank by construction (calibration is synced); "max" also merges windows in
        # which a layer was recalibrated (then it is the largest threshold used)
        self.add_state("threshold", torch.full((n,), -math.inf), dist_reduce_fx="max")

    @classmethod
    def from_model(cls, model: nn.Module, **kwargs: Any) -> "ActivationSparsity":
        """A metric for every sparsified layer of ``model`` (names as in ``model.named_modules()``; weight bytes
        from :func:`~pl_actsparse.core.layer.weight_nbytes`).

        Raises:
            NotSparsifiedError: the model has no sparsified layer.
        """
        layers = list(sparsified_layers(model))
        if not layers:
            raise NotSparsifiedError("the model has no sparsified layer to track")
        return cls([n for n, _ in layers], [m.in_features for _, m in layers], [weight_nbytes(m) for _, m in layers], **kwargs)

    def update(  # type: ignore[override]
        self, layer: str | int, inputs: Tensor, threshold: Tensor | float, token_mask: Tensor | None = None
    ) -> None:
        """Count one batch of a layer's inputs (before zeroing) against its threshold.

        Args:
            layer: name or index of the layer.
            inputs: ``[..., in_features]``, any float dtype.
            threshold: a scalar, or per-channel with shape ``[in_features]`` (compared on the last axis).
            token_mask: bool ``[batch, seq]`` of real tokens (``inputs``' leading axes); default: the current
                :func:`~pl_actsparse.core.masking.token_mask`, else every element counts.

        Raises:
            ValueError: the last axis is not ``in_features`` or the threshold has another shape.
            TokenMaskError: no token axis of ``inputs`` matches the mask.
        """
        i = self._index[layer] if isinstance(layer, str) else int(layer)
        d, x = self.in_features[i], self._checked_inputs(i, inputs)
        thr = _check_threshold(threshold, d, self.layers[i], x.device)
        mask = token_mask if token_mask is not None else current_token_mask()
        x = select_tokens(x, mask, layer=self.layers[i])
        per_token = (x.abs() <= thr).sum(-1)
        hist = torch.bincount(self._bin_index(i, per_token), minlength=self.token_counts.shape[1])
        with _LOCK:
            self._add(i, per_token.sum(), x.numel(), hist, thr)

    def _checked_inputs(self, i: int, inputs: Tensor) -> Tensor:
        x, d = inputs.detach(), self.in_features[i]
        if x.dim() == 0 or x.shape[-1] != d:
            raise InvalidOptionError(f"layer {self.layers[i]!r} expects inputs with {d} features, got shape {tuple(x.shape)}")
        return x

    def _bin_index(self, i: int, per_token: Tensor) -> Tensor:
        return per_token if self.token_bins is None else per_token * self.token_bins // self.in_features[i]

    def _add(self, i: int, zeroed: Tensor, elements: int | Tensor, hist: Tensor, thr: Tensor) -> None:
        """Add one batch's counts of layer ``i`` to the states (eager: with the lock held)."""
        device = self.zeroed.device
        summary = thr.float().mean() if thr.dim() else thr.float()  # threshold_summary, kept on the device
        self.zeroed[i] += zeroed.to(device)
        self.elements[i] += elements if isinstance(elements, int) else elements.to(device)
        self.token_counts[i] += hist.to(device)
        self.threshold[i] = torch.maximum(self.threshold[i], summary.to(device, self.threshold.dtype))

    def _bin_values(self, i: int) -> Tensor:
        """The per-token sparsity each histogram bin of layer ``i`` stands for."""
        d, bins = self.in_features[i], self.token_counts.shape[1] - 1
        b = torch.arange(bins + 1, dtype=torch.float64)
        if self.token_bins is None:
            return b / d  # bins past d hold no count
        if d <= bins:
            return torch.ceil(b * d / bins) / d  # the unique k with floor(k * bins / d) == b, over d
        return b / bins

    def token_quantiles(self, q: Sequence[float] = (0.05, 0.95), layer: str | None = None, interpolation: str = "lower") -> list[float]:
        """Quantiles of per-token sparsity for one layer, or over all (token, layer) pairs when ``layer`` is None."""
        rows = list(range(len(self.layers))) if layer is None else [self._index[layer]]
        values, c = torch.cat([self._bin_values(i) for i in rows]), self.token_counts.cpu()[rows].reshape(-1)
        return [quantile_from_histogram(values, c, float(p), interpolation) for p in q]

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        """Flat dict of scalar float64 tensors (see the class docstring for the keys)."""
        zeroed = self.zeroed.double().cpu()
        elements = self.elements.double().cpu()
        seen = elements > 0
        nan = torch.tensor(math.nan, dtype=torch.float64)
        per_layer = torch.where(seen, zeroed / elements.clamp(min=1), nan)
        out: dict[str, Tensor] = {}
        out["sparsity"] = zeroed.sum() / elements.sum() if bool(seen.any()) else nan
        w = torch.tensor(self.weight_bytes, dtype=torch.float64)[seen]
        out["weighted_sparsity"] = (w * per_layer[seen]).sum() / w.sum() if float(w.sum()) > 0 else nan
        t64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
        for q, v in zip(self.quantiles, self.token_quantiles(self.quantiles)):
            out[f"token_sparsity_{quantile_key(q)}"] = t64(v)
        thresholds = self.threshold.double().cpu()
        for i, name in enumerate(self.layers):
            out[f"{name}/sparsity"] = per_layer[i]
            out[f"{name}/threshold"] = thresholds[i] if bool(seen[i]) else nan
            for q, v in zip(self.quantiles, self.token_quantiles(self.quantiles, name)):
                out[f"{name}/token_sparsity_{quantile_key(q)}"] = t64(v)
        return out

    @contextlib.contextmanager
    def observe(self, model: nn.Module) -> Iterator["ActivationSparsity"]:
        """Count every forward of ``model``'s sparsified layers while the context is open.

        Uses the layers' observer slots (no hooks): each call sees the layer's input before zeroing, its
        current threshold and the current token mask. Layer names must be ones this metric was built with.

        Raises:
            NotSparsifiedError: the model has no sparsified layer.
            InvalidOptionError: a sparsified layer is not tracked by this metric.
        """
        layers = dict(sparsified_layers(model))
        unknown = [n for n in layers if n not in self._index]
        if not layers:
            raise NotSparsifiedError("the model has no sparsified layer to observe")
        if unknown:
            raise InvalidOptionError(f"sparsified layers {unknown} are not tracked by this metric (it tracks {self.layers})")
        key = id(self)
        for name, module in layers.items():
            module._actsparse.observers[key] = self._observer(self._index[name])
        try:
            yield self
        finally:
            for module in layers.values():
                module._actsparse.observers.pop(key, None)
            self._finish_traced_updates()

    # -- observing inside torch.compile ------------------------------------------------------------------
    # The observers are built once per (metric, layer) and reused by every ``observe``: a compiled model guards
    # on the observer objects it traced, so new ones each step would recompile it each step. Inside a compiled
    # region an observer counts with :meth:`_count_traced`; :meth:`_finish_traced_updates` does the Python
    # bookkeeping when ``observe`` closes. Counts are the same integers as the eager path's.

    def _observer(self, index: int) -> "_MetricObserver":
        return self.__dict__.setdefault("_observer_cache", {}).setdefault(index, _MetricObserver(self, index))

    def _count_traced(self, i: int, inputs: Tensor, threshold: Tensor) -> None:
        """:meth:`update` without the lock and with a fixed-size histogram (``index_add_``): traceable. The
        token mask weighs tokens (0 or 1) instead of selecting them, so no shape depends on the data."""
        d, x = self.in_features[i], self._checked_inputs(i, inputs)
        thr = threshold.detach()
        per_token = (x.abs() <= thr).reshape(-1, d).sum(-1)
        mask = current_token_mask()
        if mask is None:
            weight = torch.ones_like(per_token)
        else:
            if mask.numel() != per_token.numel():
                raise TokenMaskError(
                    f"{self.layers[i]}: input of shape {tuple(x.shape)} has no token axes matching the token mask "
                    f"of shape {tuple(mask.shape)}"
                )
            weight = mask.reshape(-1).to(device=per_token.device, dtype=per_token.dtype)
        hist = torch.zeros(self.token_counts.shape[1], dtype=torch.long, device=per_token.device)
        hist.index_add_(0, self._bin_index(i, per_token), weight)
        self._add(i, (per_token * weight).sum(), weight.sum() * d, hist, thr)
        self.__dict__["_traced_updates"] = True

    def _finish_traced_updates(self) -> None:
        # counts added by compiled graphs bypassed torchmetrics' update wrapper: invalidate the cached result
        # and count an update, so ``update_called`` and ``compute`` see them
        if self.__dict__.pop("_traced_updates", False):
            self._computed = None
            self._update_count += 1

    def plot(self, val: Any = None, ax: Any = None) -> Any:
        """Per-layer achieved sparsity as bars with the p5-p95 per-token spread; a list of results plots the
        overall values over time (:func:`pl_actsparse.measure.plot.plot_metric`).

        Returns ``(figure, axes)`` like every torchmetrics ``plot``; needs matplotlib.
        """
        return plot_metric(self, self.compute() if val is None else val, ax)


class _MetricObserver:
    """One layer's observer of one :class:`ActivationSparsity` (stable identity, see ``_observer``)."""

    __slots__ = ("metric", "index")

    def __init__(self, metric: ActivationSparsity, index: int) -> None:
        self.metric = metric
        self.index = index

    def __call__(self, module: nn.Module, inputs: Tensor, _out: Tensor) -> None:
        if torch.compiler.is_compiling():
            self.metric._count_traced(self.index, inputs, module.activation_threshold)
        else:
            self.metric.update(self.index, inputs, module.activation_threshold)


class SparsityCounter:
    """Context manager counting zeroed inputs per sparsified layer, with plain-float results.

    A thin view over :class:`ActivationSparsity` (same counting, masks and per-channel thresholds): use it in
    scripts; use the metric in Lightning code.

    >>> import torch
    >>> from torch import nn
    >>> from pl_actsparse import sparsify_activations, TargetScope
    >>> from pl_actsparse.measure.metric import SparsityCounter
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(4, 4))
    >>> _ = sparsify_activations(net, [torch.randn(100, 4)], {TargetScope(names=["0"]): 0.5}, calibration={"progress": False})
    >>> with SparsityCounter(net) as counter:
    ...     _ = net(torch.randn(1000, 4))
    >>> round(counter.sparsity()["0"], 1)
    0.5

    Args:
        model: a model with sparsified layers.

    Raises:
        NotSparsifiedError: the model has no sparsified layer.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.metric = ActivationSparsity.from_model(model)  # raises NotSparsifiedError without sparsified layers
        self.layers = dict(sparsified_layers(model))

    def __enter__(self) -> "SparsityCounter":
        self._observing = self.metric.observe(self.model)
        self._observing.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._observing.__exit__(*exc)

    @property
    def zeroed(self) -> dict[str, int]:
        """Zeroed input elements per observed layer."""
        return {n: int(self.metric.zeroed[i]) for i, n in enumerate(self.metric.layers) if int(self.metric.elements[i])}

    @property
    def total(self) -> dict[str, int]:
        """Counted input elements (real tokens only) per observed layer."""
        return {n: int(self.metric.elements[i]) for i, n in enumerate(self.metric.layers) if int(self.metric.elements[i])}

    def sparsity(self) -> dict[str, float]:
        """Achieved sparsity per layer over everything observed so far (layers never called are left out)."""
        return {n: z / self.total[n] for n, z in self.zeroed.items()}

    def token_quantiles(self, q: tuple[float, ...] = (0.05, 0.95), interpolation: str = "linear") -> dict[str, list[float]]:
        """Spread of per-token sparsity per observed layer (``"linear"``, like ``torch.quantile``; exact from
        integer histograms, no size limit)."""
        return {n: self.metric.token_quantiles(q, n, interpolation) for n in self.zeroed}

    def __iter__(self) -> Iterator[tuple[str, float]]:
        return iter(self.sparsity().items())


class DecodeSparsity:
    """Counts ``|x| <= threshold`` on single-token calls (decode steps) of every layer carrying an
    ``activation_threshold`` buffer: exported inference layers, int8 ones, or sparsified training layers.

    Uses forward pre-hooks (exported layers have no observer slots), removed on exit; the count is an
    :class:`ActivationSparsity` (``.metric``). Layers exported without sparsity (threshold ``-inf``) count
    with no zeros. Calls with more than one token (prefill) are not counted.
    """

    def __init__(self, model: nn.Module) -> None:
        found = [(n, m) for n, m in model.named_modules()
                 if isinstance(m._buffers.get(THRESHOLD_BUFFER), Tensor) and hasattr(m, "in_features")]
        self.layers = [m for _, m in found]
        self.metric: ActivationSparsity | None = ActivationSparsity(
            [n for n, _ in found], [m.in_features for m in self.layers], [weight_nbytes(m) for m in self.layers]) if found else None
        self._index = {id(m): i for i, (_, m) in enumerate(found)}
        self._handles: list[Any] = []

    def _hook(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        if isinstance(x, Tensor) and x.dim() and x.numel() == x.shape[-1]:
            self.metric.update(self._index[id(module)], x, module._buffers[THRESHOLD_BUFFER])  # type: ignore[union-attr]

    def __enter__(self) -> "DecodeSparsity":
        self._handles = [m.register_forward_pre_hook(self._hook) for m in self.layers]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def zero(self) -> int:
        """Zeroed input elements counted so far."""
        return 0 if self.metric is None else int(self.metric.zeroed.sum())

    @property
    def total(self) -> int:
        """Input elements counted so far (single-token calls only)."""
        return 0 if self.metric is None else int(self.metric.elements.sum())

    @property
    def fraction(self) -> float | None:
        """Zeroed fraction of the counted inputs, ``None`` before any decode step."""
        return self.zero / self.total if self.total else None
