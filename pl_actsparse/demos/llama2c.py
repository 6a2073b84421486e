"""A real, tiny Llama to measure activation sparsity on, read from llama2.c files.

The sparsity methods in this package need a *trained* model whose MLP activations
have real structure; random weights tell nothing about accuracy. Karpathy's
``stories260K`` (a 260K-parameter Llama-2 trained on TinyStories) is small enough
to ship and to test on CPU in seconds, so this module reads the llama2.c
checkpoint and tokenizer formats (see ``shared/data/SOURCES.md``) into a plain
PyTorch model whose module names follow Hugging Face's ``LlamaForCausalLM``
(``layers.N.mlp.down_proj`` ...), so the same sparsification code can target
either.

Everything here was written from the format description; no llama2.c code is used.
"""

from __future__ import annotations

import math
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pl_actsparse.core.module_state import preserved_modes

__all__ = [
    "Llama2cConfig", "RMSNorm", "Llama2cAttention", "Llama2cMLP", "Llama2cDecoderLayer", "KVCache", "Llama2cModel",
    "apply_rope", "read_llama2c_config", "load_llama2c_checkpoint", "save_llama2c_checkpoint", "Llama2cTokenizer",
    "greedy_generate",
]

_V1_MAGIC = 0x616B3432  # "ak42" read as a little-endian uint32
_V1_HEADER_BYTES = 256
_V0_HEADER_BYTES = 28
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)  # sdpa(enable_gqa=...)


# --------------------------------------------------------------------------- config


@dataclass
class Llama2cConfig:
    """The seven llama2.c header numbers plus the two constants llama2.c hard-codes.

    Kept as one object so a model can be rebuilt (and a file re-written) from it
    without the checkpoint at hand, e.g. random-weight models for speed benchmarks.
    """

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"Llama2cConfig.{name} must be a positive int, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_size % 2:
            raise ValueError(f"head_size={self.head_size} must be even for rotary embeddings")

    @property
    def head_size(self) -> int:
        """Per-head width; RoPE rotates pairs inside it."""
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        """Output width of k_proj / v_proj under grouped-query attention."""
        return self.n_kv_heads * self.head_size

    def num_parameters(self) -> int:
        """Parameter count (tied head counted once), to check headers and configs without building."""
        d, h, L, v = self.dim, self.hidden_dim, self.n_layers, self.vocab_size
        per_layer = 2 * d + d * d * 2 + 2 * d * self.kv_dim + 3 * d * h
        return v * d + L * per_layer + d + (0 if self.shared_classifier else v * d)

    @classmethod
    def stories260k(cls) -> "Llama2cConfig":
        """Shapes of the shipped ``stories260K.bin``, for building look-alikes without the file."""
        return cls(dim=64, hidden_dim=172, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, seq_len=512)

    @classmethod
    def tinyllama_1b(cls) -> "Llama2cConfig":
        """TinyLlama-1.1B shapes (1,100,048,384 parameters), for realistic decode-speed benchmarks."""
        return cls(
            dim=2048, hidden_dim=5632, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, seq_len=2048,
            shared_classifier=False,
        )


# --------------------------------------------------------------------------- model


