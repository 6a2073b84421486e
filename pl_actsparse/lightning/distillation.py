"""Self-distillation from the dense model for any LightningModule: ``ActivationSparsityCallback(distillation=0.9)``.

The loss becomes ``(1 - w) * loss + w * T^2 * KL(teacher || student)``, ``loss`` being what the module's own
``training_step`` returns and the teacher the same model with sparsity off, by default with the trainable parameters
of the start of fit (a copy of those only, swapped in by ``torch.func.functional_call``): one extra no-grad forward,
run by a forward hook on the sparsified module; a wrapper of ``training_step`` (instance attribute, removed at
teardown) adds the term (docs/callback.md). Method: knowledge distillation (Hinton et al., 2015) from the dense model,
as in sparse recovery fine-tuning (Kurtic et al., 2023).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from typing import Any, Callable, Literal, Mapping

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import nn

from pl_actsparse.core.layer import activation_sparsity_disabled
from pl_actsparse.core.module_state import preserved_modes
from pl_actsparse.errors import ActivationSparsityError, CallbackConfigurationError, CheckpointError, InvalidOptionError

__all__ = ["DistillationConfig", "Distiller", "distillation_loss"]


@dataclasses.dataclass(frozen=True)
class DistillationConfig:
    r"""How the callback distils the dense model into the sparse one.

    Args:
        weight: ``w`` in ``(1 - w) * loss + w * distillation``, in [0, 1] (1: distillation only).
        weight_end: None (constant ``weight``) or the weight in [0, 1] of the last optimizer step, reached linearly
            from ``weight`` at step 0 over the fit's ``Trainer.estimated_stepping_batches`` (:meth:`weight_at`).
        temperature: ``T`` > 0; both distributions are softened by ``T`` and the KL is scaled by ``T^2``.
        teacher: ``"initial"`` (sparsity off, the trainable parameters as at the start of fit: a copy of those),
            ``"dense"`` (sparsity off, current weights, no copy) or ``"base"`` (sparsity and peft adapters off).
        kl: ``"forward"`` ``KL(teacher || student)`` or ``"reverse"`` ``KL(student || teacher)`` (mode-seeking, MiniLLM).
        hidden_states: a regex ``re.fullmatch``-ed on the module's submodule names (e.g. ``r".*layers\.\d+"``): their outputs
            are matched too, adding the mean over them of ``||student - teacher||^2 / ||teacher||^2`` (SquareHead, Kurtic et al., 2023).

    Raises:
        InvalidOptionError: a field is out of range; the message names it and what is valid.
    """

    weight: float = 0.9
    weight_end: float | None = None
    temperature: float = 1.0
    teacher: Literal["initial", "dense", "base"] = "initial"
    kl: Literal["forward", "reverse"] = "forward"
    hidden_states: str | None = None

    def __post_init__(self) -> None:
        for name, ok, valid in (("weight", _is_weight(self.weight), "a number in [0, 1]"), ("weight_end", self.weight_end is None or _is_weight(self.weight_end), "None or a number in [0, 1]"),
                                ("temperature", (isinstance(self.temperature, float) or type(self.temperature) is int) and 0 < self.temperature < math.inf, "a finite number > 0"),
                                ("teacher", self.teacher in ("initial", "dense", "base"), "one of ('initial', 'dense', 'base')"),
                                ("kl", self.kl in ("forward", "reverse"), "one of ('forward', 'reverse')"),
                                ("hidden_states", _is_regex(self.hidden_states), "None or a regular expression")):
            if not ok:
                raise InvalidOptionError(f"distillation {name} must be {valid}, got {getattr(self, name)!r}")

    def weight_at(self, step: int, total: float) -> float:
        """The weight at optimizer step ``step`` (0-based) of a fit of ``total`` steps: ``weight``, or with ``weight_end``
        ``weight + min(1, step / (total - 1)) * (weight_end - weight)`` (``weight_end`` from the last step on)."""
        return self.weight if self.weight_end is None else self.weight + min(1.0, step / max(1.0, total - 1)) * (self.weight_end - self.weight)

    @classmethod
    def from_value(cls, value: Any) -> DistillationConfig | None:
        """None, a weight (``0.9``), a mapping of the fields (YAML) or a config; an unknown key is an
        InvalidOptionError naming the valid ones."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, float) or type(value) is int:
            return cls(weight=float(value))
        fields = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(value, Mapping):
            raise InvalidOptionError(f"distillation must be None, a weight in [0, 1], a mapping of {fields} or a DistillationConfig, got {type(value).__qualname__}")
        if unknown := sorted(str(k) for k in value if k not in fields):
            raise InvalidOptionError(f"unknown distillation option(s) {unknown}; valid: {fields}")
        return cls(**value)


