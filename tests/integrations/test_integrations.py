"""Sparsity that survives other libraries' mechanisms (issue 19): accelerate dispatch/offload, failed loads,
module modes around calibration, activation checkpointing, peft modules_to_save. Real third-party stacks,
tiny random configs, no downloads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pl_actsparse import activation_sparsity_report, TargetScope, calibrate_activation_sparsity, load_activation_sparsity, sparsify_activations
from pl_actsparse.core.layer import sparsified_layers, sparsifier_state
from pl_actsparse.errors import CheckpointError, UnsupportedModuleError
from tiny_models import tiny_hf_llama, token_batches, worst_achieved_miss

transformers = pytest.importorskip("transformers")
MLP = {TargetScope(patterns=[".*mlp.*"]): 0.5}


def _thresholds(model):
    return {n: m.activation_threshold.detach().clone() for n, m in sparsified_layers(model)}


def _device_map(n_layers: int) -> dict[str, str]:
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    dm.update({f"model.layers.{i}": ("cpu" if i == 0 else "disk") for i in range(n_layers)})
    return dm


@pytest.fixture
def saved(tmp_path):
    pytest.importorskip("accelerate")
    data = token_batches(3)
    sparse = sparsify_activations(tiny_hf_llama(), data, MLP, calibration={"progress": False})
    dense_dir, sparse_dir = tmp_path / "dense", tmp_path / "sparse"
    tiny_hf_llama().save_pretrained(dense_dir)
    sparse.save_pretrained(sparse_dir)
    return data, sparse, dense_dir, sparse_dir


def test_from_pretrained_offloaded_sparsifies_like_in_memory(saved, tmp_path):
    import pl_actsparse
    from transformers import AutoModelForCausalLM

    data, sparse, _, sparse_dir = saved
    x = data[0]
    with torch.no_grad():
        want = sparse(x).logits
        dense = AutoModelForCausalLM.from_pretrained(sparse_dir).eval()(x).logits
    m = pl_actsparse.from_pretrained(AutoModelForCausalLM, sparse_dir, device_map=_device_map(2), offload_folder=tmp_path / "off")
    assert m.model.layers[1].mlp.up_proj.weight.device.type == "meta"  # really offloaded
    got_t = _thresholds(m)
    for n, t in _thresholds(sparse).items():
        assert torch.equal(got_t[n], t), n
    with torch.no_grad():
        got = m(x).logits
    assert torch.equal(got, want)
    assert (got - dense).abs().max() > 1e-3  # not silently dense


@pytest.mark.parametrize("method", ["lockstep", "sequential"])
def test_calibrating_a_dispatched_model_equals_in_memory(saved, tmp_path, method):
    from transformers import AutoModelForCausalLM

    data, sparse, dense_dir, _ = saved
    m = AutoModelForCausalLM.from_pretrained(dense_dir, device_map=_device_map(2), offload_folder=tmp_path / "off")
    sparsify_activations(m, data, MLP, calibration={"method": method, "progress": False})
    got_t = _thresholds(m)
    for n, t in _thresholds(sparse).items():
        assert torch.equal(got_t[n], t), n
    with torch.no_grad():
        assert torch.equal(m(data[0]).logits, sparse(data[0]).logits)


def test_cpu_offload_either_order_and_bit_for_bit_removal():
    accelerate = pytest.importorskip("accelerate")
    from pl_actsparse import remove_activation_sparsity

    data = token_batches(3)
    ref = sparsify_activations(tiny_hf_llama(), data, MLP, calibration={"progress": False})
    with torch.no_grad():
        want, dense_want = ref(data[0]).logits, tiny_hf_llama()(data[0]).logits
    before = tiny_hf_llama()  # dispatch, then load the thresholds
    accelerate.cpu_offload(before, execution_device="cpu")
    sparsity = {k: v for k, v in ref.state_dict().items() if k.endswith(("activation_threshold", "_extra_state"))}
    with pytest.warns(UserWarning, match="missing keys"):  # the weights are the offloaded ones
        load_activation_sparsity(before, sparsity, strict=False)
    after = tiny_hf_llama()  # sparsify, then dispatch
    sparsify_activations(after, data, MLP, calibration={"progress": False})
    accelerate.cpu_offload(after, execution_device="cpu")
    report = calibrate_activation_sparsity(before, data, calibration={"progress": False})  # every weight offloaded
    assert {r.name: r.threshold for r in report.layers} == {r.name: r.threshold for r in activation_sparsity_report(ref).layers}
    with torch.no_grad():
        for m in (before, after):
            assert torch.equal(m(data[0]).logits, want)
            remove_activation_sparsity(m)
            assert not list(sparsified_layers(m))
            assert torch.equal(m(data[0]).logits, dense_want)  # dense again, nothing left behind


def test_offload_buffers_is_refused_in_either_order_and_the_refusal_changes_nothing():
    # sparsify then cpu_offload(offload_buffers=True): forwards read the threshold from the copy in the hook's
    # weights_map, which a recalibration cannot update; it crashed in Tensor.item() on meta (in a Lightning run:
    # in the callback's recalibration) instead of naming the cause
    accelerate = pytest.importorskip("accelerate")
    data = token_batches(3)
    first = tiny_hf_llama()  # dispatch, then sparsify
    accelerate.cpu_offload(first, execution_device="cpu", offload_buffers=True)
    with pytest.raises(UnsupportedModuleError, match=r"model\.layers\.0\.mlp\.gate_proj.*offload_buffers=True"):
        sparsify_activations(first, data, MLP, calibration={"progress": False})
    assert not list(sparsified_layers(first))
    ref = sparsify_activations(tiny_hf_llama(), data, MLP, calibration={"progress": False})
    later = sparsify_activations(tiny_hf_llama(), data, MLP, calibration={"progress": False})
    accelerate.cpu_offload(later, execution_device="cpu", offload_buffers=True)
    with torch.no_grad():
        want = ref(data[0]).logits
        assert torch.equal(later(data[0]).logits, want)  # the copy made at dispatch: the calibrated thresholds
    with pytest.raises(UnsupportedModuleError, match=r"model\.layers\.0\.mlp\.gate_proj.*offload_buffers=True.*cannot update"):
        calibrate_activation_sparsity(later, data[1:], calibration={"progress": False})
    with torch.no_grad():
        assert torch.equal(later(data[0]).logits, want)
    assert all(sparsifier_state(m).mode.value == "sparsifying" for _, m in sparsified_layers(later))


@pytest.mark.parametrize("method", ["lockstep", "sequential"])
def test_a_model_without_weights_is_refused_by_name_and_left_unchanged(method):
    # built under accelerate's init_empty_weights (weights on meta, no hook to load them): calibration crashed
    # in aten::bincount ("no fake impl or Meta kernel registered") instead of naming the cause
    accelerate = pytest.importorskip("accelerate")
    config = tiny_hf_llama().config
    with accelerate.init_empty_weights():
        m = transformers.LlamaForCausalLM(config)
    with pytest.raises(UnsupportedModuleError, match=r"(layer 'model\.layers\.0\.mlp\.gate_proj'|block 0) received a meta tensor.*init_empty_weights"):
        sparsify_activations(m, token_batches(2), MLP, calibration={"progress": False, "method": method})
    assert not list(sparsified_layers(m))


def test_a_forward_patch_that_bypasses_the_class_is_refused():
    m = tiny_hf_llama()
    layer = m.model.layers[0].mlp.up_proj
    layer.forward = lambda x: nn.functional.linear(x, layer.weight)  # e.g. a monkeypatch of another tool
    with pytest.raises(UnsupportedModuleError, match=r"model\.layers\.0\.mlp\.up_proj.*replaced on the instance"):
        sparsify_activations(m, token_batches(1), MLP, calibration={"progress": False})
    assert not list(sparsified_layers(m))


# -- fault 2: a failed load changes nothing ---------------------------------------------------------------


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    now = model.state_dict()
    assert now.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(now[k], v), k


def test_failed_int8_load_leaves_model_bit_identical():
    from pl_actsparse.core.int8 import quantize_weights_int8

    data = token_batches(2)
    q = sparsify_activations(tiny_hf_llama(seed=1), data, MLP, calibration={"progress": False})
    quantize_weights_int8(q, TargetScope(patterns=[".*mlp.*"]))
    m = tiny_hf_llama()
    before = _state(m)
    with pytest.raises(CheckpointError, match="int8 layers"):
        load_activation_sparsity(m, q.state_dict())
    _assert_unchanged(m, before)
    assert not list(sparsified_layers(m))


def test_torchao_checkpoint_into_float_model_names_layers_and_fix():
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    data = token_batches(2)
    q = sparsify_activations(tiny_hf_llama(seed=1), data, MLP, calibration={"progress": False})
    quantize_(q, Int8WeightOnlyConfig(), filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear) and "mlp" in fqn)
    m = tiny_hf_llama()
    before = _state(m)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj.*quantized.*quantize_"):
        load_activation_sparsity(m, q.state_dict())
    _assert_unchanged(m, before)


def test_shape_mismatch_is_found_before_copying():
    data = token_batches(2)
    src = sparsify_activations(tiny_hf_llama(), data, MLP, calibration={"progress": False})
    sd = dict(src.state_dict())
    sd["model.norm.weight"] = torch.ones(7)  # the last key: everything before it would have been copied
    m = tiny_hf_llama(seed=3)
    before = _state(m)
    with pytest.raises(CheckpointError, match=r"shape mismatches.*model\.norm\.weight"):
        load_activation_sparsity(m, sd)
    _assert_unchanged(m, before)
    with pytest.warns(UserWarning, match="shape mismatches"):
        load_activation_sparsity(m, sd, strict=False)  # the rest loads
    assert torch.equal(m.model.embed_tokens.weight, src.model.embed_tokens.weight)


# -- fault 3: calibration keeps per-module modes ----------------------------------------------------------


def test_calibration_keeps_every_module_mode_on_success_and_error():
    m = tiny_hf_llama()
    m.train()
    m.model.layers[0].eval()
    modes = {n: mod.training for n, mod in m.named_modules()}
    sparsify_activations(m, token_batches(2), MLP, calibration={"progress": False})
    assert {n: mod.training for n, mod in m.named_modules()} == modes
    calibrate_activation_sparsity(m, token_batches(2), calibration={"progress": False})
    assert {n: mod.training for n, mod in m.named_modules()} == modes

    def boom(item):
        raise RuntimeError("bad batch")

    with pytest.raises(RuntimeError, match="bad batch"):
        calibrate_activation_sparsity(m, token_batches(2), calibration={"transform_fn": boom, "progress": False})
    assert {n: mod.training for n, mod in m.named_modules()} == modes


# -- fault 4: recomputation is not data --------------------------------------------------------------------


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_does_not_change_the_metric(reentrant):
    from pl_actsparse.measure.metric import ActivationSparsity

    from pl_actsparse.core.masking import token_mask

    data = token_batches(2)
    mask = torch.ones_like(data[0])
    mask[0, 10:] = 0  # padding: the recomputation in backward runs outside the forward's token-mask context
    values = []
    for ckpt in (False, True):
        m = sparsify_activations(tiny_hf_llama(), data, MLP, calibration={"progress": False})
        m.train()
        if ckpt:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        metric = ActivationSparsity.from_model(m)
        with metric.observe(m):
            with token_mask(mask.bool()):
                loss = m(data[0], attention_mask=mask, labels=data[0]).loss
            loss.backward()
        values.append(({k: float(v) for k, v in metric.compute().items()}, metric.elements.clone()))
    assert values[0][0] == values[1][0]
    assert torch.equal(values[0][1], values[1][1])  # no element counted twice
    assert int(values[0][1][0]) == int(mask.sum()) * 32


# -- fault 5: peft modules_to_save ---------------------------------------------------------------------------


def test_modules_to_save_resolves_to_the_active_copy_and_keeps_thresholds_on_switch():
    peft = pytest.importorskip("peft")
    data = token_batches(3)
    cfg = dict(target_modules=["q_proj", "v_proj"], modules_to_save=["down_proj"])
    pm = peft.get_peft_model(tiny_hf_llama(), peft.LoraConfig(**cfg))
    sparsify_activations(pm, data, {TargetScope(patterns=[".*down_proj"]): 0.5}, calibration={"progress": False})
    wrapper = "base_model.model.model.layers.0.mlp.down_proj"
    assert [n for n, _ in sparsified_layers(pm)][0] == wrapper + ".modules_to_save.default"
    ref = sparsify_activations(tiny_hf_llama(), data, {TargetScope(patterns=[".*down_proj"]): 0.5}, calibration={"progress": False})
    # LoRA B starts at zero: the model computes what the plain one does, so the thresholds are the same
    assert torch.equal(pm.get_submodule(wrapper + ".modules_to_save.default").activation_threshold,
                       ref.model.layers[0].mlp.down_proj.activation_threshold)
    t_default = _thresholds(pm)
    pm.add_adapter("other", peft.LoraConfig(**cfg))
    pm.set_adapter("other")
    sparsify_activations(pm, data, {TargetScope(patterns=[".*down_proj"]): 0.25}, calibration={"progress": False})
    other = pm.get_submodule(wrapper + ".modules_to_save.other")
    assert sparsifier_state(other).target == 0.25
    pm.set_adapter("default")
    for n, t in t_default.items():
        assert torch.equal(pm.get_submodule(n).activation_threshold, t), n  # untouched by the other's calibration
    calibrate_activation_sparsity(pm, data, calibration={"progress": False})  # the inactive copy is not calibrated (never called)
    from pl_actsparse import remove_activation_sparsity

    remove_activation_sparsity(pm, TargetScope(patterns=[".*down_proj"]))  # every copy, active or not
    assert not list(sparsified_layers(pm))


def test_sparsified_before_peft_recalibrates_the_active_copy():
    peft = pytest.importorskip("peft")
    data = token_batches(3)
    m = sparsify_activations(tiny_hf_llama(), data, {TargetScope(patterns=[".*down_proj"]): 0.5}, calibration={"progress": False})
    pm = peft.get_peft_model(m, peft.LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["down_proj"]))
    report = calibrate_activation_sparsity(pm, data, calibration={"progress": False})
    assert sorted(report.statistics) == [f"base_model.model.model.layers.{i}.mlp.down_proj.modules_to_save.default" for i in range(2)]


# -- fault 6: tracing, left padding ------------------------------------------------------------------------


def test_sparsified_demo_model_traces():
    from pl_actsparse.demos.lightning_models import TinyStoriesLM
    from pl_actsparse.demos.paths import resolve_data_dir

    if not (resolve_data_dir() / "stories260K.bin").is_file():
        pytest.skip("stories260K.bin not in the data directory")
    m = TinyStoriesLM().eval()
    g = torch.Generator().manual_seed(0)
    sparsify_activations(m.model, [torch.randint(0, 512, (2, 16), generator=g) for _ in range(2)],
                         {TargetScope(patterns=[".*up_proj"]): 0.5}, calibration={"progress": False})
    x = torch.randint(0, 512, (2, 16), generator=g)
    with pytest.warns(torch.jit.TracerWarning):
        traced = m.to_torchscript(method="trace", example_inputs=x)
    with torch.no_grad():
        for inp in (x, torch.randint(0, 512, (3, 9), generator=g)):
            assert torch.equal(traced(inp), m(inp))


def test_left_padding_guarantee_is_on_the_real_tokens_of_the_padded_forward():
    """HF Llama computes real tokens differently under left padding (masked attention: ~1e-7 apart), so
    padded and unpadded thresholds are not promised equal; what is guaranteed is that the threshold is the best
    reachable one over exactly the real tokens' inputs of the padded forward, pads never counted."""
    from test_masks import RECIPE, check_real_token_sparsity, pad, random_seqs

    seqs = [random_seqs([12, 5, 9, 16], seed=0), random_seqs([7, 16, 3, 10], seed=1)]
    batches = [pad(s, "left", position_ids=True) for s in seqs]
    model = sparsify_activations(tiny_hf_llama(), batches, RECIPE, calibration={"progress": False})
    check_real_token_sparsity(model, batches, lambda m, b: m(**b))


