"""torch.compile and activation sparsity (issue 12 item 1).

Calibration, recalibration and measurement must never poison the user's compiled model (they run with
compilation off), and a sparsified model's training step must compile with ``fullgraph=True``: zero graph
breaks, no recompilation between steps (metric tracking included), compiled == eager outputs and gradients.
Graphs are counted with dynamo's own counters (``CompileCounterWithBackend``, ``counters["graph_break"]``).
"""

from __future__ import annotations

import threading

import pytest
import torch

from pl_actsparse import TargetScope, calibrate_activation_sparsity, sparsify_activations
from pl_actsparse.core.layer import sparsified_layers
from pl_actsparse.calibrate.running import compilation_disabled
from pl_actsparse.measure.metric import ActivationSparsity
from tiny_models import count_token_calls, tiny_hf_llama

pytestmark = pytest.mark.usefixtures("one_thread")

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

SCOPES = {TargetScope(patterns=[".*up_proj", ".*gate_proj"]): 0.3, TargetScope(patterns=[".*down_proj"]): 0.5}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    counters.clear()
    yield
    dynamo.reset()
    counters.clear()


def _data(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 16), generator=g) for _ in range(n)]


def _one_block_llama():
    """A one-block HF Llama: inductor's C++ code generation dominates compile cost, and one block has every
    kind of layer."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _graph_breaks() -> int:
    return sum(counters["graph_break"].values())


def _step(model, ids):
    """One training step's forward and backward; returns logits and the parameter gradients."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, use_cache=False).logits
    logits.float().pow(2).mean().backward()
    grads = {n.replace("_orig_mod.", ""): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _thresholds(model):
    return {n.replace("_orig_mod.", ""): m.activation_threshold.clone() for n, m in sparsified_layers(model)}


@pytest.fixture
def inductor_in_process():
    """Inductor compiles its C++ kernels in this process: a pool of compile workers costs more than it saves on
    a small, busy machine."""
    inductor_config = pytest.importorskip("torch._inductor.config")
    with inductor_config.patch(compile_threads=1):
        yield


@pytest.mark.usefixtures("inductor_in_process")
def test_calibrating_a_compiled_model_keeps_its_graph_and_steps_compile_once():
    """Inductor, fullgraph=True, forward and backward of a training step (the callback test covers "masked")."""
    gradient_mode = "ste"  # a custom autograd.Function in the graph
    data = _data()
    reference = _one_block_llama()
    model = _one_block_llama()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        compiled(input_ids=data[0], use_cache=False)  # compiled dense, before any sparsification
    assert counter.frame_count == 1

    sparsify_activations(compiled, data, SCOPES, gradient_mode=gradient_mode, calibration={"progress": False})
    assert counter.frame_count == 1, "calibration must run eagerly, outside the compiled region"
    assert _graph_breaks() == 0
    sparsify_activations(reference, data, SCOPES, gradient_mode=gradient_mode, calibration={"progress": False})
    assert {k: float(v) for k, v in _thresholds(compiled).items()} == {k: float(v) for k, v in _thresholds(reference).items()}

    model.train()
    reference.train()
    # held-out batches: on the calibration data some inputs sit exactly at their threshold (it is one of their
    # values), and inductor's differently-rounded upstream ops may flip them; elsewhere both sides agree
    held_out = _data(seed=11)
    for i in range(3):
        out, grads = _step(compiled, held_out[i])
        ref_out, ref_grads = _step(reference, held_out[i])
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
        assert grads.keys() == ref_grads.keys() and len(grads) >= 9
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)
    # one new graph for the sparsified training model (classes and modes changed), none after
    assert counter.frame_count == 2
    assert _graph_breaks() == 0

    # recalibration: eager again, thresholds change in place, the next steps reuse the graph
    before = _thresholds(compiled)
    calibrate_activation_sparsity(compiled, _data(seed=7), calibration={"progress": False})
    assert any(not torch.equal(before[k], v) for k, v in _thresholds(compiled).items())
    assert counter.frame_count == 2
    model.train()
    calibrate_activation_sparsity(reference, _data(seed=7), calibration={"progress": False})
    reference.train()
    out, _ = _step(compiled, held_out[0])
    torch.testing.assert_close(out, _step(reference, held_out[0])[0], rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 2 and _graph_breaks() == 0


def test_metric_tracking_inside_the_compiled_region_is_traced_and_exact():
    data = _data()
    model = _one_block_llama()
    sparsify_activations(model, data, SCOPES, calibration={"progress": False})
    model.train()
    counter = CompileCounterWithBackend("eager")  # dynamo's tracing is what breaks or recompiles
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    tracked = ActivationSparsity.from_model(model)
    eager = ActivationSparsity.from_model(model)
    for i in range(4):
        tracked.reset()
        eager.reset()
        with tracked.observe(model):  # a logging step: observers on
            compiled(input_ids=data[i % 3], use_cache=False).logits.float().pow(2).mean().backward()
        with eager.observe(model), torch.no_grad():
            model(input_ids=data[i % 3], use_cache=False)
        assert tracked.update_called
        got, want = tracked.compute(), eager.compute()
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], equal_nan=True, msg=key)
        compiled(input_ids=data[i % 3], use_cache=False)  # a step without tracking
    # one graph with observers, one without; tracking adds no break and no recompilation between steps
    assert counter.frame_count == 2
    assert _graph_breaks() == 0
    # the counts are real: 30% / 50% targets, measured on the calibration data itself
    tracked.reset()
    with tracked.observe(model), torch.no_grad():
        for ids in data:
            compiled(input_ids=ids, use_cache=False)
    values = tracked.compute()
    assert float(values["model.layers.0.mlp.up_proj/sparsity"]) == pytest.approx(0.3, abs=2e-3)
    assert float(values["model.layers.0.mlp.down_proj/sparsity"]) == pytest.approx(0.5, abs=2e-3)


