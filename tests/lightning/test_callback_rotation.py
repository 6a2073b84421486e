"""``ActivationSparsityCallback(rotation=...)``: ``rotate_activations`` at ``setup`` on a real third-party stack (tiny
random transformers Llama models, tied and untied heads), before the optimizer exists: the same model and thresholds as
the functional path, the untied head trained, a resumed fit with the checkpoint's structure, errors before any change."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from pl_actsparse import TargetScope, activation_sparsity_disabled, sparsify_activations
from pl_actsparse.core.layer import sparsified_layers
from pl_actsparse.errors import CallbackConfigurationError, InvalidOptionError, UnsupportedModuleError
from pl_actsparse.tuning.rotation import rotate_activations
from test_callback import TinyData, _callback, _trainer
from test_callback_stacks import ConfiguredHFLM

transformers = pytest.importorskip("transformers")
ALL = [{"patterns": [r".*_proj"], "sparsity": 0.5}]


def _llama(tie: bool, seed: int = 3):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # random norm gains, so that folding them is exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    return model


class HFLM(pl.LightningModule):
    def __init__(self, tie: bool = True, model=None) -> None:
        super().__init__()
        self.model = model if model is not None else _llama(tie)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x).logits

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.training_step(batch, batch_idx))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _calibration(data: TinyData) -> list[torch.Tensor]:
    return [x for x, _ in data.calibration_dataloader()]


def test_rotation_at_setup_equals_the_functional_path_and_keeps_the_function():
    data, lm = TinyData(), HFLM(tie=True)
    x = _calibration(data)[0]
    with torch.no_grad():
        before = lm(x)
    cb = _callback(scopes=ALL, submodule="model", rotation=True)
    with pytest.warns(UserWarning, match="untied"):
        _trainer(cb, limit_val_batches=1).validate(lm, datamodule=data, verbose=False)
    assert cb.rotated and cb.state_dict()["rotated"] is True
    model = lm.model
    assert model.lm_head.weight is not model.model.embed_tokens.weight and model.config.tie_word_embeddings is False
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in model.modules() if type(n).__name__ == "LlamaRMSNorm")
    with torch.no_grad(), activation_sparsity_disabled(model):
        after = lm(x)
    assert float((after - before).norm() / before.norm()) < 1e-4  # the dense function is kept
    # the functional path on the same weights and batches: rotate, then sparsify -> the same thresholds
    assert cb.rotation["sparsity"] == 0.5  # the axes turned for the scopes' mean target
    ref = rotate_activations(_llama(tie=True), _calibration(data), calibration={"progress": False}, sparsity=0.5)
    sparsify_activations(ref, _calibration(data), {TargetScope(patterns=ALL[0]["patterns"]): 0.5}, calibration={"progress": False})
    layers = dict(sparsified_layers(ref))
    assert len(layers) == 14
    for name, m in sparsified_layers(model):
        torch.testing.assert_close(m.activation_threshold, layers[name].activation_threshold, rtol=1e-5, atol=1e-7, msg=name)


def test_the_untied_head_is_trained_and_a_second_fit_does_not_rotate_again():
    data, lm = TinyData(), HFLM(tie=True)
    cb = _callback(scopes=ALL, submodule="model", rotation={"heads": False})
    with pytest.warns(UserWarning, match="untied"):
        trainer = _trainer(cb, max_epochs=1, limit_train_batches=2, limit_val_batches=0)
        trainer.fit(lm, datamodule=data)
    head = lm.model.lm_head.weight
    assert any(p is head for group in trainer.optimizers[0].param_groups for p in group["params"])  # built after the rotation
    embed_before, head_before = lm.model.model.embed_tokens.weight.detach().clone(), head.detach().clone()
    _trainer(cb, max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(lm, datamodule=data)  # no rotation, no warning
    assert lm.model.lm_head.weight is head and not torch.equal(head, head_before)  # trained, not re-rotated
    assert not torch.equal(lm.model.model.embed_tokens.weight, embed_before)


@pytest.mark.parametrize("ema_first", [True, False])
def test_weight_averaging_copies_the_rotated_model(ema_first):
    """EMA copies the model in its own setup; a copy of the tied, unrotated model would pair parameters by position with
    the untied, rotated one. The averaging callback's copy is made again after the rotation, whatever the order."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    data, lm = TinyData(), HFLM(tie=True)
    cb, ema = _callback(scopes=ALL, submodule="model", rotation=True), EMAWeightAveraging(decay=0.5)
    with pytest.warns(UserWarning, match="untied"):
        _trainer(*([ema, cb] if ema_first else [cb, ema]), max_epochs=1, limit_train_batches=3, limit_val_batches=0).fit(lm, datamodule=data)
    averaged = dict(ema._average_model.module.named_parameters())
    assert averaged.keys() == dict(lm.named_parameters()).keys()  # the untied head included
    gains = averaged["model.model.layers.0.input_layernorm.weight"]  # folded to 1 by the rotation (random 0.5-1.5 before), then trained a little
    assert float((gains - 1).abs().max()) < 0.01
    # on_train_end swapped the average in: the head is an average of trained rotated heads, not of the embedding
    assert not torch.equal(lm.model.lm_head.weight, lm.model.model.embed_tokens.weight)


