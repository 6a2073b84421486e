"""Perplexity: the one number every sparsity setting is judged by.

Kept model-agnostic (anything mapping ``input_ids -> logits``) so the dense model,
a sparsified copy and a Hugging Face model are measured by exactly the same code.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["perplexity", "mean_nll"]


def _iter_pairs(data: Any) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(data, "pair") and hasattr(data, "__len__"):
        return (data.pair(i) for i in range(len(data)))
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.shape[1] < 2:
            raise ValueError(
                f"a tensor of windows must be [N, L+1] with L >= 1 (input = [:, :-1], target = [:, 1:]), "
                f"got shape {tuple(data.shape)}"
            )
        return ((w[:-1], w[1:]) for w in data)
    return iter(data)


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"model output of type {type(output).__name__} has no logits")


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def mean_nll(
    model: nn.Module,
    dataset_or_windows: Any,
    batch_size: int = 16,
    device: torch.device | str | None = None,
) -> tuple[float, int]:
    """``(mean NLL in nats, number of predicted tokens)``; the token count guards against silent truncation.

    Accepts a :class:`~pl_actsparse.demos.tinystories.TokenWindows` (anything with ``pair(i)``
    and ``len``), a ``LongTensor[N, L+1]`` of whole windows, or an iterable of
    ``(input, target)`` pairs. Consecutive windows of equal length are batched.
    Log-probabilities are computed in fp32 whatever the model dtype.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    total = 0.0
    count = 0

    def run(inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> None:
        nonlocal total, count
        x = torch.stack(list(inputs)).to(device)
        y = torch.stack(list(targets)).to(device)
        logits = _logits(model(x))
        if logits.shape[:2] != y.shape:
            raise ValueError(f"logits of shape {tuple(logits.shape)} do not match targets {tuple(y.shape)}")
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        total += float(loss)
        count += y.numel()

    try:
        with torch.no_grad():
            xs: list[torch.Tensor] = []
            ys: list[torch.Tensor] = []
            for item in _iter_pairs(dataset_or_windows):
                if isinstance(item, torch.Tensor) or len(item) != 2:
                    raise TypeError(
                        "expected (input, target) pairs; got bare windows. Pass a TokenWindows, "
                        "a LongTensor[N, L+1] of whole windows, or an iterable of (input, target) pairs"
                    )
                x, y = item
                if x.shape != y.shape or x.dim() != 1:
                    raise ValueError(f"input {tuple(x.shape)} and target {tuple(y.shape)} must be equal 1-D")
                if xs and (len(xs) == batch_size or x.shape != xs[0].shape):
                    run(xs, ys)
                    xs, ys = [], []
                xs.append(x)
                ys.append(y)
            if xs:
                run(xs, ys)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no tokens to evaluate: the dataset has no windows")
    return total / count, count


def perplexity(
    model: nn.Module,
    dataset_or_windows: Any,
    batch_size: int = 16,
    device: torch.device | str | None = None,
) -> float:
    """``exp`` of the mean next-token NLL over every predicted token (see :func:`mean_nll`).

    Runs under ``torch.no_grad()`` in eval mode and restores the model's previous
    train/eval mode afterwards.
    """
    return math.exp(mean_nll(model, dataset_or_windows, batch_size=batch_size, device=device)[0])
