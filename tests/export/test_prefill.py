"""``export_for_inference(prefill="prepacked")`` (issue 22 item 1): a copy of ``W^T`` prepacked for oneDNN serves the
multi-token CPU calls of each layer where a race on its shape finds it faster; its bytes are reported, it is never
saved, it is rebuilt when ``W^T`` changes, and single-token calls keep the sparse op under compile and export."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pl_actsparse.export.convert as convert
import pl_actsparse.export.linear as linear_mod
from pl_actsparse import TargetScope, sparsify_activations
from pl_actsparse.errors import InvalidOptionError
from pl_actsparse.export.convert import export_for_inference, exported_layers
from pl_actsparse.export.linear import SparseInferenceLinear
from pl_actsparse.kernels import dispatch
from tiny_models import count_token_calls, tiny_hf_llama

OP = "pl_actsparse.sparse_inference_linear.default"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}  # relative to max |reference|
DTYPES = [d for d in (torch.float32, torch.bfloat16, torch.float16) if dispatch.prepack_unavailable(d) is None]


def _sparsified(dtype=torch.float32, in_f=32, out_f=48, threshold=0.5, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, dtype=dtype)
    lin.register_buffer("activation_threshold", torch.tensor(threshold))
    return lin


def _reference(x, weight, bias, threshold):
    xm = x.masked_fill(x.abs() <= threshold, 0).double()
    return F.linear(xm, weight.double(), bias.double())


def _close(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    err = float((y.double() - ref).abs().max() / ref.abs().max())
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]}"


@pytest.fixture
def race(monkeypatch):
    """Fix the outcome of the per-shape race (tiny test shapes would otherwise decide it by noise)."""

    def set_outcome(prepacked_wins: bool):
        monkeypatch.setattr(convert, "prepack_race", lambda weight_t: {"prepacked": prepacked_wins})

    return set_outcome


@pytest.fixture
def packed_calls(monkeypatch):
    """Token counts of the calls that went through the prepacked copy."""
    return count_token_calls(monkeypatch, linear_mod, "packed_linear")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prepacked_layers_serve_prompts_from_the_packed_copy_and_report_its_bytes(dtype, race, packed_calls):
    race(True)
    lin = _sparsified(dtype)
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    model = export_for_inference(nn.Sequential(lin), prefill="prepacked", max_sparse_tokens=2)
    layer = model[0]
    (entry,) = exported_layers(model)
    assert layer.prefill == entry.prefill == "prepacked"
    assert entry.extra_weight_bytes == layer.extra_weight_bytes == w.numel() * w.element_size()  # one more copy
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for shape in [(1, 32), (1, 2, 32), (3, 40, 32)]:  # the sparse kernel up to 2 tokens, the packed copy above
            x = torch.randn(*shape, generator=g).to(dtype)
            _close(layer(x), _reference(x, w, b, lin.activation_threshold), dtype)
    assert packed_calls == [120]


def test_a_lost_race_keeps_no_copy(race, packed_calls):
    race(False)
    model = export_for_inference(nn.Sequential(_sparsified()), prefill="prepacked", max_sparse_tokens=2)
    assert model[0].prefill == "shared" and model[0].packed_weight() is None
    assert exported_layers(model)[0].extra_weight_bytes == 0
    with torch.no_grad():
        model(torch.randn(40, 32))
    assert packed_calls == []


def test_default_export_keeps_one_copy():
    model = export_for_inference(nn.Sequential(_sparsified()))
    assert model[0].prefill == "shared" and exported_layers(model)[0].extra_weight_bytes == 0


def test_prepack_race_times_both_gemms_on_the_layers_shape(monkeypatch):
    """The copy is kept where it was measured faster at PREPACK_TOKENS tokens; once per shape and dtype."""
    clock = type("Clock", (), {"now": 0.0})()
    cost = {"shared": 2.0, "packed": 1.0}
    calls = []

    def fake(kind):
        def fn(x, *args):
            calls.append((kind, x.shape[0]))
            clock.now += cost[kind]
            return x

        return fn

    monkeypatch.setattr(dispatch, "dense_linear_t", fake("shared"))
    monkeypatch.setattr(dispatch, "packed_linear", fake("packed"))
    dispatch.clear_profile_memo()
    wt = torch.randn(32, 48)
    res = dispatch.prepack_race(wt, rounds=3, timer=lambda: clock.now)
    assert res == {"shared_ms": 2000.0, "prepacked_ms": 1000.0, "prepacked": True}
    assert {n for _, n in calls} == {dispatch.PREPACK_TOKENS} and len(calls) == 2 * (1 + 3)  # warm-up + rounds
    assert dispatch.prepack_race(wt)["prepacked"] and len(calls) == 8  # memoized for the shape
    cost["packed"] = 3.0
    assert not dispatch.prepack_race(torch.randn(48, 32), rounds=3, timer=lambda: clock.now)["prepacked"]
    assert len(calls) == 8 + 2 * (1 + 3) + 2 * (1 + 6)  # a loss is raced again with twice the rounds
    dispatch.clear_profile_memo()


def test_the_copy_is_not_saved_and_follows_loads_copies_and_pickling(race, packed_calls):
    race(True)
    lin = _sparsified()
    w, b, t = lin.weight.detach().clone(), lin.bias.detach().clone(), lin.activation_threshold.clone()
    shared = export_for_inference(nn.Sequential(copy.deepcopy(lin)))
    model = export_for_inference(nn.Sequential(lin), prefill="prepacked", max_sparse_tokens=2)
    sd = model.state_dict()
    torch.testing.assert_close(sd, shared.state_dict(), rtol=0, atol=0, equal_nan=True)  # the same keys and values
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(2))
    model.load_state_dict({**sd, "0.weight": 2 * w})  # W^T changes in place: the copy is rebuilt
    with torch.no_grad():
        _close(model(x), _reference(x, 2 * w, b, t), torch.float32)
        twin = copy.deepcopy(model)  # opaque tensors cannot be copied: the copy leaves it out and rebuilds it
        _close(twin(x), _reference(x, 2 * w, b, t), torch.float32)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        _close(loaded(x), _reference(x, 2 * w, b, t), torch.float32)
    assert packed_calls == [40, 40, 40] and loaded[0].extra_weight_bytes == w.numel() * 4
    model.to(torch.bfloat16)  # a new W^T of another dtype: packed again for it
    with torch.no_grad():
        _close(model(x.bfloat16()), _reference(x.bfloat16(), (2 * w).bfloat16(), b.bfloat16(), t), torch.bfloat16)
    assert packed_calls[-1] == 40 and model[0].extra_weight_bytes == w.numel() * 2
    model.to(torch.float64)  # no packer for float64: an error that says so, never a silent fallback
    with pytest.raises(RuntimeError, match="prepack_weight: oneDNN packs float32/bfloat16/float16 CPU weights, got torch.float64"):
        model(x.double())
    plain = model[0].to_linear()
    assert type(plain) is nn.Linear and torch.equal(plain.weight, (2 * w).bfloat16().double()) and "_packed" not in vars(plain)


def test_autograd_takes_the_differentiable_path(race, packed_calls):
    race(True)
    lin = _sparsified()
    w, b, t = lin.weight.detach().clone(), lin.bias.detach().clone(), lin.activation_threshold.clone()
    model = export_for_inference(nn.Sequential(lin), prefill="prepacked", max_sparse_tokens=2)
    x = torch.randn(40, 32, requires_grad=True)
    model(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    _reference(x2, w, b, t).float().square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    assert packed_calls == []


def test_invalid_or_impossible_prefill_raises_before_any_change(monkeypatch):
    with pytest.raises(InvalidOptionError, match=r"prefill must be one of \('shared', 'prepacked'\), got 'packed'"):
        export_for_inference(nn.Sequential(_sparsified()), prefill="packed")
    with pytest.raises(InvalidOptionError, match="got 'dense'"):
        SparseInferenceLinear(4, 4, prefill="dense")
    model = nn.Sequential(_sparsified(), _sparsified(torch.float64, in_f=48, out_f=8))
    with pytest.raises(InvalidOptionError, match=r"cannot pack '1': oneDNN packs .* got torch.float64 on cpu; use prefill='shared'"):
        export_for_inference(model, prefill="prepacked")
    assert type(model[0]) is type(model[1]) is nn.Linear  # nothing swapped
    with pytest.raises(RuntimeError, match="prepack_weight: oneDNN packs"):
        dispatch.prepack_weight(torch.randn(4, 4, dtype=torch.float64))
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    model = nn.Sequential(_sparsified())
    with pytest.raises(InvalidOptionError, match="cannot pack '0': this torch is built without oneDNN"):
        export_for_inference(model, prefill="prepacked")
    assert type(model[0]) is nn.Linear


def test_compiled_prepacked_layer_keeps_the_sparse_op_for_single_tokens(race):
    race(True)
    layer = export_for_inference(nn.Sequential(_sparsified()), prefill="prepacked")[0]
    graphs: list = []

    def recording(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    compiled = torch.compile(layer, backend=recording, fullgraph=True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for shape in [(1, 1, 32), (1, 1, 32), (1, 40, 32)]:  # decode steps, then a prompt (the op's dense branch)
            x = torch.randn(*shape, generator=g)
            torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    assert graphs and all(OP in ops for ops in graphs)


def test_hf_llama_exported_with_prepacked_prefill(race, packed_calls):
    """A real third-party stack: prompts through the packed copies, torch.export in default grad mode with dynamic
    batch and sequence (the sparse op in the graph, equal to eager) and generate with a static cache."""
    race(True)
    model = tiny_hf_llama()
    g = torch.Generator().manual_seed(3)
    sparsify_activations(model, [torch.randint(0, 64, (2, 16), generator=g)], {TargetScope(patterns=[r".*proj"]): 0.5},
                         calibration={"progress": False})
    reference = copy.deepcopy(model)
    export_for_inference(model, prefill="prepacked", max_sparse_tokens=4)
    assert sum(e.prefill == "prepacked" for e in exported_layers(model)) == 14
    ids = torch.randint(0, 64, (1, 9), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    assert packed_calls == [9] * 14
    dims = {0: torch.export.Dim("batch", min=1, max=8), 1: torch.export.Dim("seq", min=1, max=64)}
    ep = torch.export.export(model, (), {"input_ids": torch.randint(0, 64, (2, 8)), "use_cache": False},
                             dynamic_shapes={"input_ids": dims, "use_cache": None})
    ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert ops.count(OP) == 14
    for shape in [(1, 1), (2, 1), (3, 40)]:
        x = torch.randint(0, 64, shape, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(input_ids=x, use_cache=False).logits,
                                       model(input_ids=x, use_cache=False).logits, rtol=1e-5, atol=1e-5)
    kw = {"max_new_tokens": 5, "do_sample": False, "cache_implementation": "static", "pad_token_id": 0}
    assert torch.equal(model.generate(ids, **kw), reference.generate(ids, **kw))


def test_a_layer_exported_under_inference_mode_sees_in_place_changes(race, packed_calls):
    """Exported inside ``torch.inference_mode`` (a common deployment script), ``W^T`` and the threshold were inference
    tensors, which keep no version counter: a ``load_state_dict`` of new weights left the packed copy stale (a silent
    wrong prompt output) and the CUDA threshold cache raised on ``_version``."""
    race(True)
    lin = _sparsified()
    w, b, t = lin.weight.detach().clone(), lin.bias.detach().clone(), lin.activation_threshold.clone()
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        model = export_for_inference(nn.Sequential(lin), prefill="prepacked", max_sparse_tokens=2)
        _close(model(x), _reference(x, w, b, t), torch.float32)
        model.load_state_dict({"0.weight": 3 * w, "0.bias": b, "0.activation_threshold": t}, strict=False)
        _close(model(x), _reference(x, 3 * w, b, t), torch.float32)
        model[0].weight_t.mul_(0.5)
        _close(model(x), _reference(x, 1.5 * w, b, t), torch.float32)
        assert model[0]._threshold_for(torch.bfloat16) == float(t.bfloat16())  # no RuntimeError on _version
        model[0].activation_threshold.fill_(0.25)
        assert model[0]._threshold_for(torch.float32) == 0.25
    assert packed_calls == [40, 40, 40]
