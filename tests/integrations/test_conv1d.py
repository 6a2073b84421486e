"""GPT-2's ``Conv1D`` (a Linear with a ``[in, out]`` weight) and other registered Linear-like types are
supported everywhere an ``nn.Linear`` is: scopes, calibration, metric, training, removal, export."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from pl_actsparse.core.layer import is_sparsified, sparsifier_state
from pl_actsparse import (
    TargetScope,
    activation_sparsity_report,
    load_activation_sparsity,
    remove_activation_sparsity,
    sparsify_activations,
)
from pl_actsparse.errors import UnsupportedModuleError
from pl_actsparse.core.layer import (
    is_linear_like,
    linear_like_weight,
    linear_like_weight_t,
    register_linear_like,
    supported_layer_types,
    weight_nbytes,
)
from pl_actsparse.export.linear import SparseInferenceLinear
from pl_actsparse.export.convert import export_for_inference
from pl_actsparse.kernels import cpu
from pl_actsparse.measure.metric import ActivationSparsity
from pl_actsparse.measure.metric import SparsityCounter

from tiny_models import best_reachable

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = {TargetScope(patterns=[r".*c_fc"]): 0.4, TargetScope(patterns=[r".*mlp\.c_proj"]): 0.5}


def tiny_gpt2(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


def gpt2_batches(n=3, batch=2, seq=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (batch, seq), generator=g)} for _ in range(n)]


def _inputs_of(model, names, batches):
    """Inputs (before zeroing) of each named layer over ``batches``, in the sparsified model."""
    modules = dict(model.named_modules())
    seen = {n: [] for n in names}
    hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach())) for n in names]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    return {n: torch.cat([x.reshape(-1, x.shape[-1]) for x in v]) for n, v in seen.items()}


def test_conv1d_is_registered_without_importing_transformers():
    code = (
        "import sys, pl_actsparse, pl_actsparse.core.layer as L, pl_actsparse.export.linear;"
        "import torch.nn as nn;"
        "assert L.is_linear_like(nn.Linear(2, 2)) and not L.is_linear_like(nn.ReLU());"
        "assert 'transformers' not in sys.modules, 'transformers imported';"
        "import transformers.pytorch_utils as p;"
        "assert L.is_linear_like(p.Conv1D(3, 2)) and p.Conv1D in L.supported_layer_types()"
    )
    pytest.importorskip("transformers")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_gpt2_conv1d_calibration_is_exact_and_removal_bit_for_bit():
    model = tiny_gpt2()
    original = copy.deepcopy(model.state_dict())
    batches = gpt2_batches()
    probe = {"input_ids": torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(5))}
    with torch.no_grad():
        dense_logits = model(**probe).logits
    sparsify_activations(model, batches, RECIPE, calibration={"progress": False})
    names = [f"transformer.h.{i}.mlp.{p}" for i in range(2) for p in ("c_fc", "c_proj")]
    report = activation_sparsity_report(model)
    assert [r.name for r in report.layers] == names
    modules = dict(model.named_modules())
    inputs = _inputs_of(model, names, batches)
    for n in names:
        m = modules[n]
        assert type(m).__name__ == "SparseActivationConv1D"
        assert m.in_features == m.nx and m.out_features == m.nf
        x = inputs[n]
        target = 0.4 if n.endswith("c_fc") else 0.5
        achieved = float((x.abs() <= m.activation_threshold).double().mean())
        assert achieved == pytest.approx(best_reachable(x.abs(), target), abs=1e-12)
        assert achieved == pytest.approx(target, abs=1.0 / x.numel())
        assert sparsifier_state(m).calibration_sparsity == pytest.approx(achieved, abs=1e-12)
        assert sparsifier_state(m).calibration_elements == x.numel()
    # the metric and the counter read Conv1D layers like Linear ones
    metric = ActivationSparsity.from_model(model)
    assert metric.in_features == [64, 256, 64, 256]
    with SparsityCounter(model) as counter, torch.no_grad():
        for b in batches:
            model(**b)
    for n in names:
        assert counter.sparsity()[n] == pytest.approx(sparsifier_state(modules[n]).calibration_sparsity, abs=1e-12)

    remove_activation_sparsity(model)
    from transformers.pytorch_utils import Conv1D

    for n in names:
        assert type(modules[n]) is Conv1D
        assert not is_sparsified(modules[n]) and "activation_threshold" not in modules[n]._buffers
    state = model.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(model(**probe).logits, dense_logits)


def test_gpt2_checkpoint_round_trip():
    model = tiny_gpt2()
    sparsify_activations(model, gpt2_batches(), RECIPE, calibration={"progress": False})
    fresh = tiny_gpt2(seed=3)
    load_activation_sparsity(fresh, model.state_dict())
    a, b = dict(model.named_modules()), dict(fresh.named_modules())
    for n, m in a.items():
        if is_sparsified(m):
            assert torch.equal(b[n].activation_threshold, m.activation_threshold)
            assert sparsifier_state(b[n]).calibration_sparsity == sparsifier_state(m).calibration_sparsity


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gpt2_export_matches_the_sparsified_model(backend):
    if backend == "cpp" and not cpu.load_extension(build=os.environ.get("PL_ACTSPARSE_BUILD_EXT") == "1"):
        pytest.skip("C++ kernel not built (PL_ACTSPARSE_BUILD_EXT=1 builds it)")
    model = tiny_gpt2()
    sparsify_activations(model, gpt2_batches(), RECIPE, calibration={"progress": False})
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(7))
    modules = dict(model.named_modules())
    fc = modules["transformer.h.0.mlp.c_fc"]
    cpu.set_backend(backend)
    try:
        with torch.no_grad():
            expected = model(input_ids=ids).logits
        exported = export_for_inference(copy.deepcopy(model), max_sparse_tokens=1 << 20)  # sparse kernel always
        layer = dict(exported.named_modules())["transformer.h.0.mlp.c_fc"]
        assert isinstance(layer, SparseInferenceLinear)
        assert (layer.in_features, layer.out_features) == (64, 256)
        assert torch.equal(layer.weight_t, fc.weight)  # Conv1D already stores W^T
        with torch.no_grad():
            got = exported(input_ids=ids).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-5 * float(expected.abs().max()))
    finally:
        cpu.set_backend(None)


def test_sparsified_conv1d_trains_with_the_masked_gradient():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    conv = transformers.pytorch_utils.Conv1D(6, 5)
    data = [torch.randn(4, 3, 5) for _ in range(2)]
    sparsify_activations(nn.Sequential(conv), data, {TargetScope(names=["0"]): 0.5}, calibration={"progress": False})
    x = torch.randn(2, 3, 5, requires_grad=True)
    y = conv(x)
    g = torch.randn_like(y)
    y.backward(g)
    keep = (x.abs() > conv.activation_threshold).float()
    xs = (x * keep).detach()
    torch.testing.assert_close(y.detach(), xs @ conv.weight.detach() + conv.bias.detach())
    torch.testing.assert_close(conv.weight.grad, xs.reshape(-1, 5).t() @ g.reshape(-1, 6))
    torch.testing.assert_close(x.grad, keep * (g @ conv.weight.detach().t()))
    assert 0 < float(keep.mean()) < 1


class TransposedLinear(nn.Module):
    """A user's Linear-like layer storing W^T under another name (consumers that read ``.weight`` use
    ``weight_nbytes``/``linear_like_weight_t`` instead)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.w_t = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)

    def forward(self, x):
        return x @ self.w_t


