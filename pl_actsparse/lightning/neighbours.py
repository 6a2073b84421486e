"""The callback among Lightning callbacks that copy, swap or try out the model: weight averaging and tuners.

Lightning runs each hook over ``trainer.callbacks`` in order, the tuners (``LearningRateFinder``,
``BatchSizeFinder``) moved to the front and checkpoint callbacks to the end. For
:class:`~pl_actsparse.lightning.callback.ActivationSparsityCallback` that means:

* ``WeightAveraging``/``EMAWeightAveraging`` copies the model in its ``setup`` and later swaps or copies
  parameters *and buffers* between model and copy by position. A copy made before the sparsifiers existed
  (averaging callback listed first) has no thresholds, so validation on the averaged weights would keep the
  training weights' thresholds (and a buffer after the first threshold would pair with the wrong tensor).
  Such a copy is made again, by the averaging callback's own ``setup``, once the sparsifiers are installed;
  and the callback runs after every averaging callback, so its hooks see the weights those put in.
* A tuner runs its whole search inside its own hook (``on_fit_start``; ``BatchSizeFinder`` also
  ``on_validation_start``/``on_test_start``/``on_predict_start``), before the callback's hooks, with
  ``trainer.callbacks`` replaced. Its search method (``lr_find``, ``scale_batch_size``) is wrapped on the
  instance for the run: the callback calibrates (and applies the schedule's targets of the epoch) first, so
  every search step runs the model as it will be trained. The wrapper is removed at ``teardown``.
"""

from __future__ import annotations

from typing import Any, Callable

from lightning.pytorch.callbacks import BatchSizeFinder, Checkpoint, LearningRateFinder, StochasticWeightAveraging

try:
    from lightning.pytorch.callbacks import WeightAveraging
except ImportError:  # pragma: no cover - Lightning < 2.5 has SWA only
    WeightAveraging = StochasticWeightAveraging  # type: ignore[misc, assignment]

_SEARCH = ((LearningRateFinder, "lr_find"), (BatchSizeFinder, "scale_batch_size"))


def swaps_weights(trainer: Any) -> bool:
    """Whether a ``WeightAveraging`` callback runs (it swaps its averaged weights in for every validation of a
    fit and copies them in at ``on_train_end``, whether or not its copy's thresholds differ)."""
    return WeightAveraging is not StochasticWeightAveraging and any(isinstance(c, WeightAveraging) for c in trainer.callbacks)


def arrange(trainer: Any, callback: Any, pl_module: Any, stage: str) -> Callable[[], None]:
    """In ``callback.setup``: move ``callback`` after every weight-averaging callback (checkpoint callbacks stay
    last) and make it calibrate before every tuner's search. Returns what to run once the sparsifiers exist:
    in a fit, the ``setup`` of the ``WeightAveraging`` callbacks that copied the model already (copy again)."""
    callbacks = list(trainer.callbacks)
    me = callbacks.index(callback) if callback in callbacks else len(callbacks)
    early = [c for c in callbacks[:me] if isinstance(c, WeightAveraging) and stage == "fit"]
    for tuner in callbacks:
        for cls, name in _SEARCH:
            if isinstance(tuner, cls) and name not in tuner.__dict__:
                tuner.__dict__[name] = _calibrating_first(callback, tuner, getattr(tuner, name))
    averaging = [i for i, c in enumerate(callbacks) if isinstance(c, (StochasticWeightAveraging, WeightAveraging))]
    if averaging and me < max(averaging):
        callbacks.remove(callback)
        last = max(averaging) - 1
        first_checkpoint = next((i for i, c in enumerate(callbacks) if isinstance(c, Checkpoint) and i > last), last + 1)
        callbacks.insert(min(last + 1, first_checkpoint), callback)
        trainer.callbacks = callbacks  # a new list: a hook loop running over the old one is not disturbed
    return lambda: [c.setup(trainer, pl_module, stage) for c in early] and None


def _calibrating_first(callback: Any, tuner: Any, search: Callable[..., Any]) -> Callable[..., Any]:
    def search_calibrated(trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> Any:
        if callback in trainer.callbacks:
            callback._ensure_calibrated(trainer, pl_module, f"before {type(tuner).__name__}")
            if trainer.state.fn == "fit" and trainer.current_epoch > 0:  # a search at a later epoch (milestones):
                callback.on_train_epoch_start(trainer, pl_module)  # this epoch's scheduled targets first
        return search(trainer, pl_module, *args, **kwargs)

    search_calibrated.pl_actsparse_wrapper = True  # type: ignore[attr-defined]
    return search_calibrated


def release(trainer: Any) -> None:
    """In ``callback.teardown``: remove the wrappers :func:`arrange` put on the tuners."""
    for tuner in trainer.callbacks:
        for _, name in _SEARCH:
            if getattr(tuner.__dict__.get(name), "pl_actsparse_wrapper", False):
                del tuner.__dict__[name]
