"""Bring the sparsified model and the callback state back from ``ddp_spawn`` (and fork) workers.

With a multiprocessing launcher (``strategy="ddp_spawn"``, ``"ddp_fork"``, ``"ddp_notebook"``), every hook
runs in worker processes. Lightning sends the main process rank 0's weights, loaded with ``strict=False``
into a model that has no sparsifiers, so the thresholds would be dropped without a word, and the main
process's callback would keep an empty history. Rank 0's callback therefore adds, in ``on_fit_end``, a
small payload to the launcher's extra results (:meth:`_MultiProcessingLauncher.get_extra_results`, the hook
Lightning provides to send state back): per sparsified layer its threshold and state, plus the callback's
``state_dict``. When the main process unpickles the payload, it arranges for
``update_main_process_results`` (which runs right after the weights are loaded) to install the same
sparsifiers on the main process's model and restore the callback state, once.
"""

from __future__ import annotations

from typing import Any

import torch

from pl_actsparse.core.layer import THRESHOLD_BUFFER, decode_sparsifier_state, install_sparsifier, is_sparsified, sparsified_layers

_KEY = "pl_actsparse/"


def _launcher(trainer: Any) -> Any:
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    return launcher if isinstance(launcher, _MultiProcessingLauncher) else None


def send_to_main_process(trainer: Any, callback: Any, pl_module: Any) -> None:
    """In a multiprocessing-launched worker of rank 0: attach the payload to the launcher's extra results."""
    launcher = _launcher(trainer)
    if launcher is None or trainer.strategy.local_rank != 0 or trainer.state.fn != "fit":
        return
    module = callback.sparsified_module(pl_module)
    layers = {
        name: {
            "threshold": m.activation_threshold.detach().cpu().tolist(),
            "shape": list(m.activation_threshold.shape),
            "extra": decode_sparsifier_state(m.get_extra_state()),  # plain Python values: no tensor crosses the queue
        }
        for name, m in sparsified_layers(module)
    }
    payload = _Payload(callback.state_key, callback.state_dict(), layers, list(callback._layer_names))
    original = launcher.get_extra_results

    def get_extra_results(trainer_: Any) -> dict[str, Any]:
        extra = original(trainer_)
        extra[_KEY + callback.state_key] = payload
        return extra

    launcher.get_extra_results = get_extra_results  # this worker's own launcher object


class _Payload:
    def __init__(self, state_key: str, callback_state: dict[str, Any], layers: dict[str, Any], layer_names: list[str]) -> None:
        self.state_key = state_key
        self.callback_state = callback_state
        self.layers = layers
        self.layer_names = layer_names

    def __reduce__(self) -> Any:
        return (_received, (self.state_key, self.callback_state, self.layers, self.layer_names))

    def apply(self, trainer: Any) -> None:
        from pl_actsparse.api import remove_activation_sparsity
        for callback in trainer.callbacks:  # the ActivationSparsityCallback that sent it (its state_key is unique)
            if getattr(callback, "state_key", None) != self.state_key or not hasattr(callback, "sparsified_module"):
                continue
            module = callback.sparsified_module(trainer.lightning_module)
            modules = dict(module.named_modules())
            if not self.layers:
                remove_activation_sparsity(module)
            for name, layer in self.layers.items():
                m = modules[name]
                extra = layer["extra"]
                if not is_sparsified(m):
                    install_sparsifier(m, extra["target"], extra.get("gradient_mode", "masked"))
                value = torch.tensor(layer["threshold"], dtype=torch.float32, device=m.weight.device).reshape(layer["shape"])
                m._buffers[THRESHOLD_BUFFER] = value
                m.set_extra_state(extra)
            callback.load_state_dict(self.callback_state)
            callback._layer_names = list(self.layer_names)


def _received(state_key: str, callback_state: dict[str, Any], layers: dict[str, Any], layer_names: list[str]) -> _Payload:
    """Runs in the main process while the worker's results are unpickled: arrange for the payload to be
    applied by ``update_main_process_results``, right after Lightning loaded the weights."""
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    cls = _MultiProcessingLauncher
    current = cls.__dict__["update_main_process_results"]
    if not getattr(current, "_pl_actsparse", False):

        def update_main_process_results(self: Any, trainer: Any, extra: dict[str, Any]) -> None:
            cls.update_main_process_results = current  # once
            current(self, trainer, extra)
            for key, value in extra.items():
                if key.startswith(_KEY) and isinstance(value, _Payload):
                    value.apply(trainer)

        update_main_process_results._pl_actsparse = True  # type: ignore[attr-defined]
        cls.update_main_process_results = update_main_process_results  # type: ignore[method-assign]
    return _Payload(state_key, callback_state, layers, layer_names)
