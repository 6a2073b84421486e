"""Demos on the shipped stories260K model (``python -m pl_actsparse.demos {run,generate,sweep,report}``).

Nothing in the library imports this package. :data:`SEED_RECIPE` and :func:`calibration_batches` are the one
seed recipe and the one calibration batching of the demos (and of ``benchmarks/``).
"""

from __future__ import annotations

import os

import torch

from pl_actsparse.core.scopes import TargetScope

__all__ = ["SEED_RECIPE", "calibration_batches"]

#: The seed recipe: the inputs of up_proj/gate_proj at 30 % sparsity, of down_proj at 50 %
#: (the same scopes as ``recipes/stories260k_training_free.yaml``).
SEED_RECIPE = {TargetScope(patterns=[".*up_proj", ".*gate_proj"]): 0.3, TargetScope(patterns=[".*down_proj"]): 0.5}


def calibration_batches(
    start: int, stop: int, seq_len: int = 256, batch_size: int = 8, tokenizer: object | None = None, data_dir: str | os.PathLike | None = None
) -> list[torch.Tensor]:
    """TinyStories ``start..stop`` as ``seq_len``-token windows stacked in batches of ``batch_size``: a list of
    ``LongTensor [batch_size, seq_len]`` (the last batch may be smaller). ``tokenizer`` defaults to ``tok512.bin``
    of the data directory (``data_dir``, see :func:`~pl_actsparse.demos.paths.resolve_data_dir`)."""
    from pl_actsparse.demos.llama2c import Llama2cTokenizer
    from pl_actsparse.demos.tinystories import TokenWindows, load_stories, resolve_data_dir

    tok = tokenizer or Llama2cTokenizer.from_file(resolve_data_dir(data_dir) / "tok512.bin")
    windows = TokenWindows(load_stories(data_dir, start=start, stop=stop), tok, seq_len)
    xs = [windows[i] for i in range(len(windows))]
    return [torch.stack(xs[i : i + batch_size]) for i in range(0, len(xs), batch_size)]
