"""Target sparsity over a fine-tuning run: :class:`SparsitySchedule` (constant) and :class:`LinearRamp`.

A schedule maps the final ``{TargetScope: sparsity}`` targets and a point of the run (epoch, optimizer step)
to the targets to train at, like :meth:`lightning.pytorch.callbacks.WeightAveraging.should_update` decides
when to average: subclass and override :meth:`SparsitySchedule.targets` for a schedule of your own, and set
``check_every_epoch`` / ``check_every_n_steps`` to say when the callback asks it. Every change of target
recalibrates the changed layers.
"""

from __future__ import annotations

import math
from typing import Mapping

from pl_actsparse.config import positive_int_or_none
from pl_actsparse.core.recipe import validate_target
from pl_actsparse.core.scopes import TargetScope
from pl_actsparse.errors import CallbackConfigurationError

__all__ = ["SparsitySchedule", "LinearRamp"]


class SparsitySchedule:
    """The constant schedule: the final targets from the first step. Base class of custom schedules.

    Attributes:
        check_every_epoch: the callback calls :meth:`targets` at the start of every training epoch.
        check_every_n_steps: the callback calls :meth:`targets` every N optimizer steps (None: never).

    Example::

        class Cubic(SparsitySchedule):
            check_every_n_steps = 50

            def targets(self, final, epoch, step):
                p = min(1.0, step / 1000)
                return {scope: t * (1 - (1 - p) ** 3) for scope, t in final.items()}
    """

    check_every_epoch: bool = False
    check_every_n_steps: int | None = None

    def targets(self, final: Mapping[TargetScope, float], epoch: int, step: int) -> dict[TargetScope, float]:
        """The targets to train at in ``epoch`` (0-based) at optimizer step ``step``; ``final`` are the
        callback's targets (``scopes``). Values must lie in [0, 1]."""
        return dict(final)

    def checked_targets(self, final: Mapping[TargetScope, float], epoch: int, step: int) -> dict[TargetScope, float]:
        """:meth:`targets`, validated: same scopes as ``final``, every value in [0, 1].

        Raises:
            CallbackConfigurationError: a scope is missing or added; InvalidTargetError: a value is out of range.
        """
        out = self.targets(final, epoch, step)
        if set(out) != set(final):
            raise CallbackConfigurationError(
                f"{type(self).__name__}.targets must return one target per scope of the callback, got scopes {list(out)}"
            )
        return {s: validate_target(v, f"{type(self).__name__}.targets(epoch={epoch}, step={step})[{s!r}]") for s, v in out.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearRamp(SparsitySchedule):
    """A linear ramp from ``initial_sparsity`` to the final targets over ``epochs`` epochs or ``steps`` steps.

    Epoch ``e`` trains at ``initial + min(1, e / epochs) * (final - initial)``; over steps the target is
    updated every ``every_n_steps`` steps (default ``ceil(steps / 10)``) from ``step // k * k``.

    Raises:
        CallbackConfigurationError: not exactly one of ``epochs`` and ``steps``, or ``every_n_steps`` without ``steps``.
        InvalidTargetError: ``initial_sparsity`` is not in [0, 1].
    """

    def __init__(
        self,
        initial_sparsity: float = 0.0,
        epochs: int | None = None,
        steps: int | None = None,
        every_n_steps: int | None = None,
    ) -> None:
        self.initial_sparsity = validate_target(initial_sparsity, "LinearRamp initial_sparsity")
        self.epochs = positive_int_or_none(epochs, "LinearRamp: epochs", CallbackConfigurationError)
        self.steps = positive_int_or_none(steps, "LinearRamp: steps", CallbackConfigurationError)
        every = positive_int_or_none(every_n_steps, "LinearRamp: every_n_steps", CallbackConfigurationError)
        if (self.epochs is None) == (self.steps is None):
            raise CallbackConfigurationError(f"LinearRamp needs exactly one of epochs and steps, got epochs={epochs!r}, steps={steps!r}")
        if every is not None and self.steps is None:
            raise CallbackConfigurationError("LinearRamp: every_n_steps only applies to a ramp over steps (steps=...)")
        if self.steps is not None and every is None:
            every = max(1, math.ceil(self.steps / 10))
        self.every_n_steps = every
        self.check_every_epoch = self.epochs is not None
        self.check_every_n_steps = every

    def progress(self, epoch: int, step: int) -> float:
        """The fraction of the ramp done at (epoch, step), in [0, 1]."""
        if self.epochs is not None:
            return min(1.0, epoch / self.epochs)
        k = self.every_n_steps or 1
        return min(1.0, (step // k) * k / self.steps)  # type: ignore[operator]

    def targets(self, final: Mapping[TargetScope, float], epoch: int, step: int) -> dict[TargetScope, float]:
        p = self.progress(epoch, step)
        if p >= 1.0:
            return dict(final)
        a = self.initial_sparsity
        return {scope: a + p * (t - a) for scope, t in final.items()}

    def __repr__(self) -> str:
        return f"LinearRamp(initial_sparsity={self.initial_sparsity}, epochs={self.epochs}, steps={self.steps}, every_n_steps={self.every_n_steps})"
