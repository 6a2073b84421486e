"""Compress-then-sparsify with NNCF's weight compression (optional: skipped when nncf is not installed)."""

from __future__ import annotations

import contextlib
import io
import sys
import warnings

import pytest
import torch

nncf = pytest.importorskip("nncf")

from pl_actsparse import (
    IgnoredScope,
    TargetScope,
    activation_sparsity_report,
    load_activation_sparsity,
    remove_activation_sparsity,
    sparsify_activations,
)
from pl_actsparse.core.layer import is_sparsified
from tiny_models import tiny_llama, token_batches  # noqa: E402

MODES = ["INT8_ASYM", "INT8_SYM"]


def _compress(model, batches, mode: str):
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nncf.compress_weights(model, mode=getattr(nncf.CompressWeightsMode, mode), dataset=nncf.Dataset(batches))


def _decompressed_weights(model, ids):
    """NNCF decompresses a weight only inside the wrapped forward: read it from forward hooks."""
    out, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):  # NNCF compresses embeddings too
            handles.append(m.register_forward_hook(lambda mod, i, o, name=name: out.__setitem__(name, mod.weight.detach().float().clone())))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return out


def _thresholds(model):
    return {n: float(m.activation_threshold) for n, m in model.named_modules() if is_sparsified(m)}


@pytest.mark.parametrize("mode", MODES)
def test_reference_example_compress_then_sparsify(mode):
    model = tiny_llama()
    dataset = token_batches()
    ids = dataset[0]
    dense_out = model(ids)

    # --- the reference example, as written (pl_actsparse in place of NNCF's experimental module) ---
    model = nncf.compress_weights(
        model,
        mode=getattr(nncf.CompressWeightsMode, mode),
        dataset=nncf.Dataset(dataset),
    )
    model = sparsify_activations(
        model=model,
        dataset=dataset,
        target_sparsity_by_scope={
            TargetScope(patterns=[".*up_proj.*", ".*gate_proj.*"]): 0.3,
            TargetScope(patterns=[".*down_proj.*"]): 0.5,
        },
        ignored_scope=IgnoredScope(),
    )
    # -----------------------------------------------------------------------------------------------

    up = model.layers[0].mlp.up_proj
    assert is_sparsified(up) and up.weight.dtype in (torch.uint8, torch.int8)  # still NNCF-compressed
    report = activation_sparsity_report(model)
    assert len(report.layers) == 9
    for r in report.layers:  # streaming calibration: approximately exact
        assert abs(r.calibration_sparsity - r.target) < 0.03, r
    out = model(ids)
    assert torch.isfinite(out).all()
    assert (out - dense_out).abs().mean() < 0.5 * dense_out.abs().mean()


@pytest.mark.parametrize("mode", MODES)
def test_nncf_removal_and_checkpoint(mode):
    batches = token_batches()
    ids = batches[0]
    model = _compress(tiny_llama(), batches, mode)
    compressed_out = model(ids)
    up = model.layers[1].mlp.up_proj
    weight = up.weight
    sparsify_activations(model, batches, {TargetScope(patterns=[".*mlp.*"]): 0.5}, calibration={"progress": False})
    sparse_out = model(ids)
    assert not torch.equal(sparse_out, compressed_out)

    # checkpoint into a freshly compressed model
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = _compress(tiny_llama(), batches, mode)
    load_activation_sparsity(fresh, torch.load(buf, weights_only=True))
    assert _thresholds(fresh) == _thresholds(model)
    torch.testing.assert_close(fresh(ids), sparse_out)

    remove_activation_sparsity(model)
    assert type(up) is torch.nn.Linear and up.weight is weight
    torch.testing.assert_close(model(ids), compressed_out)


def test_nncf_then_our_calibration_matches_dequantized_twin():
    """Thresholds on the NNCF model equal those on a float copy holding NNCF's dequantized weights (up to
    the streaming calibration's approximation, which is exact for a single batch)."""
    batches = token_batches(n=1)
    model = _compress(tiny_llama(), batches, "INT8_ASYM")
    twin = tiny_llama()
    decompressed = _decompressed_weights(model, batches[0])
    with torch.no_grad():
        for name, w in decompressed.items():
            twin.get_submodule(name).weight.copy_(w)
    recipe = {TargetScope(patterns=[".*_proj"]): 0.4}
    sparsify_activations(model, batches, recipe, calibration={"progress": False})
    sparsify_activations(twin, batches, recipe, calibration={"progress": False})
    a, b = _thresholds(model), _thresholds(twin)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
