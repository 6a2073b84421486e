"""Achieved activation sparsity as a torchmetrics ``Metric``.

Calibration guarantees the target on the calibration data only. On other text, and while fine-tuning moves
the weights, the fraction of inputs a layer zeroes drifts. :class:`ActivationSparsity` measures it on any
data: per layer and overall, element-weighted and weighted by weight bytes (what a sparse kernel skips), the
spread of per-token sparsity, and the thresholds in use.

Every count is an integer state reduced with ``dist_reduce_fx="sum"``, so DDP ranks merge exactly; the
per-token spread is an integer histogram too (exact for layers with at most ``token_bins`` input features).
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from pl_actsparse.errors import NotSparsifiedError
from pl_actsparse.core.layer import sparsified_layers

__all__ = ["ActivationSparsity"]

_LOCK = threading.Lock()  # observers may run in several threads (calibration); module-level so metrics stay picklable


def _quantile_key(q: float) -> str:
    return f"p{100 * q:g}".replace(".", "_")


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
    * per layer ``<name>/sparsity``, ``<name>/threshold`` (the largest threshold seen), and
      ``<name>/token_sparsity_p5`` / ``_p95``. Layers never observed give NaN.

    Args:
        layers: layer names, in model order.
        in_features: input width of each layer (the length of a token's input vector).
        weight_bytes: weight bytes of each layer, for ``weighted_sparsity`` (default: ``in_features``).
        token_bins: resolution of the per-token histogram; exact for layers with ``in_features <= token_bins``.
        quantiles: which per-token quantiles to report.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from pl_actsparse import sparsify_activations, TargetScope
        >>> from pl_actsparse.measure.metric import ActivationSparsity
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> data = [torch.randn(64, 16) for _ in range(4)]
        >>> _ = sparsify_activations(net, data, {TargetScope(names=["0"]): 0.5}, progress=False)
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
        token_bins: int = 1024,
        quantiles: Sequence[float] = (0.05, 0.95),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        layers = [str(n) for n in layers]
        if not layers:
            raise ValueError("ActivationSparsity needs at least one layer name")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layer names must be unique, got {layers}")
        in_features = [int(d) for d in in_features]
        if len(in_features) != len(layers) or any(d < 1 for d in in_features):
            raise ValueError(f"in_features must give one positive width per layer ({len(layers)}), got {in_features}")
        weights = [int(w) for w in (weight_bytes if weight_bytes is not None else in_features)]
        if len(weights) != len(layers) or any(w < 0 for w in weights):
            raise ValueError(f"weight_bytes must give one non-negative size per layer ({len(layers)}), got {weights}")
        if isinstance(token_bins, bool) or not isinstance(token_bins, int) or token_bins < 1:
            raise ValueError(f"token_bins must be a positive int, got {token_bins!r}")
        quantiles = tuple(float(q) for q in quantiles)
        if any(not 0.0 <= q <= 1.0 for q in quantiles):
            raise ValueError(f"quantiles must lie in [0, 1], got {quantiles}")
        self.layers = layers
        self.in_features = in_features
        self.weight_bytes = weights
        self.token_bins = token_bins
        self.quantiles = quantiles
        self._index = {n: i for i, n in enumerate(layers)}
        n = len(layers)
        self.add_state("zeroed", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("elements", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("token_counts", torch.zeros(n, token_bins + 1, dtype=torch.long), dist_reduce_fx="sum")
        # identical on every rank by construction (calibration is synced); "max" also merges windows in
        # which a layer was recalibrated (then it is the largest threshold used)
        self.add_state("threshold", torch.full((n,), -math.inf), dist_reduce_fx="max")

    @classmethod
    def from_model(cls, model: nn.Module, **kwargs: Any) -> "ActivationSparsity":
        """A metric for every sparsified layer of ``model`` (names as in ``model.named_modules()``)."""
        layers = list(sparsified_layers(model))
        if not layers:
            raise NotSparsifiedError("the model has no sparsified layer to track")
        return cls(
            [n for n, _ in layers],
            [m.in_features for _, m in layers],
            [m.weight.numel() * m.weight.element_size() for _, m in layers],
            **kwargs,
        )

    def update(self, layer: str | int, inputs: Tensor, threshold: Tensor | float) -> None:  # type: ignore[override]
        """Count one batch of a layer's inputs (before zeroing) against its threshold."""
        i = self._index[layer] if isinstance(layer, str) else int(layer)
        d = self.in_features[i]
        x = inputs.detach()
        if x.shape[-1] != d:
            raise ValueError(f"layer {self.layers[i]!r} expects inputs with {d} features, got shape {tuple(x.shape)}")
        thr = torch.as_tensor(threshold, device=x.device).detach()
        per_token = (x.abs() <= thr).reshape(-1, d).sum(-1)
        hist = torch.bincount(per_token * self.token_bins // d, minlength=self.token_bins + 1)
        device = self.zeroed.device
        with _LOCK:
            self.zeroed[i] += per_token.sum().to(device)
            self.elements[i] += x.numel()
            self.token_counts[i] += hist.to(device)
            self.threshold[i] = torch.maximum(self.threshold[i], thr.to(device, self.threshold.dtype))

    def _bin_values(self, i: int) -> Tensor:
        """The per-token sparsity each histogram bin stands for (exact when ``in_features <= token_bins``)."""
        d, bins = self.in_features[i], self.token_bins
        b = torch.arange(bins + 1, dtype=torch.float64)
        if d <= bins:
            return torch.ceil(b * d / bins) / d  # the unique k with floor(k * bins / d) == b, over d
        return b / bins

    def _quantiles(self, values: Tensor, counts: Tensor) -> list[Tensor]:
        order = torch.argsort(values, stable=True)
        values, counts = values[order], counts[order].cpu()
        total = int(counts.sum())
        if total == 0:
            return [torch.tensor(math.nan, dtype=torch.float64) for _ in self.quantiles]
        cum = torch.cumsum(counts, 0)
        out = []
        for q in self.quantiles:
            j = math.floor(q * (total - 1))
            out.append(values[int(torch.searchsorted(cum, torch.tensor(j), right=True))])
        return out

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        """Flat dict of scalar float64 tensors (see the class docstring for the keys)."""
        zeroed = self.zeroed.double().cpu()
        elements = self.elements.double().cpu()
        counts = self.token_counts.cpu()
        seen = elements > 0
        per_layer = torch.where(seen, zeroed / elements.clamp(min=1), torch.tensor(math.nan, dtype=torch.float64))
        nan = torch.tensor(math.nan, dtype=torch.float64)
        out: dict[str, Tensor] = {}
        out["sparsity"] = zeroed.sum() / elements.sum() if bool(seen.any()) else nan
        w = torch.tensor(self.weight_bytes, dtype=torch.float64)[seen]
        out["weighted_sparsity"] = (w * per_layer[seen]).sum() / w.sum() if float(w.sum()) > 0 else nan
        all_values = torch.cat([self._bin_values(i) for i in range(len(self.layers))])
        for q, v in zip(self.quantiles, self._quantiles(all_values, counts.reshape(-1))):
            out[f"token_sparsity_{_quantile_key(q)}"] = v
        thresholds = self.threshold.double().cpu()
        for i, name in enumerate(self.layers):
            out[f"{name}/sparsity"] = per_layer[i]
            out[f"{name}/threshold"] = thresholds[i] if bool(seen[i]) else nan
            for q, v in zip(self.quantiles, self._quantiles(self._bin_values(i), counts[i])):
                out[f"{name}/token_sparsity_{_quantile_key(q)}"] = v
        return out

    @contextlib.contextmanager
    def observe(self, model: nn.Module) -> Iterator["ActivationSparsity"]:
        """Count every forward of ``model``'s sparsified layers while the context is open.

        Uses the layers' observer slots (no hooks): each call sees the layer's input before zeroing and its
        current threshold. Layer names must be ones this metric was built with.
        """
        layers = dict(sparsified_layers(model))
        unknown = [n for n in layers if n not in self._index]
        if not layers:
            raise NotSparsifiedError("the model has no sparsified layer to observe")
        if unknown:
            raise ValueError(f"sparsified layers {unknown} are not tracked by this metric (it tracks {self.layers})")
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
    # region (``torch.compiler.is_compiling()``) an observer counts with traceable ops only (no lock, no
    # ``bincount``, whose output size depends on the data, no Python counter): the graph adds its counts to the
    # state tensors in place, and :meth:`_finish_traced_updates` does the Python bookkeeping when ``observe``
    # closes. Counts are the same integers as the eager path's.

    def _observer(self, index: int) -> "_MetricObserver":
        cache = self.__dict__.setdefault("_observer_cache", {})
        if index not in cache:
            cache[index] = _MetricObserver(self, index)
        return cache[index]

    def _count_traced(self, i: int, inputs: Tensor, threshold: Tensor) -> None:
        """:meth:`update` without the lock and with a fixed-size histogram (``index_add_``): traceable."""
        d = self.in_features[i]
        x = inputs.detach()
        if x.shape[-1] != d:
            raise ValueError(f"layer {self.layers[i]!r} expects inputs with {d} features, got shape {tuple(x.shape)}")
        thr = threshold.detach()
        per_token = (x.abs() <= thr).reshape(-1, d).sum(-1)
        hist = torch.zeros(self.token_bins + 1, dtype=torch.long, device=per_token.device)
        hist.index_add_(0, per_token * self.token_bins // d, torch.ones_like(per_token))
        device = self.zeroed.device
        self.zeroed[i] += per_token.sum().to(device)
        self.elements[i] += per_token.new_tensor(x.numel()).to(device)
        self.token_counts[i] += hist.to(device)
        self.threshold[i] = torch.maximum(self.threshold[i], thr.to(device, self.threshold.dtype).max())
        self.__dict__["_traced_updates"] = True

    def _finish_traced_updates(self) -> None:
        # counts added by compiled graphs bypassed torchmetrics' update wrapper: invalidate the cached result
        # and count an update, so ``update_called`` and ``compute`` see them
        if self.__dict__.pop("_traced_updates", False):
            self._computed = None
            self._update_count += 1

    def plot(self, val: Any = None, ax: Any = None) -> Any:
        """Per-layer achieved sparsity as bars with the p5-p95 per-token spread; a list of results plots the
        overall values over time.

        Returns ``(figure, axes)`` like every torchmetrics ``plot``; needs matplotlib.
        """
        if val is None:
            val = self.compute()
        if isinstance(val, Sequence) and not isinstance(val, dict):
            from torchmetrics.utilities.plot import plot_single_or_multi_val

            keys = ("sparsity", "weighted_sparsity")
            return plot_single_or_multi_val(
                [{k: v[k] for k in keys} for v in val],
                ax=ax,
                lower_bound=self.plot_lower_bound,
                upper_bound=self.plot_upper_bound,
                name="achieved sparsity",
            )
        try:
            import matplotlib.pyplot as plt
        except ImportError as exc:  # pragma: no cover - matplotlib is a dev/plot extra
            raise ModuleNotFoundError("ActivationSparsity.plot needs matplotlib: pip install 'pl-actsparse[plot]'") from exc
        lo_key, hi_key = (f"token_sparsity_{_quantile_key(q)}" for q in (self.quantiles[0], self.quantiles[-1]))
        s = [float(val[f"{n}/sparsity"]) for n in self.layers]
        lo = [float(val[f"{n}/{lo_key}"]) for n in self.layers]
        hi = [float(val[f"{n}/{hi_key}"]) for n in self.layers]
        fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(s)), 3.5)) if ax is None else (None, ax)
        xs = list(range(len(s)))
        err = [[max(0.0, a - b) for a, b in zip(s, lo)], [max(0.0, b - a) for a, b in zip(s, hi)]]
        ax.bar(xs, s, yerr=err, capsize=3, color="tab:blue", alpha=0.8, label=f"achieved ({lo_key}-{hi_key} per token)")
        ax.axhline(float(val["sparsity"]), color="k", linestyle="--", linewidth=1, label="overall")
        ax.set_xticks(xs)
        ax.set_xticklabels(self.layers, rotation=90, fontsize=7)
        ax.set_ylim(self.plot_lower_bound, self.plot_upper_bound)
        ax.set_ylabel("achieved sparsity")
        ax.legend(loc="upper right", fontsize=7)
        if fig is not None:
            fig.tight_layout()
        return fig, ax


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
