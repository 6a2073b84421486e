"""Adapter-aware sparsification: peft LoRA (and DoRA) wrappers around a sparsified Linear.

``peft.get_peft_model(model, LoraConfig(target_modules=["up_proj"]))`` replaces each ``up_proj`` Linear by a
wrapper (``peft.tuners.lora.Linear``) that computes ``base_layer(x) + lora_B(lora_A(dropout(x))) * scaling``
(DoRA adds a magnitude term, also computed from ``x``). Sparsifying only ``up_proj.base_layer`` thresholds
the base path while the adapter branches still see the dense ``x``: after ``merge_and_unload()`` the merged
layer computes ``(W + s B A) threshold(x)``, which is not what was trained. Sparsifying ``lora_A`` too
thresholds the same ``x`` twice with unrelated thresholds.

Here a scope entry that selects the wrapper (``.*up_proj``), its base layer (``.*up_proj\\.base_layer``) or
the wrapper's whole subtree (``.*up_proj.*``) means one thing: *the input of the adapted projection*.

* The threshold (buffer, target, calibration state) is installed on the base layer, an ``nn.Linear``, as for
  any layer: its state-dict key is ``...up_proj.base_layer.activation_threshold``, and after
  ``merge_and_unload()`` the base layer, now holding the merged weight, *is* the plain sparsified Linear at
  ``...up_proj``, whose outputs equal the trained model's.
* A forward pre-hook on the wrapper (:class:`AdapterInputHook`) runs the base layer's
  :meth:`~pl_actsparse.core.layer.ActivationSparsifierMixin.activation_input` on the wrapper's input (once:
  calibration, thresholding and observers see the raw input) and passes the thresholded input to the wrapper,
  so the base layer and every adapter branch receive it. It tells the base layer (by a keyword peft forwards
  to ``base_layer``) not to threshold again.
* ``lora_A``/``lora_B`` (and the other adapter submodules) are never sparsified on their own: a pattern or
  type that reaches them lists them as skipped, and an exact name of one raises ``UnsupportedModuleError``.

peft stays optional: it is never imported here. A model can hold peft layers only if peft was imported, so
the detection looks peft up in ``sys.modules``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Iterable

from torch import nn

from pl_actsparse.core.layer import ADAPTER_INPUT_KWARG, is_linear_like, is_sparsified

__all__ = [
    "AdapterMap", "Selection", "AdapterInputHook", "adapter_map", "is_adapter_wrapper", "adapter_base_layer",
    "sync_adapter_hooks",
]

# Wrapper classes whose forward passes its input unchanged to ``base_layer`` and to every adapter branch, and
# whose merge folds the adapters into ``base_layer.weight`` linearly in that input: thresholding the wrapper's
# input is then exactly "sparsifying the adapted projection", before and after merging.
_SUPPORTED_MODULE_PREFIXES = ("peft.tuners.lora.",)


def _tuner_layer_class() -> type | None:
    module = sys.modules.get("peft.tuners.tuners_utils")
    return getattr(module, "BaseTunerLayer", None)


def is_adapter_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is a peft tuner layer (a wrapper with a ``base_layer``)."""
    cls = _tuner_layer_class()
    return cls is not None and isinstance(module, cls) and isinstance(getattr(module, "base_layer", None), nn.Module)


def adapter_base_layer(wrapper: nn.Module) -> nn.Module:
    """The innermost ``base_layer`` of a (possibly nested) adapter wrapper."""
    base = wrapper
    while isinstance(getattr(base, "base_layer", None), nn.Module):
        base = base.base_layer
    return base


def _supported(wrapper: nn.Module) -> bool:
    cls = type(wrapper)
    return (
        cls.__module__.startswith(_SUPPORTED_MODULE_PREFIXES)
        and hasattr(wrapper, "lora_A")
        and is_linear_like(adapter_base_layer(wrapper))
    )


@dataclass(frozen=True)
class Selection:
    """What a module name a scope selected stands for: ``layer``, the module whose input is sparsified (an
    adapter wrapper stands for its base layer), or ``None`` with ``skipped`` (why it is no layer of its own, when
    reached by a pattern or type) or ``refused`` (why selecting it is an error)."""

    layer: str | None
    skipped: str = ""
    refused: str = ""


@dataclass
class AdapterMap:
    """How the module names of a model with adapter wrappers map to sparsifiable layers.

    ``base_of``: wrapper name -> name of the Linear whose threshold stands for the wrapper's input;
    ``wrapper_of``: the reverse; ``branch_of``: name of every other module inside a wrapper (``lora_A.default``,
    ``lora_dropout.default`` ...) -> its wrapper; ``unsupported``: wrapper name -> class name, for wrappers
    around a Linear whose input cannot be sparsified as a whole (adapter types other than LoRA/DoRA).
    """

    base_of: dict[str, str] = field(default_factory=dict)
    wrapper_of: dict[str, str] = field(default_factory=dict)
    branch_of: dict[str, str] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)
    #: peft ``ModulesToSaveWrapper`` name -> name of its active copy (``...modules_to_save.<adapter>``), the
    #: module its forward calls; its other copies (``original_module``, inactive adapters) are in ``branch_of``
    copy_of: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.base_of or self.unsupported or self.copy_of)

    def canonical(self, name: str) -> str:
        """The layer a matched module name stands for (a wrapper stands for its base layer or active copy)."""
        return self.base_of.get(name, self.copy_of.get(name, name))

    def aliases(self, name: str) -> list[str]:
        """Every name a sparsified layer answers to: its own and its wrapper's."""
        wrapper = self.wrapper_of.get(name) or next((w for w, c in self.copy_of.items() if c == name), None)
        wrapper = wrapper or self.branch_of.get(name)  # an inactive modules_to_save copy answers to its wrapper
        return [name] if wrapper is None else [name, wrapper]

    def select(self, name: str, exact: bool) -> Selection:
        """What selecting ``name`` (``exact``: by its exact name rather than a pattern or type) means."""
        owner = self.branch_of.get(name)
        if owner is not None and exact:
            return Selection(None, refused=(
                f"{name!r} (a branch of the adapter {owner!r}; adapter branches are sparsified only through the "
                f"adapted projection's input: name {owner!r} instead)"))
        if owner is not None:
            return Selection(None, skipped=(
                f"a branch of the adapter {owner!r}: adapter branches are sparsified only through the adapted "
                "projection's input"))
        if name in self.unsupported:
            return Selection(None, refused=(
                f"{name!r} is (inside) a peft {self.unsupported[name]} adapter: only LoRA/DoRA wrappers of a "
                "Linear can have their input sparsified for base layer and adapter together; merge_and_unload() "
                "the adapter first, or exclude it with an IgnoredScope"))
        return Selection(self.canonical(name))


