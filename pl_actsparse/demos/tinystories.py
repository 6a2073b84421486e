"""Real evaluation text for the shipped model: finding it, splitting it, windowing it.

Sparsity is judged by how much it hurts a trained model on in-domain text, so the
measurement has to be reproducible to the third decimal: the same stories, the
same token stream and the same windowing every time. This module pins those
choices down (see ``shared/data/SOURCES.md`` for where the files come from).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal, Sequence

import torch
from torch.utils.data import Dataset

from pl_actsparse.config import check_choice
from pl_actsparse.demos.llama2c import Llama2cTokenizer
from pl_actsparse.demos.paths import DATA_ENV_VAR, resolve_data_dir

__all__ = ["DATA_ENV_VAR", "STORIES_FILE", "resolve_data_dir", "load_stories", "load_text", "TokenWindows"]

STORIES_FILE = "tinystories_valid_1000.txt"
_END_OF_TEXT = re.compile(r"^[ \t]*<\|endoftext\|>[ \t]*\r?$", flags=re.MULTILINE)
_TEXT_FILES = {"tinyshakespeare": "tinyshakespeare.txt", "tinystories": STORIES_FILE}


def load_stories(path: str | os.PathLike | None = None, start: int = 0, stop: int | None = None) -> list[str]:
    """TinyStories validation stories ``[start:stop]``, split on ``<|endoftext|>`` marker lines.

    Stories contain blank lines between paragraphs, which is why they are never
    split on blank lines. ``path`` is the data directory or the stories file itself.
    """
    file = Path(path) if path is not None and Path(path).is_file() else resolve_data_dir(path) / STORIES_FILE
    text = file.read_text(encoding="utf-8")
    stories = [s.strip() for s in _END_OF_TEXT.split(text)]
    stories = [s for s in stories if s]
    n = len(stories)
    for name, value in (("start", start), ("stop", stop)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= start <= n:
        raise ValueError(f"start={start} is out of range: {file.name} has {n} stories (valid start: 0..{n})")
    if stop is not None and not start <= stop <= n:
        raise ValueError(f"stop={stop} is out of range: need start={start} <= stop <= {n} ({file.name} has {n} stories)")
    return stories[start:stop]


def load_text(name: str = "tinyshakespeare", path: str | os.PathLike | None = None, max_chars: int | None = None) -> str:
    """A raw text file from the data directory, e.g. Shakespeare as out-of-domain control text.

    ``name`` is a known short name (``tinyshakespeare``, ``tinystories``) or a file
    name inside the data directory; paths outside it are refused.
    """
    base = resolve_data_dir(path)
    filename = _TEXT_FILES.get(name, name)
    if Path(filename).name != filename or filename in ("", ".", ".."):
        raise ValueError(f"load_text expects a file name inside the data directory, got {name!r}")
    file = base / filename
    if not file.is_file():
        available = sorted(p.name for p in base.glob("*.txt"))
        raise FileNotFoundError(f"{file} does not exist; text files in {base}: {available}")
    text = file.read_text(encoding="utf-8")
    if max_chars is not None:
        if max_chars < 0:
            raise ValueError(f"max_chars must be >= 0, got {max_chars}")
        text = text[:max_chars]
    return text


WindowMode = Literal["disjoint", "contiguous"]


class TokenWindows(Dataset):
    """Fixed-length next-token windows over one token stream, so perplexity is comparable across runs.

    Each story is encoded with BOS and no EOS (as the model was trained) and the
    stories are concatenated into one stream ``s`` of ``len(s)`` tokens. Window
    ``i`` is ``s[i*stride : i*stride + seq_len + 1]``; its input is ``[:-1]`` and
    its target ``[1:]``.

    * ``mode="disjoint"`` (default): ``stride = seq_len + 1`` and only complete
      windows, i.e. the stream is cut into non-overlapping ``seq_len + 1``-token
      pieces and the tail is dropped. ``len(s) // (seq_len + 1)`` windows, each
      predicting ``seq_len`` tokens (the first token of every window is only
      context). First 150 stories, ``seq_len=256``: 194 windows, perplexity 3.758.
    * ``mode="contiguous"``: ``stride = seq_len``; inputs tile the stream and each
      window's last target is the next window's first input, so every token but
      the first is predicted exactly once; the last window may be shorter. This is
      the convention of SOURCES.md: first 150 stories, ``seq_len=512``: 98
      windows, 50,072 predicted tokens, perplexity 3.665.

    ``dataset[i]`` is the input ``LongTensor[seq_len]`` (for calibration);
    :meth:`pair` gives ``(input, target)`` for perplexity.
    """

    def __init__(
        self, stories: Sequence[str], tokenizer: Llama2cTokenizer, seq_len: int, mode: WindowMode = "disjoint",
        max_windows: int | None = None,
    ) -> None:
        if isinstance(stories, str):
            raise TypeError("stories must be a sequence of strings; wrap a single text as [text]")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        check_choice(mode, "mode", ("disjoint", "contiguous"), ValueError)
        ids: list[int] = []
        for story in stories:
            ids.extend(tokenizer.encode(story, bos=True, eos=False))
        self.tokens = torch.tensor(ids, dtype=torch.long)
        self.seq_len = seq_len
        self.mode: WindowMode = mode
        self.stride = seq_len + 1 if mode == "disjoint" else seq_len
        # complete windows only (disjoint), or every token but the first predicted once (contiguous: ceil((n - 1) / stride))
        n = len(ids) // self.stride if mode == "disjoint" else max(0, -(-(len(ids) - 1) // self.stride))
        self._n = n if max_windows is None else min(n, max_windows)

    def __len__(self) -> int:
        return self._n

    def _bounds(self, index: int) -> tuple[int, int]:
        if index < 0:
            index += self._n
        if not 0 <= index < self._n:
            raise IndexError(f"window {index} out of range for {self._n} windows")
        a = index * self.stride
        return a, min(a + self.seq_len + 1, len(self.tokens))

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.pair(index)[0]

    def pair(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input, target)`` of one window; target is input shifted left by one token."""
        a, b = self._bounds(index)
        return self.tokens[a : b - 1], self.tokens[a + 1 : b]

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """All ``(input, target)`` pairs, in order."""
        return [self.pair(i) for i in range(self._n)]

    @property
    def num_predicted(self) -> int:
        """Number of target tokens over all windows (the perplexity denominator)."""
        return sum(self._bounds(i)[1] - self._bounds(i)[0] - 1 for i in range(self._n))

    def __repr__(self) -> str:
        return (
            f"TokenWindows(windows={self._n}, seq_len={self.seq_len}, mode={self.mode!r}, "
            f"tokens={len(self.tokens)}, predicted={self.num_predicted})"
        )
