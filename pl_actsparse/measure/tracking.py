"""Measuring achieved sparsity on any data, without touching the forward pass's results.

Calibration guarantees the target on the calibration data; on other text the achieved sparsity drifts
(distribution shift). :class:`SparsityCounter` measures it: it observes every sparsified layer's input and
counts the elements with ``|x| <= threshold``. Counts stay on the device (no synchronisation per call).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from pl_actsparse.errors import NotSparsifiedError
from pl_actsparse.core.layer import sparsified_layers

__all__ = ["SparsityCounter"]


class SparsityCounter:
    """Context manager counting zeroed inputs per sparsified layer.

    >>> import torch
    >>> from torch import nn
    >>> from pl_actsparse import sparsify_activations, TargetScope
    >>> from pl_actsparse.measure.tracking import SparsityCounter
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(4, 4))
    >>> _ = sparsify_activations(net, [torch.randn(100, 4)], {TargetScope(names=["0"]): 0.5}, progress=False)
    >>> with SparsityCounter(net) as counter:
    ...     _ = net(torch.randn(1000, 4))
    >>> round(counter.sparsity()["0"], 1)
    0.5
    """

    def __init__(self, model: nn.Module, per_token: bool = False) -> None:
        self.layers = dict(sparsified_layers(model))
        if not self.layers:
            raise NotSparsifiedError("the model has no sparsified layer to count")
        self.per_token = per_token
        self.zeroed: dict[str, torch.Tensor] = {}
        self.total: dict[str, int] = {}
        self.token_fractions: dict[str, list[torch.Tensor]] = {}
        self._names = {id(m): n for n, m in self.layers.items()}

    def _observe(self, module: nn.Module, x: torch.Tensor, _out: torch.Tensor) -> None:
        name = self._names[id(module)]
        mask = x.detach().abs() <= module.activation_threshold
        count = mask.sum()
        if name in self.zeroed:
            self.zeroed[name] += count
        else:
            self.zeroed[name] = count
        self.total[name] = self.total.get(name, 0) + x.numel()
        if self.per_token:
            self.token_fractions.setdefault(name, []).append(mask.reshape(-1, x.shape[-1]).float().mean(-1).cpu())

    def __enter__(self) -> "SparsityCounter":
        for m in self.layers.values():
            m._actsparse.observers[id(self)] = self._observe
        return self

    def __exit__(self, *exc: object) -> None:
        for m in self.layers.values():
            m._actsparse.observers.pop(id(self), None)

    def sparsity(self) -> dict[str, float]:
        """Achieved sparsity per layer over everything observed so far."""
        return {n: float(self.zeroed[n]) / self.total[n] for n in self.layers if self.total.get(n)}

    def token_quantiles(self, q: tuple[float, ...] = (0.05, 0.95)) -> dict[str, list[float]]:
        """Spread of per-token sparsity (needs ``per_token=True``)."""
        out = {}
        for n, parts in self.token_fractions.items():
            values = torch.cat(parts)
            out[n] = torch.quantile(values, torch.tensor(q)).tolist()
        return out

    def __iter__(self) -> Iterator[tuple[str, float]]:
        return iter(self.sparsity().items())