def test_callback_calibrations_keep_a_frozen_batchnorm_backbone_frozen():
    pl = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader, TensorDataset

    from pl_actsparse import ActivationSparsityCallback

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.backbone = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU())
            self.head = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
            self.backbone.requires_grad_(False)
            self.modes = []

        def forward(self, x):
            return self.head(self.backbone(x))

        def on_train_epoch_start(self):
            self.backbone.eval()  # frozen: BatchNorm statistics must not move

        def training_step(self, batch, batch_idx):
            self.modes.append(self.backbone[1].training)
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.head.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(32, 8, generator=g) * 3 + 1, torch.randint(0, 4, (32,), generator=g))
    net = Net()
    stats = (net.backbone[1].running_mean.clone(), net.backbone[1].running_var.clone())
    cb = ActivationSparsityCallback(scopes=[{"patterns": [r"head\.2"], "sparsity": 0.5}], input_key=0,
                                    calibration_dataloader=DataLoader(data, batch_size=8), recalibrate_every_n_steps=1,
                                    calibration={"progress": False}, verbose=False)
    pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[cb]).fit(net, DataLoader(data, batch_size=8))
    assert len(cb.history) > 2 and net.modes and not any(net.modes)
    assert torch.equal(net.backbone[1].running_mean, stats[0]) and torch.equal(net.backbone[1].running_var, stats[1])


