"""Bring the sparsified model and the callback state back from ``ddp_spawn`` (and fork) workers.

With a multiprocessing launcher (``strategy="ddp_spawn"``, ``"ddp_fork"``, ``"ddp_notebook"``) every hook runs
in worker processes, and Lightning loads rank 0's weights into the main process's model, which has no
sparsifiers, with ``strict=False``: the thresholds would be dropped without a word. Rank 0's callback therefore
adds, in ``on_fit_end``, its layers (threshold and state) and its ``state_dict`` to the launcher's extra results
(``get_extra_results``, the hook Lightning provides to send state back). Unpickled in the main process, the
payload makes ``update_main_process_results`` (run right after the weights are loaded) install the same
sparsifiers on the main process's model and restore the callback state, once.
"""

from __future__ import annotations

from typing import Any

import torch

from pl_actsparse.core.layer import decode_sparsifier_state, encode_sparsifier_state, restore_layers, sparsified_layers


def send_to_main_process(trainer: Any, callback: Any, pl_module: Any) -> None:
    """In a multiprocessing-launched worker of rank 0: attach the payload to the launcher's extra results."""
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    if not isinstance(launcher, _MultiProcessingLauncher) or trainer.strategy.local_rank != 0 or trainer.state.fn != "fit":
        return
    layers = {  # plain Python values: no tensor crosses the queue
        name: (m.activation_threshold.detach().cpu().tolist(), list(m.activation_threshold.shape), decode_sparsifier_state(m.get_extra_state()))
        for name, m in sparsified_layers(callback.sparsified_module(pl_module))
    }
    payload = _Payload((callback.state_key, callback.state_dict(), layers, list(callback._layer_names)))
    original = launcher.get_extra_results  # this worker's own launcher object
    launcher.get_extra_results = lambda trainer_: {**original(trainer_), "pl_actsparse/" + callback.state_key: payload}


class _Payload(tuple):
    """``(state_key, callback state_dict, {layer: (threshold, shape, state)}, layer names)``; unpickling it
    in the main process runs :func:`_received`."""

    def __reduce__(self) -> Any:
        return (_received, (tuple(self),))

    def apply(self, trainer: Any) -> None:
        from pl_actsparse.api import remove_activation_sparsity

        state_key, callback_state, layers, layer_names = self
        for callback in trainer.callbacks:  # the ActivationSparsityCallback that sent it (its state_key is unique)
            if getattr(callback, "state_key", None) != state_key or not hasattr(callback, "sparsified_module"):
                continue
            module = callback.sparsified_module(trainer.lightning_module)
            modules = dict(module.named_modules())
            if not layers:
                remove_activation_sparsity(module)
            restore_layers(modules, {n: (torch.tensor(t, dtype=torch.float32, device=modules[n].weight.device).reshape(shape),
                                         encode_sparsifier_state(extra)) for n, (t, shape, extra) in layers.items()})
            callback.load_state_dict(callback_state)
            callback._layer_names = list(layer_names)


def _received(fields: tuple) -> _Payload:
    """Runs in the main process while the worker's results are unpickled: arrange for the payload to be
    applied by ``update_main_process_results``, right after Lightning loaded the weights."""
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher as cls

    current = cls.__dict__["update_main_process_results"]
    if not getattr(current, "_pl_actsparse", False):

        def update_main_process_results(self: Any, trainer: Any, extra: dict[str, Any]) -> None:
            cls.update_main_process_results = current  # once
            current(self, trainer, extra)
            for value in extra.values():
                if isinstance(value, _Payload):
                    value.apply(trainer)

        update_main_process_results._pl_actsparse = True  # type: ignore[attr-defined]
        cls.update_main_process_results = update_main_process_results  # type: ignore[method-assign]
    return _Payload(fields)
