"""Ready-made LightningModules and a DataModule, so recipes run without user code.

* :class:`TinyStoriesLM`: the shipped stories260K llama2.c model (or any llama2.c ``.bin``), next-token loss,
  perplexity (distillation from the dense model is the callback's ``distillation=``).
* :class:`HFLlamaLM`: a Hugging Face ``LlamaForCausalLM`` built from a small config with random weights (no
  download), to show the same recipes on Hugging Face module names. Needs ``transformers`` (extra ``hf``).
* :class:`TinyStoriesDataModule`: TinyStories windows of the shared data, with disjoint story ranges for
  training, calibration and evaluation, and a ``calibration_dataloader`` the callback picks up by itself.

Validation and test log ``{stage}/loss`` and ``{stage}/ppl`` (token-weighted over the whole set, exactly as
:func:`pl_actsparse.tuning.objectives.perplexity`) and, when the model is sparsified, ``{stage}/ppl_dense``: the
same model with its sparsity switched off for that pass, so the cost of sparsity is in one table.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchmetrics.text import Perplexity

from pl_actsparse.api import install_sparsifiers_from_state_dict
from pl_actsparse.demos.tinystories import TokenWindows, load_stories, resolve_data_dir
from pl_actsparse.demos.llama2c import Llama2cTokenizer, load_llama2c_checkpoint
from pl_actsparse.core.layer import activation_sparsity_disabled, sparsified_layers

from pl_actsparse.calibrate.running import logits_of  # the one logits-out-of-an-output helper

__all__ = ["CausalLMModule", "TinyStoriesLM", "HFLlamaLM", "TinyStoriesDataModule", "EpochShuffleSampler"]


class CausalLMModule(LightningModule):
    """Next-token training and evaluation shared by the shipped models; subclasses set ``self.model``.

    Args:
        learning_rate: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
        min_lr_ratio: cosine decay from the peak to ``min_lr_ratio * peak`` over the run's steps (1.0: constant).
        log_dense_perplexity: also log ``{stage}/ppl_dense`` when the model is sparsified.
    """

    model: nn.Module

    def __init__(
        self, learning_rate: float = 5e-4, weight_decay: float = 0.0, warmup_steps: int = 0, min_lr_ratio: float = 1.0,
        log_dense_perplexity: bool = True,
    ) -> None:
        super().__init__()
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.log_dense_perplexity = log_dense_perplexity
        self.ppl = nn.ModuleDict({s: Perplexity() for s in ("val", "test")})
        self.ppl_dense = nn.ModuleDict({s: Perplexity() for s in ("val", "test")})

    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits ``[B, T, vocab]``."""
        return logits_of(self.model(input_ids))

    def calibration_inputs(self, batch: Any) -> Tensor:
        """What :class:`~pl_actsparse.ActivationSparsityCallback` feeds ``forward`` when calibrating."""
        return batch[0] if isinstance(batch, (tuple, list)) else batch

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        ce = F.cross_entropy(self(x).float().flatten(0, 1), y.flatten())
        self.log("train/loss", ce, prog_bar=True)
        return ce

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self(x)
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        self.ppl[stage].update(logits.float(), y)
        self.log(f"{stage}/loss", nll / y.numel(), batch_size=y.numel(), sync_dist=True)
        self.log(f"{stage}/ppl", self.ppl[stage], prog_bar=True)
        if self.log_dense_perplexity and any(True for _ in sparsified_layers(self.model)):
            with activation_sparsity_disabled(self.model):
                dense = self(x)
            self.ppl_dense[stage].update(dense.float(), y)
            self.log(f"{stage}/ppl_dense", self.ppl_dense[stage])
        return nll

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Per-window mean next-token NLL (with targets) and the greedy next tokens."""
        x = self.calibration_inputs(batch)
        logits = self(x)
        out = {"next_tokens": logits.argmax(-1)}
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            y = batch[1]
            nll = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")
            out["nll"] = nll.mean(-1)
        return out

    def configure_optimizers(self) -> Any:
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.learning_rate, betas=(0.9, 0.95),
        )
        if self.warmup_steps == 0 and self.min_lr_ratio == 1.0:
            return optimizer
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else float("inf")
        warm, floor = self.warmup_steps, self.min_lr_ratio

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            if not math.isfinite(total) or total <= warm:
                return 1.0
            p = min(1.0, (step - warm) / max(1, total - warm))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A sparsified checkpoint loads into a fresh module (load_from_checkpoint, or a Trainer without the
        # callback): install the sparsifiers it holds so strict loading restores thresholds and state.
        install_sparsifiers_from_state_dict(self, checkpoint.get("state_dict", {}))


class TinyStoriesLM(CausalLMModule):
    """A llama2.c model (default: the shipped stories260K) as a LightningModule.

    Args:
        checkpoint: a llama2.c ``.bin`` file; default ``stories260K.bin`` in the data directory
            (``$PL_ACTSPARSE_DATA`` or ``../shared/data``).
        **kwargs: training options of :class:`CausalLMModule`.
    """

    def __init__(self, checkpoint: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.checkpoint_file = str(checkpoint) if checkpoint is not None else None
        self.model = load_llama2c_checkpoint(self.checkpoint_file).train()  # None: the data directory's stories260K.bin


_HF_DEFAULT_CONFIG: dict[str, Any] = {
    "vocab_size": 512, "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 8,
    "num_key_value_heads": 4, "max_position_embeddings": 512, "tie_word_embeddings": True,
}


class HFLlamaLM(CausalLMModule):
    """A Hugging Face ``LlamaForCausalLM`` built from a config (random weights, nothing downloaded).

    Module names are Hugging Face's (``model.model.layers.0.mlp.up_proj`` from the LightningModule), so the
    seed patterns ``.*up_proj`` etc. select the same projections as on the llama2.c model.

    Args:
        config: ``LlamaConfig`` fields; unspecified ones take a small default (vocab 512 for tok512).
        seed: seed of the random initialisation.
        **kwargs: training options of :class:`CausalLMModule`.
    """

    def __init__(self, config: dict[str, Any] | None = None, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        try:
            from transformers import LlamaConfig, LlamaForCausalLM
        except ImportError as exc:  # pragma: no cover - exercised only without the extra
            raise ImportError("HFLlamaLM needs transformers: pip install 'pl-actsparse[hf]'") from exc
        fields = {**_HF_DEFAULT_CONFIG, **(config or {})}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = LlamaForCausalLM(LlamaConfig(**fields))

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


class EpochShuffleSampler(RandomSampler):
    """A permutation per epoch from ``seed + epoch``, so a resumed fit sees the same order as an
    uninterrupted one (Lightning calls ``set_epoch``; under DDP it is replaced by a shuffling
    ``DistributedSampler``, which does the same per rank)."""

    def __init__(self, data_source: Dataset, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):  # type: ignore[override]
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=g).tolist()


class TinyStoriesDataModule(LightningDataModule):
    """TinyStories validation stories (the shared data), cut into disjoint ``seq_len``-token windows.

    Story ranges are ``[start, stop)`` indices into the 1000 stories; by default training (300-999),
    calibration (150-299) and evaluation (0-149) are disjoint. ``calibration_dataloader`` is picked up by
    :class:`~pl_actsparse.ActivationSparsityCallback` with ``calibration_source="auto"``; its batches are
    ``(input, target)`` pairs like the others.

    Args:
        data_dir: the data folder (default: ``$PL_ACTSPARSE_DATA`` or ``../shared/data``).
        seq_len: tokens per window (inputs; targets are shifted by one).
        batch_size: training batch size; ``eval_batch_size`` / ``calibration_batch_size`` for the others.
        train_stories, calibration_stories, val_stories, test_stories, predict_stories: story ranges.
        max_train_windows, max_eval_windows, max_calibration_windows: caps (tests, quick runs).
        shuffle: shuffle training windows, a permutation per epoch from ``seed + epoch`` (same on every rank,
            same after resuming).
        num_workers: DataLoader workers (the data is a tensor in memory: 0 is fine).
    """

    def __init__(
        self, data_dir: str | None = None, seq_len: int = 256, batch_size: int = 16, eval_batch_size: int = 16,
        calibration_batch_size: int = 8, train_stories: tuple[int, int] = (300, 1000),
        calibration_stories: tuple[int, int] = (150, 300), val_stories: tuple[int, int] = (0, 150),
        test_stories: tuple[int, int] = (0, 150), predict_stories: tuple[int, int] = (0, 10),
        max_train_windows: int | None = None, max_eval_windows: int | None = None,
        max_calibration_windows: int | None = None, shuffle: bool = True, seed: int = 0, num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size), ("calibration_batch_size", calibration_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.calibration_batch_size = calibration_batch_size
        self.ranges = {
            "train": tuple(train_stories), "calibration": tuple(calibration_stories), "val": tuple(val_stories),
            "test": tuple(test_stories), "predict": tuple(predict_stories),
        }
        for name, r in self.ranges.items():
            if len(r) != 2 or not 0 <= r[0] < r[1]:
                raise ValueError(f"{name}_stories must be [start, stop) with 0 <= start < stop, got {list(r)}")
        self.limits = {
            "train": max_train_windows, "calibration": max_calibration_windows, "val": max_eval_windows,
            "test": max_eval_windows, "predict": max_eval_windows,
        }
        self.shuffle = shuffle
        self.seed = seed
        self.num_workers = num_workers
        self._cache: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self._tokenizer: Llama2cTokenizer | None = None

    @property
    def tokenizer(self) -> Llama2cTokenizer:
        """The tokenizer of the data folder's ``tok512.bin`` (loaded once)."""
        if self._tokenizer is None:
            self._tokenizer = Llama2cTokenizer.from_file(resolve_data_dir(self.data_dir) / "tok512.bin")
        return self._tokenizer

    def dataset(self, split: str) -> list[tuple[Tensor, Tensor]]:
        """The (input, target) windows of one split (``LongTensor[seq_len]`` each), built on first use (any stage
        can ask for any split)."""
        if split not in self._cache:
            stories = load_stories(resolve_data_dir(self.data_dir), *self.ranges[split])
            windows = TokenWindows(stories, self.tokenizer, self.seq_len, max_windows=self.limits[split])
            if len(windows) == 0:
                raise ValueError(f"{split}_stories {list(self.ranges[split])} give no window of {self.seq_len + 1} tokens")
            self._cache[split] = windows.pairs()
        return self._cache[split]

    def _loader(self, split: str, batch_size: int, shuffle: bool = False) -> DataLoader:
        dataset = self.dataset(split)
        return DataLoader(
            dataset, batch_size=batch_size, sampler=EpochShuffleSampler(dataset, self.seed) if shuffle else None,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=self.shuffle)

    def calibration_dataloader(self) -> DataLoader:
        return self._loader("calibration", self.calibration_batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", self.eval_batch_size)
