"""Checks and snapshots that let a call into the model change nothing it should not.

* :func:`state_dict_fit`: which keys of a state dict can be copied into a model, decided *before* anything is
  copied (``load_state_dict`` copies key by key and stops at the first failure, leaving the earlier tensors
  overwritten): missing and unexpected keys, shape mismatches, tensor kinds (a torchao-quantized weight into a
  float parameter or back), and parameters accelerate offloaded to ``meta`` (where a copy is a silent no-op).
* :func:`preserved_modes`: every module's ``training`` flag is put back as it was after a block that switches
  modes (calibration runs the model in ``eval()``), on success and on error, so a frozen submodule in
  ``eval()`` inside a training model stays frozen.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from pl_actsparse.core.layer import STATE_KEY, THRESHOLD_BUFFER

__all__ = ["state_dict_fit", "preserved_modes"]

def _plain(t: Any) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter)


def _few(xs: list[str]) -> str:
    return f"{xs[:10]}{' ...' if len(xs) > 10 else ''}"


def state_dict_fit(model: nn.Module, sd: Mapping[str, Any], sparsified: Iterable[str], *, weights_loaded: bool = False,
                   may_miss: Iterable[str] = ()) -> tuple[dict[str, Any], list[str]]:
    """``(loadable, problems)``: the entries of ``sd`` that can be copied into ``model`` as it will be once the
    layers ``sparsified`` carry sparsifiers (their thresholds may have any shape), and one sentence per kind of
    misfit (empty when everything fits), without changing the model. ``weights_loaded``: only the sparsity
    entries are loaded (the weights are in place, e.g. loaded by HF ``from_pretrained``); ``may_miss``: keys
    whose absence is reported elsewhere.
    """
    own = model.state_dict(keep_vars=True)
    sparse_keys = {f"{n}.{k}" if n else k for n in sparsified for k in (THRESHOLD_BUFFER, STATE_KEY)}
    expected = sparse_keys if weights_loaded else set(own) | sparse_keys
    loadable, unexpected, shape, quantized, offloaded = {}, [], [], [], []
    for key, value in sd.items():
        target = own.get(key)
        if key not in expected:
            if not weights_loaded:
                unexpected.append(key)
        elif key in sparse_keys or not isinstance(target, torch.Tensor) or not isinstance(value, torch.Tensor):
            loadable[key] = value
        elif _plain(target) != _plain(value):
            quantized.append(key)
        elif target.device.type == "meta" and value.device.type != "meta":
            offloaded.append(key)
        elif tuple(target.shape) != tuple(value.shape):
            shape.append(f"{key}: {tuple(value.shape)} in the state dict, {tuple(target.shape)} in the model")
        else:
            loadable[key] = value
    real = lambda t: isinstance(t, torch.Tensor) and t.device.type != "meta"  # noqa: E731
    ptrs = {own[k].data_ptr() for k in loadable if real(own.get(k))}  # a weight tied to a loaded one is loaded
    skip = set(sd) | set(may_miss)
    missing = [k for k in [*own, *sorted(sparse_keys - set(own))] if k in expected and k not in skip
               and not (real(own.get(k)) and own[k].data_ptr() in ptrs)]
    problems = [f"missing keys {_few(missing)}"] if missing else []
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    int8 = sorted({k.rpartition(".")[0] for k in unexpected if k.endswith(".qweight")})
    if int8:
        problems.append(
            f"{_few(int8)} are int8 layers in the state dict (qweight, scale, zero_point) but float layers here: "
            "quantize the model the same way first (pl_actsparse.core.int8.quantize_weights_int8 with the same "
            "scope), then load")
    if shape:
        problems.append(f"shape mismatches {_few(shape)}")
    if quantized:
        layers = sorted({k.rpartition(".")[0] for k in quantized})
        problems.append(
            f"{_few(layers)} hold quantized (tensor-subclass, e.g. torchao) weights in "
            + ("the state dict but float weights here: quantize the model the same way first "
               "(torchao.quantization.quantize_ with the same config and filter), then load"
               if any(not _plain(sd[k]) for k in quantized) else
               "the model but float weights in the state dict: load into a float model, then quantize"))
    if offloaded:
        problems.append(
            f"{_few(offloaded)} are offloaded by accelerate (on 'meta' in the model; a copy into them does "
            "nothing): load the weights with from_pretrained(..., device_map=...) or before dispatching the model")
    return loadable, problems


@contextlib.contextmanager
def preserved_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule's ``training`` flag back as it was on exit (normal or by an exception)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