def test_compilation_disabled_runs_compiled_functions_eagerly_and_restores():
    counter = CompileCounterWithBackend("eager")
    f = torch.compile(lambda x: x.sin() + 1, backend=counter)
    with compilation_disabled():
        assert torch.equal(f(torch.ones(3)), torch.ones(3).sin() + 1)
        results = []
        t = threading.Thread(target=lambda: results.append(f(torch.zeros(2))))  # other threads too
        t.start()
        t.join()
        assert torch.equal(results[0], torch.ones(2))
    assert counter.frame_count == 0
    f(torch.ones(3))
    assert counter.frame_count == 1


def _lightning_fit(compile_backend, data, tmp_path, steps=5):
    import lightning.pytorch as pl

    from pl_actsparse import ActivationSparsityCallback

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            model = tiny_hf_llama().train()
            # what users write: the module compiles its own model
            self.model = model if compile_backend is None else torch.compile(model, backend=compile_backend, fullgraph=True)

        def forward(self, ids):
            return self.model(input_ids=ids, use_cache=False).logits

        def training_step(self, batch, batch_idx):
            return self(batch).float().pow(2).mean()

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.cat(data), batch_size=2)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    callback = ActivationSparsityCallback(
        scopes=[{"patterns": [".*up_proj", ".*gate_proj"], "sparsity": 0.3}, {"patterns": [".*down_proj"], "sparsity": 0.5}],
        calibration_dataloader=data,
        recalibrate_every_n_steps=2,
        track=["train"],
        calibration={"progress": False},
        verbose=False,
    )
    module = LM()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, callbacks=[callback], logger=pl.loggers.CSVLogger(tmp_path),
        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    pl.seed_everything(0, verbose=False)
    trainer.fit(module)
    return module, callback, trainer


def test_callback_on_a_module_that_compiles_its_model(tmp_path):
    data = _data(n=4)
    counter = CompileCounterWithBackend("eager")
    compiled, cb, trainer = _lightning_fit(counter, data, tmp_path / "c")
    eager, cb_eager, _ = _lightning_fit(None, data, tmp_path / "e")
    # calibration at the start, then every 2 steps: all outside the compiled region
    assert [h["reason"] for h in cb.history] == ["start of fit", "every 2 steps", "every 2 steps"]
    # every step is tracked (log_every_n_steps=1): one graph for all 5 steps, no break, no recompilation
    assert counter.frame_count == 1
    assert _graph_breaks() == 0
    assert "actsparse/train/sparsity" in trainer.callback_metrics
    # the compiled run is the eager run
    for h, e in zip(cb.history, cb_eager.history):
        assert h["sparsity_after"] == pytest.approx(e["sparsity_after"], abs=1e-6)
        assert {k.replace("._orig_mod", ""): v for k, v in h["thresholds"].items()} == pytest.approx(e["thresholds"], rel=1e-5)
    weights = {n.replace("._orig_mod", ""): p for n, p in compiled.named_parameters()}
    for name, p in eager.named_parameters():
        torch.testing.assert_close(weights[name], p, rtol=1e-4, atol=1e-6)



