"""Small Llama-shaped models for fast tests (random weights; structure is what matters)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        # down_proj defined first on purpose: calibration must follow execution order, not definition order
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TinyAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, d))


class TinyBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, heads: int) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(dim)
        self.self_attn = TinyAttention(dim, heads)
        self.post_attention_layernorm = nn.RMSNorm(dim)
        self.mlp = TinyMLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlama(nn.Module):
    """Token ids [B, T] -> logits [B, T, vocab]."""

    def __init__(self, vocab: int = 64, dim: int = 32, hidden: int = 48, layers: int = 3, heads: int = 4) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(TinyBlock(dim, hidden, heads) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def tiny_llama(seed: int = 0, **kwargs) -> TinyLlama:
    torch.manual_seed(seed)
    return TinyLlama(**kwargs).eval()


def token_batches(n: int = 6, batch: int = 2, seq: int = 16, vocab: int = 64, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n)]


SEED_RECIPE_PATTERNS = {
    "updown": ([".*up_proj.*", ".*gate_proj.*"], 0.3),
    "down": ([".*down_proj.*"], 0.5),
}


def tiny_hf_llama(vocab: int = 64, hidden: int = 32, intermediate: int = 48, seed: int = 0):
    """A random 2-block transformers ``LlamaForCausalLM`` (skips the test when transformers is missing)."""
    import pytest

    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def best_reachable(abs_values: torch.Tensor, target: float) -> float:
    """Brute force: fractions reachable by some threshold, closest to target (ties: fewer zeroed)."""
    v = abs_values.double().flatten().sort().values
    n = v.numel()
    if target <= 0:
        return 0.0
    if target >= 1:
        return 1.0
    distinct = torch.unique(v)
    counts = torch.cat([torch.zeros(1, dtype=torch.float64), torch.searchsorted(v, distinct, right=True).double()])
    err = (counts - target * n).abs()
    return float(counts[int(torch.nonzero(err == err.min())[0, 0])]) / n


def worst_achieved_miss(model: nn.Module, data, target: float = 0.5) -> float:
    """Largest |achieved - target| over the sparsified layers of ``model`` on ``data`` (measured by ActivationSparsity)."""
    from pl_actsparse.core.layer import sparsified_layers
    from pl_actsparse.measure.metric import ActivationSparsity

    metric = ActivationSparsity.from_model(model)
    with metric.observe(model), torch.no_grad():
        for x in data:
            model(x)
    values = metric.compute()
    return max(abs(float(values[f"{n}/sparsity"]) - target) for n, _ in sparsified_layers(model))


def count_token_calls(monkeypatch, module, name: str) -> list[int]:
    """Patch ``module.name`` (a kernel entry ``f(x, ...)``) to record the token count of each call; the list fills as
    it is called."""
    calls: list[int] = []
    real = getattr(module, name)

    def counting(x, *args):
        calls.append(x.numel() // x.shape[-1])
        return real(x, *args)

    monkeypatch.setattr(module, name, counting)
    return calls