class RMSNorm(nn.Module):
    """llama2.c's RMSNorm; normalises in fp32 so fp16/bf16 models do not lose the statistic."""

    def __init__(self, dim: int, eps: float = 1e-5, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def _rope_tables(config: Llama2cConfig, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of ``pos * theta^(-2i/head_size)`` in fp32, exactly as the model was trained with.

    Computed the fp32 way of the original PyTorch training code, so the tables are
    bit-identical to the ``freq_cis`` arrays stored in legacy checkpoints.
    """
    hs = config.head_size
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hs, 2, device=device)[: hs // 2].float() / hs))
    pos = torch.arange(config.seq_len, device=device).float()
    angles = torch.outer(pos, inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x: [B, T, H, hs] by the angles in cos/sin: [T, hs/2]."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c = cos[:, None, :]
    s = sin[:, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).type_as(x)


class KVCache:
    """Pre-allocated per-layer keys/values so decoding costs one [B, 1, dim] pass per token.

    Shapes are ``[B, n_kv_heads, max_len, head_size]`` (rotated keys). ``length``
    is the number of positions filled so far.
    """

    def __init__(
        self, config: Llama2cConfig, batch_size: int = 1, max_len: int | None = None,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        max_len = config.seq_len if max_len is None else max_len
        if not 0 < max_len <= config.seq_len:
            raise ValueError(f"max_len must be in [1, {config.seq_len}], got {max_len}")
        shape = (batch_size, config.n_kv_heads, max_len, config.head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v ([B, KV, T, hs]) at ``start_pos`` and return everything up to the new end."""
        end = start_pos + k.shape[2]
        if k.shape[0] != self.batch_size:
            raise ValueError(f"cache was built for batch {self.batch_size}, got batch {k.shape[0]}")
        if end > self.max_len:
            raise ValueError(f"positions up to {end} do not fit a cache of max_len {self.max_len}")
        self.k[layer][:, :, start_pos:end] = k
        self.v[layer][:, :, start_pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Llama2cAttention(nn.Module):
    """Grouped-query causal attention with interleaved RoPE, HF-named projections."""

    def __init__(self, config: Llama2cConfig, layer_idx: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.layer_idx = layer_idx
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_size = config.head_size
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_size, **kw)
        self.k_proj = nn.Linear(config.dim, config.kv_dim, **kw)
        self.v_proj = nn.Linear(config.dim, config.kv_dim, **kw)
        self.o_proj = nn.Linear(config.n_heads * config.head_size, config.dim, **kw)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_size)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_size)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_size)
        q = apply_rope(q, cos, sin).transpose(1, 2)
        k = apply_rope(k, cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, start_pos)
        S = k.shape[2]
        mask = None
        is_causal = False
        if T == S:
            is_causal = bool(T > 1)  # a Python bool also when tracing (torch.jit.trace gives shapes as tensors)
        elif T > 1:  # a chunk after cached positions: query i sees keys <= S - T + i
            i = torch.arange(T, device=x.device)[:, None]
            j = torch.arange(S, device=x.device)[None, :]
            mask = j <= (S - T) + i
        gqa = {"enable_gqa": True} if self.n_kv_heads != self.n_heads and _SDPA_HAS_GQA else {}
        if self.n_kv_heads != self.n_heads and not gqa:  # older torch: query head h reads kv head h // n_rep
            k, v = (t.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, **gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_size))


class Llama2cMLP(nn.Module):
    """SwiGLU feed-forward, ``down(silu(gate(x)) * up(x))``; down_proj's input is the sparsity target."""

    def __init__(self, config: Llama2cConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(config.dim, config.hidden_dim, **kw)  # llama2.c w1
        self.up_proj = nn.Linear(config.dim, config.hidden_dim, **kw)  # llama2.c w3
        self.down_proj = nn.Linear(config.hidden_dim, config.dim, **kw)  # llama2.c w2
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        up = self.up_proj(x)
        return self.down_proj(self.act_fn(gate) * up)


class Llama2cDecoderLayer(nn.Module):
    """Pre-norm residual block, laid out like HF's LlamaDecoderLayer."""

    def __init__(self, config: Llama2cConfig, layer_idx: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps, device=device, dtype=dtype)
        self.self_attn = Llama2cAttention(config, layer_idx, device=device, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps, device=device, dtype=dtype)
        self.mlp = Llama2cMLP(config, device=device, dtype=dtype)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0,
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start_pos)
        return h + self.mlp(self.post_attention_layernorm(h))