def test_stochastic_weight_averaging_listed_first_averages_the_rotated_untied_head():
    """SWA deep-copies the model in its setup and pairs parameters by position: a copy of the tied, unrotated model has no
    head parameter, so the rotated head was neither averaged nor handed back. Its copy is made again after the rotation."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    data, lm = TinyData(), HFLM(tie=True)
    swa, cb = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1), _callback(scopes=ALL, submodule="model", rotation=True)
    with pytest.warns(UserWarning, match="untied"):
        _trainer(swa, cb, max_epochs=2, limit_train_batches=2, limit_val_batches=0).fit(lm, datamodule=data)
    averaged = swa._average_model
    assert [n for n, _ in averaged.named_parameters()] == [n for n, _ in lm.named_parameters()]
    assert torch.equal(lm.model.lm_head.weight, averaged.model.lm_head.weight)  # the average was handed back, the head included
    assert not torch.equal(lm.model.lm_head.weight, lm.model.model.embed_tokens.weight)


def test_a_model_built_in_configure_model_is_rotated_after_it_is_built():
    data, lm = TinyData(), ConfiguredHFLM()
    cb = _callback(scopes=ALL, submodule="model", rotation=True)
    _trainer(cb, limit_val_batches=1).validate(lm, datamodule=data, verbose=False)
    assert lm.builds == 1 and cb.rotated
    assert all(torch.equal(l.input_layernorm.weight, torch.ones_like(l.input_layernorm.weight)) for l in lm.model.model.layers)


def test_resume_needs_the_same_rotation(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = TinyData()
    lm = HFLM(tie=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    with pytest.warns(UserWarning, match="untied"):
        _trainer(_callback(scopes=ALL, submodule="model", rotation=True), ckpt, max_epochs=1, limit_train_batches=2, limit_val_batches=0,
                 enable_checkpointing=True).fit(lm, datamodule=data)
    saved = {k: v.clone() for k, v in lm.model.state_dict().items()}
    resumed = HFLM(tie=True)
    cb = _callback(scopes=ALL, submodule="model", rotation={"heads": False})  # another rotation config: the checkpoint's weights win
    with pytest.warns(UserWarning, match="untied"):
        _trainer(cb, max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(resumed, datamodule=data, ckpt_path=tmp_path / "last.ckpt")
    assert resumed.model.lm_head.weight is not resumed.model.model.embed_tokens.weight
    # nothing trained past the checkpoint's epoch: the resumed model is the checkpoint's, embedding and head apart
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    with pytest.raises(CallbackConfigurationError, match="same rotation="):
        _trainer(_callback(scopes=ALL, submodule="model"), max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(
            HFLM(tie=True), datamodule=data, ckpt_path=tmp_path / "last.ckpt")


def test_resuming_an_unrotated_run_with_rotation_is_refused_by_name(tmp_path):
    """The fresh model rotated at setup has an untied head (one more parameter): the checkpoint's optimizer state failed with
    "loaded state dict contains a parameter group that doesn't match"; the callback now names the cause first."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = TinyData()
    _trainer(_callback(scopes=ALL, submodule="model"), ModelCheckpoint(dirpath=tmp_path, save_last=True), max_epochs=1, limit_train_batches=2,
             limit_val_batches=0, enable_checkpointing=True).fit(HFLM(tie=True), datamodule=data)
    with pytest.warns(UserWarning, match="untied"), pytest.raises(CallbackConfigurationError, match=r"without rotation=.*with rotation=False") as info:
        _trainer(_callback(scopes=ALL, submodule="model", rotation=True), max_epochs=2, limit_train_batches=2, limit_val_batches=0).fit(
            HFLM(tie=True), datamodule=data, ckpt_path=tmp_path / "last.ckpt")
    assert info.value.argument == "rotation"


