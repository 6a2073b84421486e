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
from tiny_models import tiny_hf_llama

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
