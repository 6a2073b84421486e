"""LoRA fine-tuning of the shipped stories260K model with activation sparsity (needs ``peft``).

:class:`LoRATinyStoriesLM` is :class:`~pl_actsparse.demos.lightning_models.TinyStoriesLM` with peft LoRA
adapters on the MLP projections: only the adapters train (the base weights are frozen), and the seed patterns
of :class:`~pl_actsparse.ActivationSparsityCallback` (``.*mlp\\.(gate|up|down)_proj``) sparsify the input of
each adapted projection, which the base layer and the LoRA branch then both receive (see
:mod:`pl_actsparse.integrations.peft`). ``module.merged_model()`` folds the adapters into the base weights and
returns a plain model of sparsified Linear layers, ready for :func:`pl_actsparse.export_for_inference`.
Used by ``recipes/stories260k_lora.yaml`` and ``benchmarks/finetune.py``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pl_actsparse.demos.lightning_models import TinyStoriesLM

__all__ = ["LoRATinyStoriesLM", "DEFAULT_LORA"]

#: LoRA on every MLP projection, rank 16 (``lora_alpha`` 32: scaling 2), no dropout.
DEFAULT_LORA: dict[str, Any] = {
    "r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": ["gate_proj", "up_proj", "down_proj"],
}


class LoRATinyStoriesLM(TinyStoriesLM):
    """A llama2.c model (default: stories260K) with peft LoRA adapters; only the adapters train.

    Args:
        lora: ``peft.LoraConfig`` fields, over :data:`DEFAULT_LORA` (e.g. ``{"r": 8, "use_dora": true}``).
        checkpoint: a llama2.c ``.bin`` file (default: the shipped stories260K).
        **kwargs: training options of :class:`~pl_actsparse.demos.lightning_models.CausalLMModule`
            (learning rate, schedule).

    Raises:
        ImportError: peft is not installed.
    """

    def __init__(self, lora: dict[str, Any] | None = None, checkpoint: str | None = None, **kwargs: Any) -> None:
        super().__init__(checkpoint=checkpoint, **kwargs)
        self.save_hyperparameters()
        try:
            import peft
        except ImportError as exc:  # pragma: no cover - exercised only without peft
            raise ImportError("LoRATinyStoriesLM needs peft: pip install peft") from exc
        self.lora_config = {**DEFAULT_LORA, **(lora or {})}
        self.model = peft.get_peft_model(self.model, peft.LoraConfig(**self.lora_config))

    def merged_model(self) -> nn.Module:
        """The adapters folded into the base weights (``merge_and_unload``): the plain llama2.c model, with
        each adapted projection a sparsified ``nn.Linear`` of the same threshold. Consumes the adapters."""
        return self.model.merge_and_unload()