# -- issue 22 item 1: exported layers under torch.compile, torch.export and HF generate --------------------

OP = "pl_actsparse.sparse_inference_linear.default"


def _exported_hf_llama(max_sparse_tokens=4):
    """An exported tiny HF Llama (all projections at 50%) and the sparsified model it came from."""
    import copy

    from pl_actsparse.export.convert import export_for_inference
    from tiny_models import tiny_hf_llama

    model = tiny_hf_llama()
    sparsify_activations(model, _data(n=2), {TargetScope(patterns=[r".*proj"]): 0.5}, calibration={"progress": False})
    reference = copy.deepcopy(model)
    export_for_inference(model, max_sparse_tokens=max_sparse_tokens)
    return model, reference


def _count_kernel_calls(monkeypatch):
    """Token counts of the calls of the CPU sparse kernel (eager layers and the custom op both end there)."""
    import pl_actsparse.export.linear as linear_mod

    return count_token_calls(monkeypatch, linear_mod, "sparse_linear_cpu")


def _graph_ops(gm) -> set:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("max_sparse_tokens", [2, None], ids=["limit2", "measured"])
def test_compiled_exported_layer_has_one_graph_no_break_and_equals_eager(max_sparse_tokens, monkeypatch):
    from pl_actsparse.export.linear import SparseInferenceLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96)
    lin.register_buffer("activation_threshold", torch.tensor(0.5))
    layer = SparseInferenceLinear.from_linear(lin, max_sparse_tokens=max_sparse_tokens)
    graphs: list = []

    def recording(gm, example_inputs):
        graphs.append(_graph_ops(gm))
        return gm.forward

    counter = CompileCounterWithBackend(recording)
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    calls = _count_kernel_calls(monkeypatch)
    g = torch.Generator().manual_seed(1)
    for step in range(4):  # decode steps: one token each, new values
        x = torch.randn(1, 1, 64, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)
    assert counter.frame_count == 1 and _graph_breaks() == 0  # one graph, no recompilation over the steps
    assert all(OP in ops for ops in graphs)
    assert calls.count(1) == 8  # the sparse kernel ran in the compiled graph and in eager, each step
    x = torch.randn(1, 40, 64, generator=g)  # prefill: the dense path, inside the same op
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-6, atol=1e-6)
    assert _graph_breaks() == 0


def test_compiled_exported_hf_llama_decodes_without_breaks_or_recompiles(monkeypatch):
    transformers = pytest.importorskip("transformers")
    model, reference = _exported_hf_llama()
    counter = CompileCounterWithBackend("eager")
    calls = _count_kernel_calls(monkeypatch)
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(3))
    cache = transformers.StaticCache(config=model.config, max_cache_len=32)
    ref_cache = transformers.StaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad():
        pos = torch.arange(6)
        out = compiled(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True).logits
        ref = reference(input_ids=ids, past_key_values=ref_cache, cache_position=pos, use_cache=True).logits
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        frames_after_prefill = counter.frame_count
        for step in range(6, 12):  # decode steps with a static cache: one token each
            nxt = out[:, -1:].argmax(-1)
            pos = torch.tensor([step])
            out = compiled(input_ids=nxt, past_key_values=cache, cache_position=pos, use_cache=True).logits
            ref = reference(input_ids=nxt, past_key_values=ref_cache, cache_position=pos, use_cache=True).logits
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            if step == 6:
                frames_after_first_step = counter.frame_count
    assert _graph_breaks() == 0
    assert counter.frame_count == frames_after_first_step <= frames_after_prefill + 1  # no recompiles
    assert calls.count(1) >= 6 * 14  # 14 sparse layers per decode step ran the sparse kernel


