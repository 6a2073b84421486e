"""Objectives: perplexity (the one number every sparsity setting is judged by) and the calibration loss the
allocation minimises.

Kept model-agnostic (anything mapping ``input_ids -> logits``) so the dense model,
a sparsified copy and a Hugging Face model are measured by exactly the same code. Padded batches: only real
tokens count (a prediction counts when both its input and its target token are real).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pl_actsparse.calibrate.allocation import next_token_nll
from pl_actsparse.calibrate.running import call_model, default_transform_fn, logits_of, mask_of, model_device, to_device
from pl_actsparse.core.masking import MaskFn, resolve_mask_fn, token_mask
from pl_actsparse.core.module_state import preserved_modes
from pl_actsparse.errors import EmptyDatasetError, InvalidOptionError

__all__ = ["perplexity", "mean_nll", "CalibrationLoss"]


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


def mean_nll(
    model: nn.Module, dataset_or_windows: Any, batch_size: int = 16, device: torch.device | str | None = None,
) -> tuple[float, int]:
    """``(mean NLL in nats, number of predicted tokens)``; the token count guards against silent truncation.

    Accepts a :class:`~pl_actsparse.demos.tinystories.TokenWindows` (anything with ``pair(i)``
    and ``len``), a ``LongTensor[N, L+1]`` of whole windows, or an iterable of
    ``(input, target)`` pairs. Consecutive windows of equal length are batched.
    Log-probabilities are computed in fp32 whatever the model dtype.
    """
    if batch_size < 1:
        raise InvalidOptionError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else (model_device(model) or torch.device("cpu"))
    total = 0.0
    count = 0

    def run(inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> None:
        nonlocal total, count
        x = torch.stack(list(inputs)).to(device)
        y = torch.stack(list(targets)).to(device)
        logits = logits_of(model(x))
        if logits.shape[:2] != y.shape:
            raise ValueError(f"logits of shape {tuple(logits.shape)} do not match targets {tuple(y.shape)}")
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        total += float(loss)
        count += y.numel()

    with preserved_modes(model), torch.no_grad():
        model.eval()
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
    if count == 0:
        raise EmptyDatasetError("no tokens to evaluate: the dataset has no windows")
    return total / count, count


def perplexity(
    model: nn.Module, dataset_or_windows: Any, batch_size: int = 16, device: torch.device | str | None = None,
) -> float:
    """``exp`` of the mean next-token NLL over every predicted token (see :func:`mean_nll`).

    Runs under ``torch.no_grad()`` in eval mode and restores the model's previous
    train/eval mode afterwards.
    """
    return math.exp(mean_nll(model, dataset_or_windows, batch_size=batch_size, device=device)[0])


class CalibrationLoss:
    """Mean loss of a model over fixed batches (eval mode, no grad); counts its passes in ``passes``.

    ``loss_fn(output, item) -> scalar`` (mean over the batches) or, by default, :func:`next_token_nll` (mean
    over real predicted tokens). Each forward runs inside ``token_mask(mask_fn(item))`` so sparsity observers
    count real tokens only (``token_mask="auto"``: a dict batch's ``attention_mask``).
    """

    def __init__(
        self, model: nn.Module, data: Sequence[Any], loss_fn: Callable[[Any, Any], torch.Tensor] | None,
        transform_fn: Callable[[Any], Any] | None, token_mask: str | MaskFn | None = "auto",
    ) -> None:
        self.model = model
        self.data = data
        self.loss_fn = loss_fn
        self.transform = transform_fn or default_transform_fn
        self.mask_fn = resolve_mask_fn(token_mask)
        self.device = model_device(model)
        self.passes = 0

    def __call__(self) -> float:
        total = 0.0
        count = 0
        with preserved_modes(self.model), torch.no_grad():
            self.model.eval()
            for item in self.data:
                inputs = to_device(self.transform(item), self.device)
                mask = mask_of(self.mask_fn, item)
                with token_mask(mask):
                    out = call_model(self.model, inputs)
                if self.loss_fn is None:
                    s, n = next_token_nll(out, inputs, mask)
                    total += float(s)
                    count += n
                else:
                    total += float(self.loss_fn(out, to_device(item, self.device)))
                    count += 1
        self.passes += 1
        return total / max(count, 1)