def test_callback_warns_when_a_sparsified_layer_is_never_reached():
    pl = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader, TensorDataset

    from pl_actsparse import ActivationSparsityCallback

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)
            self.use_b = True

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h) if self.use_b else h

        def validation_step(self, batch, batch_idx):
            return self(batch[0]).sum()

    g = torch.Generator().manual_seed(1)
    data = DataLoader(TensorDataset(torch.randn(16, 8, generator=g), torch.zeros(16)), batch_size=8)
    net = Net()
    cb = ActivationSparsityCallback(scopes=[{"types": [nn.Linear], "sparsity": 0.5}], input_key=0,
                                    calibration_dataloader=data, calibration={"progress": False}, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[cb])
    trainer.validate(net, data)
    net.use_b = False  # a path that never reaches b's sparsifier
    with pytest.warns(UserWarning, match=r"val: sparsified layers \['b'\] saw no input"):
        trainer.validate(net, data)
    net.use_b = True
    net.b.forward = lambda x: nn.functional.linear(x, net.b.weight, net.b.bias)  # patched after sparsifying
    with pytest.raises(UnsupportedModuleError, match=r"'b': its forward is replaced on the instance"):
        trainer.validate(net, data)  # found when the callback plans again


@pytest.mark.parametrize("allocation, method", [("uniform", "lockstep"), ("uniform", "sequential"), ("auto", "lockstep")])
def test_hf_batch_encoding_batches_are_keyword_arguments(allocation, method):
    """What HF tokenizers and data collators return (``BatchEncoding``, a mapping but not a dict) calibrates exactly as
    the same dict: keyword arguments, so ``attention_mask`` reaches the model and padding is not counted."""
    ids = token_batches(n=3, batch=2, seq=16)
    masks = [torch.ones_like(x) for x in ids]
    for m in masks:
        m[1, 10:] = 0
    as_dict = [{"input_ids": x, "attention_mask": m} for x, m in zip(ids, masks)]
    as_encoding = [transformers.BatchEncoding(d) for d in as_dict]
    recipe = {TargetScope(patterns=[".*_proj"]): 0.5}
    results = []
    for batches in (as_dict, as_encoding):
        model = tiny_hf_llama().eval()
        sparsify_activations(model, batches, recipe, allocation=allocation, calibration={"method": method, "progress": False})
        results.append(_thresholds(model))
        layer = model.model.layers[0].mlp.down_proj
        assert sparsifier_state(layer).calibration_elements == (16 + 10) * 3 * layer.in_features  # real tokens only
    assert results[0] == results[1]


@pytest.mark.parametrize("quantize_first", [True, False])
def test_torchao_int8_either_order_reaches_the_target_once_calibrated_after_quantizing(quantize_first):
    # docs/int8.md: quantize first; quantizing a sparsified model keeps the float weights' thresholds until recalibrated
    torchao = pytest.importorskip("torchao.quantization")
    data = token_batches(3)
    worst = lambda model: worst_achieved_miss(model, data)  # noqa: E731

    m = tiny_hf_llama()
    torchao.quantize_(m, torchao.Int8WeightOnlyConfig()) if quantize_first else None
    sparsify_activations(m, data, MLP, calibration={"progress": False})
    if not quantize_first:
        torchao.quantize_(m, torchao.Int8WeightOnlyConfig())
        assert worst(m) == pytest.approx(0.0026, abs=1e-3)
        calibrate_activation_sparsity(m, data, calibration={"progress": False})
    assert all(type(l.weight).__name__ == "Int8Tensor" for _, l in sparsified_layers(m)) and len(list(sparsified_layers(m))) == 6
    assert worst(m) == 0.0
