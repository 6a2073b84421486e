"""The callback next to Lightning callbacks that copy, swap or try out the model (``docs/integrations.md``).

* ``WeightAveraging`` (EMA) copies the model in its ``setup`` and swaps or copies parameters *and buffers*
  by position. A copy made before the sparsifiers existed is made again (its own ``setup``) once they exist;
  the callback runs after every averaging callback, so its hooks see the weights those put in.
* A tuner (``LearningRateFinder``, ``BatchSizeFinder``, listed first by Lightning) searches inside its own hook
  with ``trainer.callbacks`` replaced. Its search method is wrapped on the instance until ``teardown``: the
  callback calibrates first, so every search step runs the model as it will be trained.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from lightning.pytorch.callbacks import BatchSizeFinder, Checkpoint, LearningRateFinder, StochasticWeightAveraging

try:
    from lightning.pytorch.callbacks import WeightAveraging
except ImportError:  # pragma: no cover - Lightning < 2.5 has SWA only
    WeightAveraging = StochasticWeightAveraging  # type: ignore[misc, assignment]

from pl_actsparse.core.layer import THRESHOLD_BUFFER, sparsified_layers

_SEARCH = ((LearningRateFinder, "lr_find"), (BatchSizeFinder, "scale_batch_size"))


def swaps_weights(trainer: Any, at_end: bool = False) -> bool:
    """Whether a ``WeightAveraging`` callback runs (it swaps its weights in for each validation of a fit, and at the end);
    ``at_end``: or a ``StochasticWeightAveraging`` one (it copies its average in at the end of fit, parameters only)."""
    return (at_end or WeightAveraging is not StochasticWeightAveraging) and any(
        isinstance(c, (StochasticWeightAveraging, WeightAveraging) if at_end else WeightAveraging) for c in trainer.callbacks)


def arrange(trainer: Any, callback: Any, pl_module: Any, stage: str) -> Callable[[], Any]:
    """In ``callback.setup``: move ``callback`` after every weight-averaging callback (checkpoint callbacks stay
    last) and make it calibrate before every tuner's search. Returns what to run once the sparsifiers exist:
    in a fit, the ``setup`` of the weight-averaging callbacks that copied the model already (copy again)."""
    callbacks = list(trainer.callbacks)
    me = callbacks.index(callback) if callback in callbacks else len(callbacks)
    early = [c for c in callbacks[:me] if isinstance(c, (StochasticWeightAveraging, WeightAveraging)) and stage == "fit"]
    for tuner, name in [(c, n) for c in callbacks for cls, n in _SEARCH if isinstance(c, cls) and n not in vars(c)]:
        vars(tuner)[name] = _calibrating_first(callback, tuner, getattr(tuner, name))
    averaging = [i for i, c in enumerate(callbacks) if isinstance(c, (StochasticWeightAveraging, WeightAveraging))]
    if averaging and me < max(averaging):
        callbacks.remove(callback)
        last = max(averaging) - 1
        first_checkpoint = next((i for i, c in enumerate(callbacks) if isinstance(c, Checkpoint) and i > last), last + 1)
        callbacks.insert(min(last + 1, first_checkpoint), callback)
        trainer.callbacks = callbacks  # a new list: a hook loop running over the old one is not disturbed
    return lambda: [c.setup(trainer, pl_module, stage) for c in early]


def _calibrating_first(callback: Any, tuner: Any, search: Callable[..., Any]) -> Callable[..., Any]:
    def search_calibrated(trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> Any:
        if callback in trainer.callbacks:
            callback._ensure_calibrated(trainer, pl_module, f"before {type(tuner).__name__}")
        return search(trainer, pl_module, *args, **kwargs)

    search_calibrated.pl_actsparse_wrapper = True  # type: ignore[attr-defined]
    return search_calibrated


def release(trainer: Any) -> None:
    """In ``callback.teardown``: remove the wrappers :func:`arrange` put on the tuners."""
    for tuner, name in [(c, n) for c in trainer.callbacks for _, n in _SEARCH if hasattr(vars(c).get(n), "pl_actsparse_wrapper")]:
        del vars(tuner)[name]


def calibrate_averaged_checkpoint(callback: Any, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
    """In ``callback.on_save_checkpoint``: a ``WeightAveraging`` callback saves the *averaged* weights as the
    checkpoint's ``state_dict`` (the current ones under ``current_model_state``). Calibrate thresholds on those
    weights and store them there, so that the checkpoint never pairs weights with another model's thresholds."""
    prefix = "" if callback.submodule is None else callback.submodule + "."
    averaged = checkpoint["state_dict"]
    current = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in pl_module.state_dict().items()}
    try:
        pl_module.load_state_dict(averaged, strict=False)
        callback._run_calibration(trainer, pl_module, progress=False)
        for name, m in sparsified_layers(callback.sparsified_module(pl_module)):
            averaged[f"{prefix}{name}.{THRESHOLD_BUFFER}"] = m.activation_threshold.detach().clone()
            averaged[f"{prefix}{name}._extra_state"] = m.get_extra_state()
    finally:
        pl_module.load_state_dict(current)