def test_torch_export_in_default_grad_mode_records_the_op_with_dynamic_shapes(monkeypatch):
    model, _ = _exported_hf_llama()
    assert torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())  # the embedding's
    dims = {0: torch.export.Dim("batch", min=1, max=8), 1: torch.export.Dim("seq", min=1, max=64)}
    ep = torch.export.export(model, (), {"input_ids": torch.randint(0, 64, (2, 8)), "use_cache": False},
                             dynamic_shapes={"input_ids": dims, "use_cache": None})
    ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert ops.count(OP) == 14 and "aten.linear.default" in ops  # 14 sparse layers; lm_head stays dense
    calls = _count_kernel_calls(monkeypatch)
    for shape in [(1, 1), (2, 1), (1, 3), (3, 40)]:  # single tokens take the sparse kernel; prefill dense
        ids = torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(input_ids=ids, use_cache=False).logits,
                                       model(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)
    assert calls.count(1) == 2 * 14 and calls.count(2) == 2 * 14  # (1, 1) and (2, 1), graph and eager


def test_hf_generate_with_a_static_cache_uses_the_sparse_kernel_and_equals_the_sparsified_model(monkeypatch):
    model, reference = _exported_hf_llama()
    calls = _count_kernel_calls(monkeypatch)
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(4))
    kw = {"max_new_tokens": 6, "do_sample": False, "cache_implementation": "static", "pad_token_id": 0}
    out = model.generate(ids, **kw)
    assert torch.equal(out, reference.generate(ids, **kw))
    assert calls.count(1) >= 5 * 14  # every decode step after the prefill ran the kernel in all 14 layers


def test_the_ops_autograd_formula_is_the_masked_layers_gradient():
    from pl_actsparse.export.linear import sparse_inference_linear

    g = torch.Generator().manual_seed(0)
    wt, b, thr = torch.randn(16, 8, generator=g), torch.randn(8, generator=g), torch.tensor(0.5)
    for tokens, limit in [(1, 4), (6, 4), (1, -1)]:  # sparse kernel, dense path, measured limit
        x = torch.randn(tokens, 16, generator=g, requires_grad=True)
        sparse_inference_linear(x, thr, wt, b, limit).square().sum().backward()
        x2 = x.detach().clone().requires_grad_()
        torch.nn.functional.linear(x2.masked_fill(x2.abs() <= thr, 0), wt.t(), b).square().sum().backward()
        torch.testing.assert_close(x.grad, x2.grad)
    torch.library.opcheck(torch.ops.pl_actsparse.sparse_inference_linear.default, (x.detach().requires_grad_(), thr, wt, b, 4),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_exported_int8_model_compiles_exports_and_differentiates_through_one_op():
    from pl_actsparse.core.int8 import quantize_weights_int8
    from pl_actsparse.export.convert import export_for_inference
    from pl_actsparse.kernels.int8_cpu import int8_sparse_linear
    from tiny_models import tiny_llama

    model = tiny_llama()
    sparsify_activations(model, _data(n=2), {TargetScope(patterns=[r".*mlp\..*"]): 0.5}, calibration={"progress": False})
    quantize_weights_int8(model)
    export_for_inference(model)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for shape in [(1, 1), (1, 1), (1, 1)]:  # decode steps: one graph, no break
            ids = torch.randint(0, 64, shape, generator=g)
            torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1 and _graph_breaks() == 0
    dims = {0: torch.export.Dim("batch", min=1, max=8), 1: torch.export.Dim("seq", min=1, max=64)}
    ep = torch.export.export(model, (torch.randint(0, 64, (2, 8)),), dynamic_shapes=(dims,))  # default grad mode
    ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    # 3 blocks x 7 projections + lm_head: export_for_inference exports every int8 layer, the unsparsified ones dense
    assert ops.count("pl_actsparse.int8_sparse_linear.default") == 22
    for shape in [(1, 1), (3, 40)]:
        ids = torch.randint(0, 64, shape, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(ids), model(ids), rtol=1e-5, atol=1e-5)
    # the op's gradient is the masked layer's, on the sparse and the dense path
    layer = model.layers[0].mlp.up_proj
    zp = layer.zero_point if layer.mode == "asym" else None
    w = layer.to_linear().weight.detach()
    for tokens, limit in [(1, 4), (6, 4)]:
        x = torch.randn(tokens, w.shape[1], generator=g, requires_grad=True)
        int8_sparse_linear(x, layer.activation_threshold, layer.qweight_t, layer.scale, zp, layer.bias, limit).sum().backward()
        x2 = x.detach().clone().requires_grad_()
        torch.nn.functional.linear(x2.masked_fill(x2.abs() <= layer.activation_threshold, 0), w, layer.bias).sum().backward()
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