def adapter_map(named_modules: Iterable[tuple[str, nn.Module]]) -> AdapterMap:
    """Find the adapter wrappers among ``model.named_modules()`` (empty when peft was never imported)."""
    result = AdapterMap()
    if _tuner_layer_class() is None:
        return result
    modules = list(named_modules)
    _map_modules_to_save(modules, result)
    wrappers = [(n, m) for n, m in modules if is_adapter_wrapper(m)]
    outer = []
    for name, module in wrappers:
        if any(name.startswith(o + ".") for o in outer):
            continue  # nested wrapper: the outermost one owns the input
        outer.append(name)
        probe, chain = module, [name]  # the names of the wrapper and its nested base layers, the innermost last
        while isinstance(getattr(probe, "base_layer", None), nn.Module):
            probe = probe.base_layer
            chain.append(chain[-1] + ".base_layer")
        base_name = chain[-1]
        # the adapter's own modules (lora_A, lora_B, dropout ...) are never layers of their own, whatever the
        # base (a LoRA on GPT-2's Conv1D has Linear lora_A/lora_B too: sparsifying them alone is wrong)
        for sub, _ in modules:
            if sub.startswith(name + ".") and sub not in chain and not sub.startswith(base_name + "."):
                result.branch_of[sub] = name
        if not is_linear_like(probe):
            continue  # an adapter on an embedding, a convolution ...: its base is not sparsifiable anyway
        if not _supported(module):
            result.unsupported[name] = type(module).__qualname__
            result.unsupported[base_name] = type(module).__qualname__
            continue
        result.base_of[name] = base_name
        result.wrapper_of[base_name] = name
    return result


def _map_modules_to_save(modules: list[tuple[str, nn.Module]], result: AdapterMap) -> None:
    """peft ``modules_to_save``: the wrapper calls ``modules_to_save[active]`` (a trained copy) and never its
    ``original_module`` (only with adapters disabled). The wrapper stands for its active copy; every other copy
    is nobody's layer while inactive (a sparsified one keeps its own threshold for when it is active again)."""
    cls = getattr(sys.modules.get("peft.utils.other"), "ModulesToSaveWrapper", None)
    if cls is None:
        return
    for name, module in modules:
        if not isinstance(module, cls):
            continue
        active = list(getattr(module, "active_adapters", None) or [])
        copies = getattr(module, "modules_to_save", {})
        if active and active[0] in copies and not module.disable_adapters:
            result.copy_of[name] = f"{name}.modules_to_save.{active[0]}"
        active_copy = result.copy_of.get(name)
        for sub, _ in modules:
            if sub.startswith(name + ".") and not (active_copy and (sub + ".").startswith(active_copy + ".")):
                result.branch_of[sub] = name


class AdapterInputHook:
    """Forward pre-hook of an adapter wrapper: threshold its input with its base layer's sparsifier.

    Holds no reference to any module (the base layer is looked up on each call), so ``copy.deepcopy`` and
    pickling of the model keep working, and a base layer that is no longer sparsified makes it a no-op.
    Registered with ``with_kwargs=True``; traceable by ``torch.compile``.
    """

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        base = adapter_base_layer(module)
        if not is_sparsified(base):
            return None
        if args:
            x, rest = args[0], args[1:]
            return (base.activation_input(x), *rest), {**kwargs, ADAPTER_INPUT_KWARG: True}  # type: ignore[operator]
        if "x" in kwargs:
            return args, {**kwargs, "x": base.activation_input(kwargs["x"]), ADAPTER_INPUT_KWARG: True}  # type: ignore[operator]
        return None


def sync_adapter_hooks(model: nn.Module, amap: AdapterMap | None = None) -> int:
    """Give every supported adapter wrapper whose base layer is sparsified exactly one input hook, and take it
    away from the others (so removing sparsification gives the wrapper back as it was). Returns the number of
    wrappers hooked. Call after installing or removing sparsifiers; the functional API and the callback do.
    """
    modules = dict(model.named_modules())
    amap = adapter_map(modules.items()) if amap is None else amap
    hooked = 0
    for wrapper_name, base_name in amap.base_of.items():
        wrapper = modules[wrapper_name]
        ids = [k for k, h in wrapper._forward_pre_hooks.items() if isinstance(h, AdapterInputHook)]
        want = is_sparsified(modules[base_name])
        if want and not ids:
            wrapper.register_forward_pre_hook(AdapterInputHook(), with_kwargs=True, prepend=True)
        elif not want:
            for k in ids:
                del wrapper._forward_pre_hooks[k]
                wrapper._forward_pre_hooks_with_kwargs.pop(k, None)
                getattr(wrapper, "_forward_pre_hooks_always_called", {}).pop(k, None)
        hooked += int(want)
    return hooked
