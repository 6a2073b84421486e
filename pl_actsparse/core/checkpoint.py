"""The one reader and parser of saved activation sparsity.

Every place that reads sparsified layers out of a state dict (``load_activation_sparsity``, the Lightning
callback's ``install_sparsifiers_from_state_dict``, ``model_report`` on a checkpoint) goes through
:func:`read_state_dict` and :func:`saved_sparsifiers`, so the same input gives the same answer and the same
error (:class:`~pl_actsparse.errors.CheckpointError`) everywhere.

A sparsified layer ``name`` is saved as ``name.activation_threshold`` (a tensor: 0-dim, or ``[in_features]``
per channel) and ``name._extra_state`` (the sparsifier state, see
:func:`pl_actsparse.core.layer.encode_sparsifier_state`), next to its ``weight``/``bias``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from pl_actsparse.core.layer import STATE_KEY, THRESHOLD_BUFFER, decode_sparsifier_state
from pl_actsparse.errors import CheckpointError

__all__ = ["SavedSparsifier", "read_state_dict", "saved_sparsifiers"]

_HF_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class SavedSparsifier:
    """One sparsified layer found in a state dict.

    ``name``: qualified module name relative to the model (prefix removed); ``threshold``: the saved
    tensor; ``state``: the decoded sparsifier state (see
    :func:`~pl_actsparse.core.layer.decode_sparsifier_state`), ``None`` when the state dict has none.
    """

    name: str
    threshold: torch.Tensor
    state: dict[str, Any] | None

    def key(self, suffix: str) -> str:
        """The state-dict key of this layer's ``suffix`` entry (``weight``, ``bias`` ...)."""
        return f"{self.name}.{suffix}" if self.name else suffix


def read_state_dict(source: Any, *, prefix: str = "") -> dict[str, Any]:
    """A flat state dict from ``source``, with ``prefix`` stripped (and keys without it dropped).

    ``source`` may be a mapping (a state dict, or a Lightning checkpoint dict with ``"state_dict"``), a
    ``torch.save`` file (loaded with ``weights_only=True``), a ``.safetensors`` file, or a folder written by
    HF ``save_pretrained`` (``model.safetensors``, sharded ``model.safetensors.index.json``, or
    ``pytorch_model.bin``). Raises :class:`~pl_actsparse.errors.CheckpointError` for a path that is none
    of these, ``FileNotFoundError`` for a path that does not exist.
    """
    if isinstance(source, (str, os.PathLike)):
        source = _read_path(Path(source))
    if not isinstance(source, Mapping):
        raise CheckpointError(f"expected a state dict, a checkpoint path or a save_pretrained folder, got {type(source).__qualname__}")
    if "state_dict" in source and isinstance(source["state_dict"], Mapping):
        source = source["state_dict"]
    if prefix:
        return {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
    return dict(source)


def _read_path(path: Path) -> Mapping[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    if path.is_dir():
        found = [f for f in _HF_FILES if (path / f).is_file()]
        if not found:
            raise CheckpointError(f"{str(path)!r} is a folder without any of {', '.join(_HF_FILES)} (not a save_pretrained folder)")
        path = path / found[0]
    if path.name.endswith(".index.json"):
        index = json.loads(path.read_text())
        out: dict[str, Any] = {}
        for shard in dict.fromkeys(index["weight_map"].values()):
            out.update(_read_path(path.parent / shard))
        return out
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors of all kinds: say which file and what would be valid
        raise CheckpointError(f"cannot read {str(path)!r} as a torch.save state dict, a .safetensors file or a "
                              f"save_pretrained folder: {type(e).__name__}: {e}") from e


def saved_sparsifiers(state_dict: Mapping[str, Any]) -> list[SavedSparsifier]:
    """Every sparsified layer of a flat state dict (see :func:`read_state_dict`), in key order.

    Raises :class:`~pl_actsparse.errors.CheckpointError` when a threshold is not a tensor, a state cannot be
    decoded, or a layer has a sparsifier state but no threshold (what is there cannot be a sparsified layer
    as saved). A threshold without state is returned with ``state=None``: the caller decides (an error under
    ``strict``, a warning otherwise).
    """
    out = []
    for key, value in state_dict.items():
        name, _, leaf = key.rpartition(".")  # ("", "", key) for a top-level entry
        if leaf != THRESHOLD_BUFFER:
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{key!r} must be a tensor, got {type(value).__qualname__}")
        skey = f"{name}.{STATE_KEY}" if name else STATE_KEY
        raw = state_dict.get(skey)
        try:
            state = None if raw is None else decode_sparsifier_state(raw)
        except CheckpointError as e:
            raise CheckpointError(f"{skey!r}: {e}") from None
        out.append(SavedSparsifier(name, value, state))
    seen = {entry.name for entry in out}
    for key in state_dict:
        name, _, leaf = key.rpartition(".")
        if leaf == STATE_KEY and name not in seen and _looks_like_sparsifier_state(state_dict[key]):
            raise CheckpointError(
                f"{key!r} holds a sparsifier state but the state dict has no {THRESHOLD_BUFFER!r} for "
                f"layer {name!r}: the layer cannot be restored as saved"
            )
    return out


def _looks_like_sparsifier_state(value: Any) -> bool:
    # Other modules may have extra state of their own; only ours is claimed.
    try:
        decode_sparsifier_state(value)
    except CheckpointError:
        return False
    return True