def test_registering_another_linear_like_type():
    net = nn.Sequential(TransposedLinear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    data = [torch.randn(32, 8) for _ in range(2)]
    with pytest.raises(UnsupportedModuleError, match="register_linear_like"):
        sparsify_activations(net, data, {TargetScope(names=["0"]): 0.5}, calibration={"progress": False})
    assert not is_linear_like(net[0])
    with pytest.raises(TypeError):
        register_linear_like(int, in_features=len, out_features=len, weight_t=len)
    register_linear_like(TransposedLinear, in_features=lambda m: m.w_t.shape[0], out_features=lambda m: m.w_t.shape[1],
                         weight_t=lambda m: m.w_t)
    try:
        assert TransposedLinear in supported_layer_types()
        assert linear_like_weight_t(net[0]) is net[0].w_t
        assert torch.equal(linear_like_weight(net[0]), net[0].w_t.t())
        sparsify_activations(net, data, {TargetScope(types=[TransposedLinear]): 0.5}, calibration={"progress": False})
        x = torch.cat(data)
        assert float((x.abs() <= net[0].activation_threshold).float().mean()) == 0.5
        assert net[0].in_features == 8 and net[0].out_features == 16
        assert weight_nbytes(net[0]) == 8 * 16 * 4
        with torch.no_grad():
            expected = net(x[:3])
        exported = export_for_inference(copy.deepcopy(net), max_sparse_tokens=1 << 20)
        with torch.no_grad():
            torch.testing.assert_close(exported(x[:3]), expected, rtol=0, atol=1e-5)
        remove_activation_sparsity(net)
        assert type(net[0]) is TransposedLinear
    finally:
        from pl_actsparse.core import layer

        layer._LINEAR_LIKE.pop(TransposedLinear, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("target", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_conv1d_behaves_as_the_equivalent_linear(dtype, target):
    """Table: a Conv1D and the nn.Linear with the transposed weight get the same threshold, statistics and
    outputs, plain and weight-aware (per-channel thresholds, which rescale the weight along its input axis)."""
    transformers = pytest.importorskip("transformers")
    from pl_actsparse.tuning.weight_aware import sparsify_activations_weight_aware

    torch.manual_seed(0)
    conv = transformers.pytorch_utils.Conv1D(12, 10).to(dtype)
    lin = nn.Linear(10, 12).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    data = [torch.randn(3, 7, 10).to(dtype) for _ in range(2)]
    probe = torch.randn(4, 10).to(dtype)
    for fn in (sparsify_activations, sparsify_activations_weight_aware):
        c, l = nn.Sequential(copy.deepcopy(conv)), nn.Sequential(copy.deepcopy(lin))
        w_before = c[0].weight.clone()
        fn(c, data, {TargetScope(names=["0"]): target}, calibration={"progress": False})
        fn(l, data, {TargetScope(names=["0"]): target}, calibration={"progress": False})
        assert torch.equal(c[0].activation_threshold, l[0].activation_threshold), fn.__name__
        assert sparsifier_state(c[0]).calibration_sparsity == sparsifier_state(l[0]).calibration_sparsity
        assert torch.equal(c[0].weight, w_before)  # weight-aware puts the very weights back
        with torch.no_grad():
            torch.testing.assert_close(c(probe), l(probe), rtol=0, atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_gpt2_with_the_lightning_callback(tmp_path):
    """validate calibrates Conv1D layers and logs their sparsity; fit fine-tunes through them; a checkpoint
    restores them into a fresh model."""
    pl = pytest.importorskip("lightning.pytorch")
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from pl_actsparse import ActivationSparsityCallback
    from pl_actsparse.api import install_sparsifiers_from_state_dict

    class GPT2LM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_gpt2().train()

        def forward(self, ids):
            return self.model(input_ids=ids).logits

        def _loss(self, batch):
            x, y = batch
            return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

        def training_step(self, batch, batch_idx):
            return self._loss(batch)

        def validation_step(self, batch, batch_idx):
            self.log("val/loss", self._loss(batch))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

        def on_load_checkpoint(self, checkpoint):
            install_sparsifiers_from_state_dict(self, checkpoint["state_dict"])

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (12, 17), generator=g)
    loader = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=4)
    calib = list(loader)
    cb = ActivationSparsityCallback(
        scopes=[{"patterns": [r".*c_fc", r".*mlp\.c_proj"], "sparsity": 0.5}],
        calibration_dataloader=calib, input_key=0, calibration={"progress": False}, verbose=False,
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, max_steps=2, callbacks=[cb],
    )
    lm = GPT2LM()
    results = trainer.validate(lm, dataloaders=loader, verbose=False)[0]
    fc = lm.model.transformer.h[0].mlp.c_fc
    assert type(fc).__name__ == "SparseActivationConv1D"
    assert sparsifier_state(fc).calibration_sparsity == pytest.approx(0.5, abs=1 / sparsifier_state(fc).calibration_elements)
    assert "actsparse/val/sparsity" in results
    before = fc.weight.detach().clone()
    trainer.fit(lm, train_dataloaders=loader, val_dataloaders=loader)
    assert not torch.equal(fc.weight, before)  # fine-tuned through the sparsified Conv1D
    path = tmp_path / "gpt2.ckpt"
    trainer.save_checkpoint(path)
    fresh = GPT2LM.load_from_checkpoint(path)
    fc2 = fresh.model.transformer.h[0].mlp.c_fc
    assert torch.equal(fc2.activation_threshold, fc.activation_threshold)
    assert torch.equal(fc2.weight, fc.weight)


def test_exported_gpt2_removes_saves_and_loads_in_the_conv1d_layout(tmp_path):
    """An exported Conv1D keeps GPT-2's [in, out] weight layout: removal gives back the Conv1D bit for bit, and a
    save_pretrained folder loads into plain HF (the dense model) and through pl_actsparse.from_pretrained."""
    transformers = pytest.importorskip("transformers")
    import pl_actsparse
    from pl_actsparse import remove_activation_sparsity

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=32)
    dense = transformers.GPT2LMHeadModel(cfg).eval()
    model = copy.deepcopy(dense)
    ids = torch.randint(0, 128, (3, 12))
    sparsify_activations(model, [ids], {TargetScope(patterns=[r".*mlp\.c_fc", r".*mlp\.c_proj"]): 0.5}, calibration={"progress": False})
    with torch.no_grad():
        sparse_logits = model(ids).logits
    export_for_inference(model)
    model.save_pretrained(tmp_path / "exported")
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, sparse_logits, atol=1e-5)
    remove_activation_sparsity(model)
    for (n, a), (_, b) in zip(model.state_dict().items(), dense.state_dict().items()):
        assert a.shape == b.shape and torch.equal(a, b), n
    assert type(model.transformer.h[0].mlp.c_fc) is type(dense.transformer.h[0].mlp.c_fc)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense(ids).logits)
        plain = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "exported").eval()
        assert torch.equal(plain(ids).logits, dense(ids).logits)
        loaded = pl_actsparse.from_pretrained(transformers.GPT2LMHeadModel, tmp_path / "exported").eval()
        assert torch.allclose(loaded(ids).logits, sparse_logits, atol=1e-5)


def test_checkpoint_report_of_gpt2_equals_the_live_report():
    """A state dict holds Conv1D weights as [in, out]: the checkpoint report reads the widths the right way round."""
    transformers = pytest.importorskip("transformers")
    from pl_actsparse.measure.report import model_report

    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=128, n_positions=32)).eval()
    sparsify_activations(m, [torch.randint(0, 128, (2, 8))], {TargetScope(patterns=[r".*mlp\.c_fc"]): 0.5}, calibration={"progress": False})
    live, saved = model_report(m), model_report(m.state_dict())
    assert [(r.name, r.in_features, r.out_features, r.weight_bytes) for r in live.layers] == \
        [(r.name, r.in_features, r.out_features, r.weight_bytes) for r in saved.layers] == \
        [("transformer.h.0.mlp.c_fc", 64, 256, 64 * 256 * 4)]
    assert live.decode_bytes == saved.decode_bytes