class Llama2cModel(nn.Module):
    """Plain-PyTorch Llama-2 matching llama2.c's forward pass, with HF-style module names.

    ``forward(input_ids)`` returns logits ``[B, T, vocab]``. Pass a :class:`KVCache`
    (see :meth:`new_cache`) and ``start_pos`` to run incrementally. Works after
    ``.to(torch.float16 / torch.bfloat16)``; the RoPE tables stay fp32.
    """

    def __init__(self, config: Llama2cConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim, device=device, dtype=dtype)
        self.layers = nn.ModuleList(
            Llama2cDecoderLayer(config, i, device=device, dtype=dtype) for i in range(config.n_layers)
        )
        self.norm = RMSNorm(config.dim, config.norm_eps, device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False, device=device, dtype=dtype)
        self.tie_weights()
        cos, sin = _rope_tables(config, device=self.embed_tokens.weight.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # .to(dtype)/.half()/to_empty() would round or wipe the RoPE tables; rebuild them in fp32.
        super()._apply(fn, recurse)
        self._rebuild_rope()
        return self

    def _rebuild_rope(self, device: torch.device | None = None) -> None:
        cos, sin = _rope_tables(self.config, device=self.rope_cos.device if device is None else device)
        self.rope_cos, self.rope_sin = cos, sin

    def tie_weights(self) -> None:
        """Re-share lm_head with the embedding (needed after assigning new parameters)."""
        if self.config.shared_classifier:
            self.lm_head.weight = self.embed_tokens.weight

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        """A KV cache on this model's device and dtype, for :meth:`forward` with ``cache=``."""
        w = self.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len, device=w.device, dtype=w.dtype)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0) -> torch.Tensor:
        """Logits for every input position; with ``cache`` the keys/values of earlier calls are reused."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        if start_pos < 0 or start_pos + T > self.config.seq_len:
            raise ValueError(
                f"positions {start_pos}..{start_pos + T - 1} exceed the model's seq_len {self.config.seq_len}"
            )
        cos = self.rope_cos[start_pos : start_pos + T]
        sin = self.rope_sin[start_pos : start_pos + T]
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, start_pos)
        if cache is not None:
            cache.length = start_pos + T
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, stop_ids: Iterable[int] = ()) -> torch.Tensor:
        """Greedy decoding with a KV cache: one prompt pass, then one ``[B, 1]`` pass per token.

        Returns ``[B, T + n]`` (prompt included). Stops early only once every row has
        produced a token in ``stop_ids`` (that token is kept); it also stops when the
        next token would need a position beyond ``seq_len`` (the last position's
        prediction is still returned, as llama2.c does).
        """
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        B, T = input_ids.shape
        if T < 1:
            raise ValueError("generate needs at least one prompt token (e.g. BOS)")
        n = min(max_new_tokens, self.config.seq_len - T + 1)
        if n <= 0:
            return input_ids.clone()
        with preserved_modes(self):
            self.eval()
            cache = self.new_cache(B, max_len=T + n - 1)  # positions actually fed
            stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=input_ids.device)
            done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
            out = [input_ids]
            logits = self(input_ids, cache=cache, start_pos=0)[:, -1]
            for step in range(n):
                nxt = logits.argmax(-1)
                out.append(nxt[:, None])
                if stops.numel():
                    done |= torch.isin(nxt, stops)
                    if bool(done.all()):
                        break
                if step == n - 1:
                    break
                logits = self(nxt[:, None], cache=cache, start_pos=T + step)[:, -1]
            return torch.cat(out, dim=1)


# --------------------------------------------------------------------------- checkpoint I/O


#: llama2.c array -> the module of each Llama2cModel layer whose weight it stacks (one slice per layer)
_LAYER_ARRAYS = {
    "rms_att": "input_layernorm", "wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
    "wo": "self_attn.o_proj", "rms_ffn": "post_attention_layernorm", "w1": "mlp.gate_proj", "w2": "mlp.down_proj",
    "w3": "mlp.up_proj",
}


def _checked_header(values: Sequence[int], path: Path, version: int, shared: bool | None = None) -> Llama2cConfig:
    # the header's order: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size (< 0: own classifier), seq_len
    try:
        return Llama2cConfig(*values[:5], vocab_size=abs(values[5]), seq_len=values[6],
                             shared_classifier=values[5] > 0 if shared is None else shared)
    except ValueError as exc:
        raise ValueError(f"{path}: not a llama2.c version-{version} checkpoint, header {tuple(values)}: {exc}") from None


def _read_header(path: Path) -> tuple[Llama2cConfig, int, int]:
    """(config, version, header bytes) from the first bytes of a llama2.c checkpoint."""
    with open(path, "rb") as f:
        head = f.read(_V1_HEADER_BYTES)
    if len(head) < _V0_HEADER_BYTES:
        raise ValueError(f"{path}: {len(head)} bytes is too short for a llama2.c header")
    (magic,) = struct.unpack_from("<I", head, 0)
    if magic == _V1_MAGIC:
        if len(head) < _V1_HEADER_BYTES:
            raise ValueError(f"{path}: version-1 header needs {_V1_HEADER_BYTES} bytes, file has {len(head)}")
        (version,) = struct.unpack_from("<i", head, 4)
        if version != 1:
            raise ValueError(f"{path}: llama2.c export version {version} is not supported (only 0 and 1)")
        values = struct.unpack_from("<7i", head, 8)
        (shared,) = struct.unpack_from("<B", head, 36)
        if shared not in (0, 1):
            raise ValueError(f"{path}: shared_classifier flag is {shared}, expected 0 or 1")
        if values[5] <= 0:
            raise ValueError(f"{path}: version-1 header has vocab_size {values[5]}, expected > 0")
        return _checked_header(values, path, 1, bool(shared)), 1, _V1_HEADER_BYTES
    values = struct.unpack_from("<7i", head, 0)
    return _checked_header(values, path, 0), 0, _V0_HEADER_BYTES


def _tensor_layout(config: Llama2cConfig, version: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the fp32 arrays after the header, in file order."""
    c = config
    L, d, h, v, kv = c.n_layers, c.dim, c.hidden_dim, c.vocab_size, c.kv_dim
    qd = c.n_heads * c.head_size
    mats = [("wq", (L, qd, d)), ("wk", (L, kv, d)), ("wv", (L, kv, d)), ("wo", (L, d, qd))]
    ffn = [("w1", (L, h, d)), ("w2", (L, d, h)), ("w3", (L, h, d))]
    if version == 0:
        layout = [("tok_embeddings", (v, d)), ("rms_att", (L, d)), *mats, ("rms_ffn", (L, d)), *ffn,
                  ("rms_final", (d,)), ("freq_cis_real", (c.seq_len, c.head_size // 2)),
                  ("freq_cis_imag", (c.seq_len, c.head_size // 2))]
    else:  # version 1 (_read_header and save_llama2c_checkpoint accept no other)
        layout = [("rms_att", (L, d)), ("rms_ffn", (L, d)), ("rms_final", (d,)),
                  ("tok_embeddings", (v, d)), *mats, *ffn]
    if not c.shared_classifier:
        layout.append(("wcls", (v, d)))
    return layout


def read_llama2c_config(path: str | os.PathLike | None = None) -> Llama2cConfig:
    """Header of a llama2.c checkpoint as a config, without reading the weights."""
    return _read_header(_default_path(path, "stories260K.bin"))[0]


def _default_path(path: str | os.PathLike | None, filename: str) -> Path:
    if path is not None:
        return Path(path)
    from pl_actsparse.demos.paths import resolve_data_dir

    return resolve_data_dir() / filename


def load_llama2c_checkpoint(
    path: str | os.PathLike | None = None, *, device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Llama2cModel:
    """Read a llama2.c ``.bin`` (legacy v0 or "ak42" v1) into a :class:`Llama2cModel` in eval mode.

    The file size must match the header exactly, so a truncated download or a file
    in another layout is rejected instead of silently producing garbage weights.
    """
    path = _default_path(path, "stories260K.bin")
    if sys.byteorder != "little":  # pragma: no cover
        raise RuntimeError("llama2.c checkpoints are little-endian; big-endian hosts are not supported")
    config, version, header_bytes = _read_header(path)
    layout = _tensor_layout(config, version)
    expected = header_bytes + 4 * sum(math.prod(shape) for _, shape in layout)
    actual = path.stat().st_size
    if actual != expected:
        raise ValueError(
            f"{path}: file is {actual:,} bytes but its version-{version} header (dim={config.dim}, "
            f"hidden_dim={config.hidden_dim}, n_layers={config.n_layers}, n_heads={config.n_heads}, "
            f"n_kv_heads={config.n_kv_heads}, vocab_size={config.vocab_size}, seq_len={config.seq_len}, "
            f"shared_classifier={config.shared_classifier}) implies {expected:,} bytes"
        )
    data = bytearray(path.read_bytes())
    flat = torch.frombuffer(data, dtype=torch.float32, offset=header_bytes)
    arrays = {name: t.view(shape) for (name, shape), t in zip(layout, flat.split([math.prod(s) for _, s in layout]))}

    sd: dict[str, torch.Tensor] = {"embed_tokens.weight": arrays["tok_embeddings"], "norm.weight": arrays["rms_final"]}
    for i in range(config.n_layers):
        for src, module in _LAYER_ARRAYS.items():
            sd[f"layers.{i}.{module}.weight"] = arrays[src][i]
    sd["lm_head.weight"] = arrays["tok_embeddings"] if config.shared_classifier else arrays["wcls"]
    sd = {k: t.clone() for k, t in sd.items()}  # own storage, not views of the file buffer

    model = Llama2cModel(config, device="meta")
    model.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()
    model._rebuild_rope(torch.device("cpu"))
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model.eval()


def save_llama2c_checkpoint(model: Llama2cModel, path: str | os.PathLike, version: int = 0) -> None:
    """Write a model as a llama2.c v0 (legacy) or v1 ("ak42") file, for round-trips and tools.

    Weights are written as little-endian fp32 whatever the model's dtype.
    """
    if version not in (0, 1):
        raise ValueError(f"version must be 0 or 1, got {version}")
    c = model.config

    def f32(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float32)

    cos, sin = _rope_tables(c)
    arrays = {src: torch.stack([f32(layer.get_submodule(m).weight) for layer in model.layers]) for src, m in _LAYER_ARRAYS.items()}
    arrays |= {"tok_embeddings": f32(model.embed_tokens.weight), "rms_final": f32(model.norm.weight),
               "freq_cis_real": cos, "freq_cis_imag": sin, "wcls": f32(model.lm_head.weight)}
    params = (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads)
    if version == 0:
        vocab = c.vocab_size if c.shared_classifier else -c.vocab_size
        header = struct.pack("<7i", *params, vocab, c.seq_len)
    else:
        header = struct.pack("<Ii7iB", _V1_MAGIC, 1, *params, c.vocab_size, c.seq_len, int(c.shared_classifier))
        header += b"\0" * (_V1_HEADER_BYTES - len(header))
    with open(path, "wb") as f:
        f.write(header)
        for name, shape in _tensor_layout(c, version):
            t = arrays[name]
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, config implies {shape}")
            f.write(t.contiguous().numpy().astype("<f4", copy=False).tobytes())


# --------------------------------------------------------------------------- tokenizer

_SPACE_SPLIT = re.compile(r"(?= )")


class Llama2cTokenizer:
    """llama2.c's greedy BPE (SentencePiece-compatible for these vocabularies), from ``tokenizer.bin``.

    Needed because the model's numbers (perplexity, sparsity statistics) are only
    meaningful on the exact token ids it was trained with. Encoding merges the
    highest-scoring adjacent pair until none is in the vocabulary; when no piece has
    a space after its first byte, no merge can cross a space, so text is encoded per
    space-led chunk with a cache (identical ids, linear time on long text).
    """

    def __init__(
        self, pieces: Sequence[bytes], scores: Sequence[float], max_token_length: int | None = None, bos_id: int = 1,
        eos_id: int = 2,
    ) -> None:
        if len(pieces) != len(scores):
            raise ValueError(f"{len(pieces)} pieces but {len(scores)} scores")
        self.pieces: list[bytes] = [bytes(p) for p in pieces]
        self.scores: list[float] = [float(s) for s in scores]
        self.max_token_length = max_token_length or max(len(p) for p in self.pieces)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self._lookup = {p: i for i, p in reversed(list(enumerate(self.pieces)))}  # a repeated piece: its first id
        # byte fallback: id = byte + 3 in llama2.c vocabularies; verify rather than assume
        self._byte_ids: list[int] | None = None
        self._out_bytes = list(self.pieces)  # what decode writes: the byte itself for the (verified) byte pieces
        if len(self.pieces) >= 259 and all(self.pieces[b + 3] == b"<0x%02X>" % b for b in range(256)):
            self._byte_ids = [b + 3 for b in range(256)]
            self._out_bytes[3:259] = [bytes([b]) for b in range(256)]
        self.chunked = not any(b" " in p[1:] for p in self.pieces)
        self._cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def from_file(cls, path: str | os.PathLike | None = None) -> "Llama2cTokenizer":
        """Read a llama2.c ``tokenizer.bin`` (default: ``tok512.bin`` in the data directory)."""
        path = _default_path(path, "tok512.bin")
        data = Path(path).read_bytes()
        if len(data) < 4:
            raise ValueError(f"{path}: too short for a llama2.c tokenizer ({len(data)} bytes)")
        (max_len,) = struct.unpack_from("<i", data, 0)
        off = 4
        pieces: list[bytes] = []
        scores: list[float] = []
        while off < len(data):
            if off + 8 > len(data):
                raise ValueError(f"{path}: truncated record header at byte {off}")
            score, n = struct.unpack_from("<fi", data, off)
            off += 8
            if n < 0 or off + n > len(data):
                raise ValueError(f"{path}: record {len(pieces)} claims {n} bytes at byte {off}, file has {len(data)}")
            pieces.append(data[off : off + n])
            scores.append(score)
            off += n
        if len(pieces) < 3:
            raise ValueError(f"{path}: only {len(pieces)} tokens")
        return cls(pieces, scores, max_token_length=max_len)

    @property
    def vocab_size(self) -> int:
        """Number of pieces; must equal the model's vocab_size."""
        return len(self.pieces)

    def _symbols(self, text: str) -> list[int]:
        ids: list[int] = []
        for ch in text:
            b = ch.encode("utf-8")
            i = self._lookup.get(b)
            if i is not None:
                ids.append(i)
            elif self._byte_ids is not None:
                ids.extend(self._byte_ids[x] for x in b)
            else:
                ids.append(0)  # <unk>
        return ids

    def _merge(self, ids: list[int]) -> list[int]:
        pieces, scores, lookup, maxlen = self.pieces, self.scores, self._lookup, self.max_token_length
        while len(ids) > 1:
            best_score = -1e10
            best_i = -1
            best_id = -1
            for i in range(len(ids) - 1):
                a, b = pieces[ids[i]], pieces[ids[i + 1]]
                if len(a) + len(b) > maxlen:
                    continue
                j = lookup.get(a + b)
                if j is not None and scores[j] > best_score:
                    best_score, best_i, best_id = scores[j], i, j
            if best_i < 0:
                break
            ids[best_i : best_i + 2] = [best_id]
        return ids

    def _encode_chunk(self, chunk: str) -> tuple[int, ...]:
        hit = self._cache.get(chunk)
        if hit is None:
            hit = tuple(self._merge(self._symbols(chunk)))
            if len(self._cache) >= 200_000:
                self._cache.clear()
            self._cache[chunk] = hit
        return hit

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids as llama2.c produces them (BOS, dummy-space prefix, greedy merges)."""
        ids: list[int] = [self.bos_id] if bos else []
        if text:
            text = " " + text
            if self.chunked:
                for chunk in _SPACE_SPLIT.split(text):
                    if chunk:
                        ids.extend(self._encode_chunk(chunk))
            else:
                ids.extend(self._merge(self._symbols(text)))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of ids; drops the dummy space after BOS so ``decode(encode(s)) == s``."""
        out = bytearray()
        prev = None
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.pieces):
                raise ValueError(f"token id {i} is outside the vocabulary [0, {len(self.pieces)})")
            if skip_special and i in (self.bos_id, self.eos_id):
                prev = i
                continue
            piece = self._out_bytes[i]
            if prev == self.bos_id and piece.startswith(b" "):
                piece = piece[1:]
            out += piece
            prev = i
        return out.decode("utf-8", errors="replace")


def greedy_generate(
    model: Llama2cModel, tokenizer: Llama2cTokenizer, prompt: str = "", max_new_tokens: int = 200
) -> str:
    """Deterministic sample (prompt included), the cheapest end-to-end check that weights load right.

    Like llama2.c's ``-t 0``: starts from BOS + prompt and stops at BOS/EOS or ``seq_len``.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer.encode(prompt, bos=True)], dtype=torch.long, device=device)
    out = model.generate(ids, max_new_tokens, stop_ids=(tokenizer.bos_id, tokenizer.eos_id))[0].tolist()
    while len(out) > ids.shape[1] and out[-1] in (tokenizer.bos_id, tokenizer.eos_id):
        out.pop()
    return tokenizer.decode(out)
