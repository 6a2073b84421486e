"""Layers that read the same tensor (``gate_proj``/``up_proj``, ``q/k/v_proj``).

Detected on the module graph by running the model once: a forward pre-hook on every ``nn.Linear`` records
which tensor object it received. Layers that received the very same tensor (same object, storage, version
and view) on every call form a group. No names or model classes are assumed, so it works for the llama2.c
model, Hugging Face Llama and anything else.

Why it matters:

* With equal targets, group members get **one threshold**: calibration histograms the shared tensor once and
  every member gets the same threshold, so one mask serves the whole group (a fused kernel reads the mask
  once). :func:`check_shared_thresholds` verifies it on a calibrated model.
* Weight-aware scoring (:mod:`pl_actsparse.tuning.weight_aware`, ``share_groups``) gives a group one scale, so
  its members keep one threshold vector and one mask.
* The report (:mod:`pl_actsparse.measure.report`) shows the groups.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from pl_actsparse.calibrate.running import call_model, default_transform_fn, hooks_removed, model_device, to_device
from pl_actsparse.core.layer import is_linear_like
from pl_actsparse.core.module_state import preserved_modes
from pl_actsparse.errors import UnsupportedModuleError

__all__ = ["find_shared_input_groups", "check_shared_thresholds"]


def find_shared_input_groups(
    model: nn.Module,
    example_input: Any,
    layers: Iterable[str] | None = None,
    *,
    transform_fn: Callable[[Any], Any] | None = None,
    include_singletons: bool = False,
) -> list[list[str]]:
    """Groups of ``nn.Linear`` (and Linear-like, e.g. GPT-2 ``Conv1D``) layers (qualified names, model order) that read one and the same tensor.

    ``example_input`` is one calibration item (passed like calibration items: ``transform_fn``, then a dict
    as keyword arguments, a tuple or list as positional arguments). ``layers`` limits the search (default:
    every ``nn.Linear``). Only groups of two or more are returned unless ``include_singletons``; a layer
    called several times belongs to a group only if it shared its input with the same layers on every call.
    Sparsified layers are fine (their inputs are recorded before thresholding). The model is not changed.

    >>> import torch
    >>> from torch import nn
    >>> class MLP(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.gate, self.up, self.down = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4)
    ...     def forward(self, x):
    ...         return self.down(torch.relu(self.gate(x)) * self.up(x))
    >>> find_shared_input_groups(MLP(), torch.randn(2, 4))
    [['gate', 'up']]
    """
    named = [(n, m) for n, m in model.named_modules() if is_linear_like(m)]
    if layers is not None:
        wanted = set(layers)
        unknown = wanted - {n for n, _ in named}
        if unknown:
            raise UnsupportedModuleError(f"not nn.Linear (or registered Linear-like) layers of the model: {sorted(unknown)}")
        named = [(n, m) for n, m in named if n in wanted]
    order = {n: i for i, (n, _) in enumerate(named)}
    calls: dict[str, list[tuple]] = {n: [] for n, _ in named}
    keep_alive: list[torch.Tensor] = []  # holding the tensors keeps their ids from being reused

    def record(name: str, args: tuple) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor):
            keep_alive.append(x)
            calls[name].append((id(x), x.data_ptr(), x._version, tuple(x.shape), x.stride(), x.dtype))

    handles = [m.register_forward_pre_hook(lambda _m, args, n=n: record(n, args)) for n, m in named]
    transform = transform_fn or default_transform_fn
    try:
        with hooks_removed(handles), preserved_modes(model), torch.no_grad():
            model.eval()
            call_model(model, to_device(transform(example_input), model_device(model)))
    finally:
        keep_alive.clear()

    by_key: dict[tuple, list[str]] = {}
    for n, keys in calls.items():
        for k in keys:
            by_key.setdefault(k, []).append(n)
    # a layer's partners are the layers that shared *every* one of its calls (itself included)
    partners = {n: frozenset.intersection(*(frozenset(by_key[k]) for k in keys)) for n, keys in calls.items() if keys}
    groups: list[list[str]] = []
    seen: set[str] = set()
    for n, _ in named:
        if n in seen or n not in partners:
            continue
        members = sorted((m for m in partners[n] if partners.get(m) == partners[n]), key=order.__getitem__)  # n among them
        seen.update(members)
        if len(members) > 1 or include_singletons:
            groups.append(members)
    return groups


def check_shared_thresholds(
    model: nn.Module, groups: Sequence[Sequence[str]], statistics: Mapping[str, Any] | None = None
) -> list[str]:
    """Problems with shared groups on a calibrated model (empty list: none).

    Members of a group with equal targets must have equal thresholds, and (given ``statistics`` from
    :func:`~pl_actsparse.calibrate_activation_sparsity`) identical histograms.
    """
    modules = dict(model.named_modules())
    problems = []
    for g in groups:
        targets = {n: modules[n]._actsparse.target for n in g if hasattr(modules[n], "_actsparse")}
        for target in dict.fromkeys(targets.values()):  # the sparsified members of each target
            names = [n for n, t in targets.items() if t == target]
            ref = modules[names[0]].activation_threshold
            for n in names[1:]:
                if not torch.equal(modules[n].activation_threshold, ref):
                    problems.append(f"{n} and {names[0]} share their input and target {target} but not their threshold")
                if statistics is not None and n in statistics and names[0] in statistics:
                    if not torch.equal(statistics[n].coarse, statistics[names[0]].coarse):
                        problems.append(f"{n} and {names[0]} share their input but not their statistics")
    return problems
