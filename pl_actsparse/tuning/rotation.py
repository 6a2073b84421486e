"""Rotate what the sparsified layers read into its principal axes before calibrating: a model-wide quality gain.

Thresholding ``|x_i|`` loses least when the energy of ``x`` sits in few channels. For a pre-norm decoder (Llama,
Mistral, Qwen2) the residual stream can be expressed in any orthonormal basis ``Q`` without changing what the model
computes (SliceGPT's *computational invariance*, Ashkboos et al., ICLR 2024): fold each RMSNorm's gain into the
layers that read it, then ``E' = E Q`` (embedding), ``W' = W diag(g) Q`` (q/k/v, gate/up, lm_head: readers) and
``W' = Q^T W``, ``b' = Q^T b`` (o_proj, down_proj: writers). ``Q`` holds the eigenvectors of the normalised residual
stream's second moment over the calibration tokens (PCA, as LaRoSA rotates each layer's input, Liu et al., ICML
2025; one ``Q`` for the whole stream costs no extra matmul at inference). With ``heads=True`` each key-value head's
value output is rotated the same way, and ``o_proj`` reads it through the same rotation (exact: attention mixes
positions, not channels). The down_proj input (after the gated activation) cannot be rotated for free and is left.

With ``sparsity=s`` the stream's axes are then turned so that each token on its own is sparse (:func:`sparsest_rotation`).
Measured on stories260K, all seven projections, ``allocation="auto"`` at equal achieved sparsity (``docs/allocation.md``):
4.437 -> 4.279 (principal axes) -> 4.114 (turned for 40%) perplexity at 40% of the bytes, 6.195 -> 5.377 -> 4.763 at 50%.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from pl_actsparse.calibrate.distributed import Distributed
from pl_actsparse.calibrate.progress import Progress
from pl_actsparse.calibrate.running import check_batches, default_transform_fn, logits_of, mask_of, model_device, run_item, take_batches
from pl_actsparse.config import CalibrationConfig
from pl_actsparse.core.layer import is_sparsified
from pl_actsparse.core.masking import current_token_mask, resolve_mask_fn, select_tokens
from pl_actsparse.errors import EmptyDatasetError, InvalidOptionError, UnsupportedModuleError

__all__ = ["rotate_activations", "check_rotation_options", "sparsest_rotation"]

#: Tokens of the normalised stream sampled (over batches and the decoder layers' norms) for :func:`sparsest_rotation`, and its steps.
SAMPLE_TOKENS, SPARSITY_STEPS = 65536, 300
_ATTN, _MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")


def _decoder(model: nn.Module) -> tuple[nn.Module, list[nn.Module], nn.Module, nn.Module]:
    """(embedding, decoder layers, final norm, head) of a pre-norm Llama-style decoder."""
    for parent in model.modules():
        layers = getattr(parent, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and all(
                hasattr(l, "input_layernorm") and hasattr(l, "post_attention_layernorm") and all(hasattr(l.self_attn, p) for p in _ATTN)
                and all(hasattr(l.mlp, p) for p in _MLP) for l in layers):
            tops = [t for t in model.modules() if t is parent or getattr(t, "model", None) is parent]  # HF: parent is top.model
            head = next((h for t in tops for h in (getattr(t, "lm_head", None),) if h is not None), None)
            embed, norm = getattr(parent, "embed_tokens", None), getattr(parent, "norm", None)
            bad = [f"{n}: {type(m).__module__}.{type(m).__qualname__}" for n, m, t in (("embed_tokens", embed, nn.Embedding), ("lm_head", head, nn.Linear),
                                                                                   ("norm", norm, nn.Module)) if not isinstance(m, t)]
            if bad:  # e.g. a peft adapter or modules_to_save wrapper on the embedding or the head, or no head at all
                raise UnsupportedModuleError(f"rotate_activations needs a plain nn.Embedding, an nn.Linear lm_head and a final norm around "
                                             f"the decoder layers of {type(model).__qualname__}, found {'; '.join(bad)}: rotate the plain float model first")
            return embed, list(layers), norm, head
    raise UnsupportedModuleError(
        f"rotate_activations needs a pre-norm decoder with an output head (Llama, Mistral, Qwen2: embed_tokens, layers[i] with "
        f"input_layernorm / self_attn.q,k,v,o_proj / post_attention_layernorm / mlp.gate,up,down_proj, norm, lm_head); "
        f"{type(model).__qualname__} is not one")


def _check_layers(model: nn.Module, embed: nn.Module, readers: list[nn.Module], writers: list[nn.Module], norms: list[nn.Module]) -> None:
    names = {id(m): n for n, m in model.named_modules()}
    for m in [embed, *norms]:
        if any(type(p.data) is not torch.Tensor or p.device.type == "meta" or not p.is_floating_point() for p in m.parameters(recurse=False)):
            raise UnsupportedModuleError(f"{names[id(m)]!r} ({type(m).__qualname__}) has a weight that is offloaded (meta) or quantized: rotate "
                                         f"the float model with its weights in memory, then offload or quantize")
    for m in readers + writers:
        if is_sparsified(m) or type(m) is not nn.Linear or type(m.weight.data) is not torch.Tensor or m.weight.device.type == "meta":
            raise UnsupportedModuleError(
                f"layer {names[id(m)]!r} ({type(m).__qualname__}) is not a plain float nn.Linear with its weight in memory: rotate the "
                f"float model first, then sparsify, quantize or add adapters (thresholds and scales are fitted in the rotated basis)")
    for m in norms:
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 1 or getattr(m, "bias", None) is not None:
            raise UnsupportedModuleError(f"norm {names[id(m)]!r} ({type(m).__qualname__}) is not an RMSNorm with a gain vector and no bias")


@torch.no_grad()
def rotate_activations(model: nn.Module, dataset: Iterable[Any], *, heads: bool = True, sparsity: float | None = None,
                       calibration: CalibrationConfig | Mapping[str, Any] | str | None = None, tolerance: float | None = None) -> nn.Module:
    """Rewrite ``model`` (in place) so that the inputs of its q/k/v, gate/up (and with ``heads``, o_proj) projections
    arrive in their principal axes over ``dataset``'s real tokens; the function computed stays the same up to rounding.

    Call it on the float model *before* :func:`~pl_actsparse.sparsify_activations` (and before quantizing). The
    norms' gains become 1 and are folded into the layers; a head tied to the embedding is untied (one more
    ``vocab x hidden`` weight, warned). The result is a plain model: ``save_pretrained`` / ``state_dict`` keep it.
    ``calibration`` supplies ``transform_fn``, ``token_mask``, ``num_batches`` and DDP summing as for calibration
    (the second moments are summed over ranks, so every rank gets the same rotation). Second moments summed in fp64, products and the rewrite in fp32 (fp64 for an fp64 model); one
    forward of the whole model per batch (not block by block), plus one to check the result; a CPU copy of the
    rewritten weights is held during the call so that a failure puts them back.

    Args:
        heads: also rotate each key-value head's value output and ``o_proj``'s matching input columns.
        sparsity: the fraction of inputs that thresholding will zero (in (0, 1)); given, the principal axes are then turned
            to minimise what that zeroing removes (:func:`sparsest_rotation`, on a sample of up to 65536 of the stream's tokens,
            ``65536 x d`` fp32 held on the model's device): at 50% on stories260K, perplexity 4.763 against 5.377 with the
            principal axes alone (all seven projections, ``allocation="auto"``, ``benchmarks/results/allocation.json``).
        tolerance: the largest relative change of the logits on the first batch accepted (default 1e-3 for fp32
            weights, 5e-2 where a rewritten weight is fp16/bf16); above it every weight is put back and the call raises.

    Raises:
        UnsupportedModuleError: not a pre-norm decoder with a head, a layer, embedding or norm already sparsified /
            quantized / wrapped / offloaded, a norm that is not an RMSNorm (before any change); the rewritten model computes
            something else (a norm that is not ``gain * x / rms(x)``, e.g. Gemma's ``1 + gain``: weights put back).
        EmptyDatasetError: ``dataset`` is empty, or its token mask keeps no token, on every rank.
        InvalidOptionError: ``heads`` not a bool, ``sparsity`` not None or in (0, 1), ``tolerance`` not None or a finite number >= 0, parameters made
            under ``torch.inference_mode`` with the call outside it (before any change).
    """
    check_rotation_options(heads, tolerance, sparsity)
    config = CalibrationConfig.from_value(calibration)
    if config.method != "auto" or config.offload is not None:
        warnings.warn(f"rotate_activations runs the whole model on each batch: calibration method={config.method!r} and "
                      f"offload={config.offload!r} are not used here (they apply to sparsify_activations)", stacklevel=2)
    embed, layers, final_norm, head = _decoder(model)
    attn = [l.self_attn for l in layers]
    folds = [f for l in layers for f in ((l.input_layernorm, [l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj]),
                                         (l.post_attention_layernorm, [l.mlp.gate_proj, l.mlp.up_proj]))] + [(final_norm, [head])]
    readers, norms = [lin for _, group in folds for lin in group], [n for n, _ in folds]  # each norm's gain goes into its readers
    writers = [a.o_proj for a in attn] + [l.mlp.down_proj for l in layers]
    _check_layers(model, embed, readers, writers, norms)
    if not torch.is_inference_mode_enabled() and (frozen := [n for n, p in model.named_parameters() if p.is_inference()][:3]):
        raise InvalidOptionError(f"rotate_activations rewrites weights in place, which parameters made under torch.inference_mode ({frozen}...) "
                                 f"do not allow outside it: build or load the model outside inference mode (or rotate inside it)")
    head_dim = next((int(getattr(a, k)) for a in attn[:1] for k in ("head_dim", "head_size") if hasattr(a, k)), None)
    if heads and head_dim is None:
        raise UnsupportedModuleError(f"{type(attn[0]).__qualname__} has no head_dim / head_size: pass heads=False")
    dim = embed.embedding_dim
    device = model_device(model)
    dist = Distributed(config.sync_across_processes, device)
    mask_fn, transform = resolve_mask_fn(config.token_mask), config.transform_fn or default_transform_fn
    items = take_batches(check_batches(dataset, "dataset"), config.num_batches, dist)

    stream = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    values = [torch.zeros(a.o_proj.in_features // head_dim, head_dim, head_dim, dtype=torch.float64, device=device) for a in attn] if heads else []

    samples: list[torch.Tensor] = []  # with sparsity: a sample of the normalised stream where the decoder layers read it
    per_call = -(-SAMPLE_TOKENS // max(1, 2 * len(layers) * dist.count(len(items)))) if sparsity is not None else 0
    gen = torch.Generator().manual_seed(0)

    def on_norm(m: nn.Module, args: tuple) -> None:
        h = select_tokens(args[0], current_token_mask()).float().reshape(-1, dim)  # fp32 products, summed in fp64
        h = h / h.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-30)
        stream.add_((h.T @ h).double())
        if sparsity is not None and m is not final_norm:
            samples.append(h[torch.randperm(h.shape[0], generator=gen)[:per_call].to(h.device)])

    def on_values(i: int):
        def hook(_m: nn.Module, args: tuple) -> None:
            v = select_tokens(args[0], current_token_mask()).float().reshape(-1, values[i].shape[0], head_dim)
            values[i].add_(torch.einsum("nhi,nhj->hij", v, v).double())
        return hook

    handles = [n.register_forward_pre_hook(on_norm) for n in norms]
    handles += [a.o_proj.register_forward_pre_hook(on_values(i)) for i, a in enumerate(attn)] if heads else []
    was_training, first = model.training, None
    try:
        model.eval()
        for item in items:
            out = run_item(model, item, transform, mask_of(mask_fn, item), device)
            first = logits_of(out)[:1] if first is None else first
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    stream = dist.sum_(stream)
    if not float(stream.trace()) > 0:  # all-zero attention masks / token_mask (or non-finite activations): nothing to take axes from
        raise EmptyDatasetError(f"rotate_activations: the token mask kept no token of the {len(items)} calibration batch(es) (or the activations "
                                f"are not finite): pass batches with real tokens (attention_mask 1)")
    q = _principal_axes(stream)
    if sparsity is not None:  # rank 0 turns the axes on all ranks' samples; every rank takes its result, bit for bit
        x = dist.gather_(torch.cat(samples) if samples else stream.new_zeros(0, dim, dtype=torch.float32))
        turn = sparsest_rotation(x @ q.to(x), sparsity, config.progress) if dist.is_main else q.new_zeros(dim, dim)
        q = q @ dist.sum_(turn.to(q))
    saved = {id(p): (p, p.detach().to('cpu', copy=True)) for m in [embed, head, *readers, *writers, *norms] for p in m.parameters(recurse=False)}
    tied = head.weight is embed.weight
    if tied:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    try:
        kv = [a.v_proj.out_features // head_dim for a in attn] if heads else []
        _rewrite(embed, folds, writers, attn, q, [_principal_axes(dist.sum_(v).reshape(k, -1, head_dim, head_dim).sum(1)) for v, k in zip(values, kv)], head_dim)
        half = any(p.dtype in (torch.float16, torch.bfloat16) for p, _ in saved.values())  # the weights', not the logits' dtype
        change, tol = 0.0, tolerance if tolerance is not None else (5e-2 if half else 1e-3)
        if first is not None:
            model.eval()
            after = logits_of(run_item(model, items[0], transform, mask_of(mask_fn, items[0]), device))[:1]
            model.train(was_training)
            change = float((after.double() - first.double()).norm() / first.double().norm().clamp_min(1e-30))
        if dist.any(not change <= tol):  # all ranks keep, or all put back, their weights
            raise UnsupportedModuleError(
                f"the rotated model's logits moved by {change:.3g} (relative) on the first batch (of this rank; any rank's failure "
                f"counts), more than tolerance={tol:g}: a norm or residual path of {type(model).__qualname__} is not rotation-invariant "
                f"(e.g. a 1 + gain RMSNorm); the weights were put back")
    except BaseException:
        model.train(was_training)
        for p, v in saved.values():
            p.copy_(v)
        if tied:
            head.weight = embed.weight
        raise
    if tied:
        owners = [m for m in model.modules() if m is model or getattr(m, "lm_head", None) is head]  # model may wrap the HF model
        for config, flag in [(getattr(m, "config", None), f) for m in owners for f in ("tie_word_embeddings", "shared_classifier")]:
            if hasattr(config, flag):  # HF's and llama2.c's: saving and tie_weights() keep the untied head
                setattr(config, flag, False)
        warnings.warn(f"rotate_activations untied {type(model).__qualname__}'s output head from its embedding (one more "
                      f"{head.weight.numel() * head.weight.element_size() / 2**20:.1f} MiB weight)", stacklevel=3)
    return model


def check_rotation_options(heads: Any = True, tolerance: Any = None, sparsity: Any = None) -> dict[str, Any]:
    """``{"heads", "tolerance", "sparsity"}`` once checked as :func:`rotate_activations` checks them (InvalidOptionError)."""
    if not isinstance(heads, bool):
        raise InvalidOptionError(f"rotate_activations: heads must be True or False, got {heads!r}")
    if sparsity is not None and (isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1):
        raise InvalidOptionError(f"rotate_activations: sparsity must be None or a number in (0, 1) (the fraction of inputs zeroed), got {sparsity!r}")
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < math.inf):
        raise InvalidOptionError(f"rotate_activations: tolerance must be None or a finite number >= 0 (a relative change of the logits), got {tolerance!r}")
    return {"heads": heads, "tolerance": tolerance, "sparsity": sparsity}


@torch.inference_mode(False)  # learned with autograd, also when rotate_activations runs under inference_mode
@torch.enable_grad()
def sparsest_rotation(x: torch.Tensor, sparsity: float, progress: bool = False) -> torch.Tensor:
    """The orthogonal ``R`` (``[d, d]`` fp64) that minimises the mean over the rows (tokens) of ``x`` (``[n, d]``) of the energy
    in each row's ``round(sparsity * d)`` smallest coordinates of ``x @ R``: what zeroing that fraction of a token's inputs
    removes. Principal axes minimise it for one set of coordinates shared by all tokens; a static threshold zeroes different
    coordinates in each token, which this turns the basis for. ``R`` is the Cayley transform of a skew-symmetric matrix
    learned from 0 (``R = I``) with Adam (lr 1e-2, :data:`SPARSITY_STEPS` steps of 2048 rows drawn with a fixed seed): the
    learned rotations of SpinQuant (Liu et al., 2024), with this objective. ``round(sparsity * d)`` is taken within ``[1, d - 1]``.
    Where the learned ``R`` zeroes no less energy over all rows than ``I`` (e.g. fewer rows than ``d``), ``I`` is returned with a
    warning. Works under ``torch.inference_mode`` too. Cost per step ~``8 d^3`` flops (d = 2048: ~1 s on one CPU core)."""
    d = x.shape[1]
    k, x = min(d - 1, max(1, round(sparsity * d))), x.float().clone()  # a normal tensor, also when called under inference_mode
    p = torch.zeros(d, d, device=x.device, requires_grad=True)
    opt, gen = torch.optim.Adam([p], lr=1e-2), torch.Generator().manual_seed(0)

    def cayley(p: torch.Tensor) -> torch.Tensor:
        s, eye = p.triu(1) - p.triu(1).T, torch.eye(d, dtype=p.dtype, device=p.device)
        return torch.linalg.solve(eye - s, eye + s)

    with Progress(f"rotation for {sparsity:g} sparsity", SPARSITY_STEPS, progress) as bar:
        for _ in range(SPARSITY_STEPS):
            rows = x[torch.randint(0, x.shape[0], (min(2048, x.shape[0]),), generator=gen).to(x.device)]
            loss = (rows @ cayley(p)).pow(2).sort(-1).values[:, :k].sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.advance(f"energy zeroed {loss.item():.4g}")
    r, eye = cayley(p.detach().double()), torch.eye(d, dtype=torch.float64, device=x.device)
    zeroed = lambda r: sum(float((c @ r.float()).pow(2).sort(-1).values[:, :k].sum()) for c in x.split(4096))  # noqa: E731
    if zeroed(r) < zeroed(eye):
        return r
    warnings.warn(f"sparsest_rotation: the learned rotation zeroes no less energy than the input axes on the {x.shape[0]} rows "
                  f"(e.g. fewer rows than d = {d}): the input axes kept", stacklevel=4)
    return eye


def _principal_axes(moment: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a (batched) symmetric matrix as columns, largest eigenvalue first, each with its largest entry
    positive (so that the basis is deterministic)."""
    _, vecs = torch.linalg.eigh(moment)
    vecs = vecs.flip(-1)
    sign = torch.gather(vecs, -2, vecs.abs().argmax(-2, keepdim=True)).sign()
    return vecs * torch.where(sign == 0, torch.ones_like(sign), sign)


def _rewrite(embed: nn.Embedding, folds: list[tuple[nn.Module, list[nn.Linear]]], writers: list[nn.Linear], attn: list[nn.Module],
             q: torch.Tensor, value_axes: list[torch.Tensor], head_dim: int | None) -> None:
    set_ = lambda p, value: p.copy_(value.to(p.dtype))  # noqa: E731
    wide = lambda t: t.to(torch.promote_types(t.dtype, torch.float32))  # noqa: E731  (fp32 matmuls: fp64 ones cost minutes at 1B)

    set_(embed.weight, wide(embed.weight) @ q.to(embed.weight.device, wide(embed.weight).dtype))
    for norm, readers in folds:  # W' = W diag(g) Q, then the norm's gain is 1
        gain = wide(norm.weight.detach())
        for lin in readers:
            set_(lin.weight, (wide(lin.weight) * gain.to(lin.weight.device)) @ q.to(lin.weight.device, wide(lin.weight).dtype))
        norm.weight.fill_(1.0)
    for lin in writers:  # W' = Q^T W, b' = Q^T b
        qd = q.to(lin.weight.device, wide(lin.weight).dtype)
        set_(lin.weight, qd.T @ wide(lin.weight))
        if lin.bias is not None:
            set_(lin.bias, qd.T @ wide(lin.bias).to(qd.dtype))
    for a, r in zip(attn, value_axes):  # v' = v R per kv head (W_v' = R^T W_v); query head j reads kv head j // (heads / kv heads)
        r = r.to(a.v_proj.weight.device, wide(a.v_proj.weight).dtype)
        per = a.o_proj.in_features // head_dim // r.shape[0]
        rv = torch.block_diag(*r)
        set_(a.v_proj.weight, rv.T @ wide(a.v_proj.weight))
        if a.v_proj.bias is not None:
            set_(a.v_proj.bias, rv.T @ wide(a.v_proj.bias).to(rv.dtype))
        set_(a.o_proj.weight, wide(a.o_proj.weight) @ torch.block_diag(*r.repeat_interleave(per, 0)))