def _is_weight(v: Any) -> bool:
    return (isinstance(v, float) or type(v) is int) and 0 <= v <= 1


def _is_regex(v: Any) -> bool:
    try:
        return v is None or isinstance(v, str) and re.compile(v) is not None
    except re.error:
        return False


def _logits_of(output: Any, where: str) -> torch.Tensor:
    # stricter than calibrate.running.logits_of: no guess on tuples (HF puts the loss first when labels are passed)
    logits = output if isinstance(output, torch.Tensor) else output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise ActivationSparsityError(f"distillation needs logits: the forward of {where} returned {type(output).__qualname__}, neither a tensor of logits "
                                      "nor with a `logits` tensor (an HF ModelOutput); set the callback's submodule= to the module that returns logits, or distillation=None")
    return logits


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, mask: torch.Tensor | None = None,
                      kl: Literal["forward", "reverse"] = "forward") -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` averaged over positions, in fp32 (``kl="reverse"``:
    ``KL(student || teacher)``).

    Args:
        student, teacher: logits ``[..., vocab]`` of the same shape (any float dtype); no gradient flows to ``teacher``.
        mask: optional ``[...]`` (e.g. an ``attention_mask``): positions where it is 0 never count.

    Returns: a 0-dim fp32 tensor (nats per position; 0 when the mask selects nothing).
    """
    s, t = (F.log_softmax(z.float() / temperature, -1) for z in (student, teacher.detach()))
    div = (t.exp() * (t - s) if kl == "forward" else s.exp() * (s - t)).sum(-1)
    keep = torch.ones_like(div, dtype=torch.bool) if mask is None else mask.to(div.device).bool()
    return div.masked_fill(~keep, 0.0).sum() / keep.sum().clamp(min=1) * temperature**2  # NaN/inf at padding stays out


def _adapters_disabled(module: nn.Module) -> contextlib.AbstractContextManager:
    peft = next((m for m in module.modules() if callable(getattr(m, "disable_adapter", None)) and hasattr(m, "peft_config")), None)
    if peft is None:
        raise CallbackConfigurationError(f"distillation teacher='base' needs a peft model (with disable_adapter()) in {type(module).__qualname__}; "
                                         "use teacher='initial' or 'dense' (the same model with sparsity off)")
    return peft.disable_adapter()


class Distiller:
    """The run-time side of a :class:`DistillationConfig`: :meth:`attach` at the start of fit (CallbackConfigurationError for
    manual optimization, ``teacher="base"`` without peft, ``hidden_states`` matching nothing), :meth:`detach` at teardown."""

    def __init__(self, config: DistillationConfig, log_key: str = "actsparse/train/distill_loss") -> None:
        self.config, self.log_key, self._active, self._in_teacher = config, log_key, False, False
        self._losses, self._hidden = [], ([], [])  # per step: distillation terms; per forward: (student, teacher) block outputs
        self._undo: list[Callable[[], None]] = []
        #: ``teacher="initial"``: the teacher's weights during fit, saved in the callback's checkpoint state, so that a
        #: resumed fit distils from the weights of the *original* start of fit (set it before :meth:`attach` to restore).
        self.teacher_weights: dict[str, torch.Tensor] | None = None

    def attach(self, trainer: Trainer, pl_module: LightningModule, module: nn.Module) -> None:
        total = 1 if self.config.weight_end is None else trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise CallbackConfigurationError(f"distillation weight_end={self.config.weight_end} ramps over the fit's optimizer steps, which are unbounded here; "
                                             "set the Trainer's max_steps or max_epochs, or weight_end=None")
        saved = self.teacher_weights  # restored from a checkpoint, or None
        self.detach()
        if not pl_module.automatic_optimization:
            raise CallbackConfigurationError("distillation adds a term to the loss training_step returns, so it needs automatic optimization; "
                                             f"{type(pl_module).__qualname__} sets automatic_optimization=False (use distillation_loss() in its step)")
        self.config.teacher == "base" and _adapters_disabled(module)  # fail now, not at the first step
        where, c = type(module).__name__, self.config
        frozen = None
        if c.teacher == "initial":
            params = {n: p for n, p in module.named_parameters() if p.requires_grad}
            if saved is not None and saved.keys() != params.keys():
                raise CheckpointError(f"the checkpoint's distillation teacher has parameters {sorted(saved.keys() ^ params.keys())[:5]} "
                                      f"that {where}'s trainable parameters do not match (or the reverse); resume with the same model and adapters")
            frozen = {n: saved[n].to(p.device, p.dtype) if saved is not None else p.detach().clone() for n, p in params.items()}
        self.teacher_weights = frozen
        blocks = [m for n, m in module.named_modules() if c.hidden_states is not None and re.fullmatch(c.hidden_states, n)]
        if c.hidden_states is not None and not blocks:
            raise CallbackConfigurationError(f"distillation hidden_states={c.hidden_states!r} matches no module name of {where}")

        def capture(mod: nn.Module, args: tuple, output: Any) -> None:
            if self._active:  # student outputs during its forward, teacher outputs during the teacher's
                self._hidden[self._in_teacher].append(output[0] if isinstance(output, tuple) else output)

        def hook(mod: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            if not self._active or self._in_teacher:
                return
            student, (hidden, _) = _logits_of(output, where), self._hidden
            self._in_teacher, self._hidden = True, ([], [])
            try:
                with torch.no_grad(), activation_sparsity_disabled(mod), preserved_modes(mod), _adapters_disabled(mod) if c.teacher == "base" else contextlib.nullcontext():
                    mod.eval()
                    out = mod(*args, **kwargs) if frozen is None else torch.func.functional_call(mod, frozen, args, kwargs, strict=False)
                    teacher = _logits_of(out, where)
            finally:
                self._in_teacher = False
            mask = m.bool() if isinstance(m := kwargs.get("attention_mask"), torch.Tensor) and m.shape == student.shape[:-1] else None
            loss = distillation_loss(student, teacher, c.temperature, mask, c.kl)
            for s, t in zip(hidden, self._hidden[1]):
                err, ref = (x.square().sum(-1)[... if mask is None else mask] for x in (s.float() - t.float(), t.float()))
                loss = loss + err.sum() / ref.sum().clamp(min=1e-12) / len(blocks)
            self._losses.append(loss)

        handles = [module.register_forward_hook(hook, with_kwargs=True), *(b.register_forward_hook(capture) for b in blocks)]
        step = pl_module.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            self._losses, self._hidden, self._active = [], ([], []), True
            try:
                out = step(*args, **kwargs)
            finally:
                self._active = False
            losses, self._losses = self._losses, []
            if out is None:  # the module skipped this batch
                return out
            if not losses:
                raise ActivationSparsityError(f"distillation: {type(pl_module).__qualname__}.training_step never called the forward of {where}")
            loss, kd = out["loss"] if isinstance(out, Mapping) else out, torch.stack(losses).mean()
            w = c.weight_at(trainer.global_step, total)
            pl_module.log(self.log_key, kd.detach(), on_step=True, batch_size=1)
            pl_module.log(self.log_key.rsplit("/", 1)[0] + "/distill_weight", w, on_step=True, batch_size=1)
            mixed = (1.0 - w) * loss + w * kd.to(loss.dtype)
            return {**out, "loss": mixed} if isinstance(out, Mapping) else mixed

        pl_module.__dict__["training_step"] = training_step
        self._undo = [*(h.remove for h in handles), lambda: pl_module.__dict__.pop("training_step", None)]

    def detach(self) -> None:
        for undo in self._undo:
            undo()
        self._undo, self._losses, self.teacher_weights = [], [], None