@pytest.mark.parametrize("value, error, match", [
    ("yes", CallbackConfigurationError, r"rotation must be True, False or a mapping .* got 'yes'"),
    ({"head": True}, CallbackConfigurationError, r"rotation must be True, False or a mapping"),
    ({"heads": 1}, InvalidOptionError, r"heads must be True or False, got 1"),
    ({"tolerance": -1.0}, InvalidOptionError, r"tolerance must be None or a finite number >= 0"),
    ({"sparsity": 1.0}, InvalidOptionError, r"sparsity must be None or a number in \(0, 1\)"),
])
def test_bad_rotation_options_are_refused_at_construction(value, error, match):
    with pytest.raises(error, match=match) as info:
        _callback(scopes=ALL, rotation=value)
    assert info.value.argument == "rotation"  # the YAML key the CLI prints
    assert _callback(scopes=ALL, rotation=False).rotation is None
    assert _callback(scopes=ALL, rotation={"tolerance": 0.01}).rotation == {"heads": True, "tolerance": 0.01, "sparsity": 0.5}
    two = [{"patterns": [r".*mlp\..*"], "sparsity": 0.3}, {"patterns": [r".*attn\..*"], "sparsity": 0.5}]
    assert _callback(scopes=two, rotation=True).rotation["sparsity"] == 0.4  # the mean of the scopes' targets
    assert _callback(scopes=ALL, rotation={"sparsity": None}).rotation["sparsity"] is None  # principal axes only
    assert _callback(scopes=[{"patterns": [".*"], "sparsity": 0.0}], rotation=True).rotation["sparsity"] is None


def _unrotatable(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    if kind == "bert":
        return transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                                    intermediate_size=48))
    if kind == "gemma":  # a 1 + gain RMSNorm: passes the structural checks, fails the logits check (weights put back)
        model = transformers.GemmaForCausalLM(transformers.GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(torch.rand_like(p) + 0.5)
        return model
    peft = pytest.importorskip("peft")  # adapters added in the LightningModule's __init__
    return peft.get_peft_model(_llama(tie=True), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("kind, match", [("gpt2", "pre-norm decoder"), ("bert", "pre-norm decoder"), ("gemma", "not rotation-invariant"),
                                         ("lora", "not a plain float nn.Linear")])
def test_a_model_that_cannot_be_rotated_fails_at_setup_naming_rotation_and_is_unchanged(kind, match):
    model = _unrotatable(kind)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ties = [(n, p.data_ptr()) for n, p in model.named_parameters(remove_duplicate=False)]
    lm = HFLM(model=model)
    with pytest.raises(UnsupportedModuleError, match=rf"\(YAML key rotation\): .*{match}") as info:  # the CLI prints no key for errors in fit
        _trainer(_callback(scopes=[{"patterns": [r".*(_proj|c_fc|intermediate\.dense)$"], "sparsity": 0.5}], submodule="model", rotation=True),
                 max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(lm, datamodule=TinyData())
    assert info.value.argument == "rotation"
    assert not list(sparsified_layers(model))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [(n, p.data_ptr()) for n, p in model.named_parameters(remove_duplicate=False)] == ties  # tying unchanged
    assert getattr(model.config, "tie_word_embeddings", None) in (None, True)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_without_submodule_the_wrapped_hf_config_records_the_untied_head(family):
    """The callback rotates the LightningModule itself when no ``submodule`` is given: the HF model inside it must still
    record the untying (``tie_word_embeddings=False``), or ``tie_weights()`` / ``save_pretrained`` would tie the rotated
    head back to the rotated embedding (a different function)."""
    config = getattr(transformers, f"{family.capitalize() if family != 'qwen2' else 'Qwen2'}Config")(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, tie_word_embeddings=True, head_dim=8)
    torch.manual_seed(0)
    model = getattr(transformers, f"{type(config).__name__[:-6]}ForCausalLM")(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    data, lm = TinyData(), HFLM(model=model)
    x = _calibration(data)[0]
    with torch.no_grad():
        before = lm(x)
    with pytest.warns(UserWarning, match="untied"):
        _trainer(_callback(scopes=ALL, rotation=True), limit_val_batches=1).validate(lm, datamodule=data, verbose=False)
    assert model.config.tie_word_embeddings is False
    model.tie_weights()  # what save_pretrained / from_pretrained do
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    with torch.no_grad(), activation_sparsity_disabled(lm):
        after = lm(x)
    assert float((after - before).norm() / before.norm()) < 1e-4


def test_two_callbacks_on_one_model_the_rotating_one_must_come_first():
    data = TinyData()
    mlp, attn = [{"patterns": [r".*mlp\..*_proj"], "sparsity": 0.5}], [{"patterns": [r".*self_attn\..*_proj"], "sparsity": 0.5}]
    lm = HFLM(tie=False)
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    rotating, other = _callback(scopes=mlp, submodule="model", rotation=True), _callback(scopes=attn, submodule="model")
    with pytest.raises(CallbackConfigurationError, match=r"list the callback with rotation= before any other") as info:
        _trainer(other, rotating, limit_val_batches=1).validate(lm, datamodule=data, verbose=False)
    assert info.value.argument == "rotation" and not rotating.rotated
    assert all(torch.equal(lm.model.state_dict()[k], v) for k, v in state.items())  # not rotated
    assert not list(sparsified_layers(lm)) and not other._layer_names  # the other callback's uncalibrated layers are given back
    lm = HFLM(tie=False)
    rotating, other = _callback(scopes=mlp, submodule="model", rotation=True), _callback(scopes=attn, submodule="model")
    _trainer(rotating, other, limit_val_batches=1).validate(lm, datamodule=data, verbose=False)
    assert rotating.rotated and len(list(sparsified_layers(lm))) == 14


def _ddp_worker(out: str) -> None:  # pragma: no cover - runs in the subprocesses (Lightning's DDP launcher starts rank 1)
    import warnings

    from pl_actsparse.demos.lightning_models import TinyStoriesLM
    from test_ddp import MLP, WORLD, _data

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    # principal axes only: the statistics are sums over ranks, so two ranks equal one process on the union (with
    # sparsity= each rank samples its own tokens: tests/tuning/test_rotation.py checks that the ranks agree)
    cb = _callback(scopes=MLP, input_key=None, rotation={"sparsity": None}, calibration={"transform_fn": lambda b: b[0], "progress": False})
    trainer = _trainer(cb, strategy="ddp", devices=WORLD)
    model = TinyStoriesLM()
    trainer.validate(model, datamodule=_data(), verbose=False)
    torch.save({k: v.clone() for k, v in model.model.state_dict().items()}, f"{out}/rank{trainer.global_rank}.pt")


def test_two_ddp_ranks_rotate_and_calibrate_like_one_process_on_the_union(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from pl_actsparse import calibrate_activation_sparsity, prepare_activation_sparsity
    from pl_actsparse.demos.llama2c import load_llama2c_checkpoint
    from test_ddp import MLP, _data

    here = Path(__file__).resolve()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(here.parents[2]), str(here.parents[1]), str(here.parent)])}
    proc = subprocess.run([sys.executable, str(here), str(tmp_path)], cwd=here.parents[2], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)  # one rotation and the same thresholds on every rank
    union = [x for x, _ in _data().calibration_dataloader()]
    with pytest.warns(UserWarning, match="untied"):
        one = rotate_activations(load_llama2c_checkpoint(), union, calibration={"progress": False})
    prepare_activation_sparsity(one, {TargetScope(patterns=MLP[0]["patterns"]): 0.5})
    calibrate_activation_sparsity(one, union, calibration={"progress": False})
    ref = one.state_dict()
    assert ref.keys() == a.keys() and any(k.endswith("activation_threshold") for k in ref)
    for k in ref:
        torch.testing.assert_close(a[k], ref[k], atol=1e-5, rtol=1e-4, msg=k)


if __name__ == "__main__":  # pragma: no cover
    import sys

    _ddp_worker(sys.argv[1])
