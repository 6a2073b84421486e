"""Saving and loading sparsified and exported models: safetensors, HF save_pretrained, one loader (issue 13)."""

import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import pl_actsparse
from pl_actsparse import TargetScope, activation_sparsity_report, load_activation_sparsity, sparsify_activations
from pl_actsparse.errors import CheckpointError, NotSparsifiedError, UnsupportedModuleError
from pl_actsparse.core.layer import sparsified_layers
from pl_actsparse.core.checkpoint import read_state_dict, saved_sparsifiers
from pl_actsparse.core.layer import SparsifierMode, decode_sparsifier_state, encode_sparsifier_state, sparsifier_state
from tiny_models import tiny_hf_llama, tiny_llama

safetensors_torch = pytest.importorskip("safetensors.torch")

MLP = {TargetScope(patterns=[r".*mlp\..*"]): 0.5}
ROOT = Path(__file__).resolve().parents[2]


def _hf_sparse(seed: int = 0):
    model = tiny_hf_llama(seed=seed)
    g = torch.Generator().manual_seed(3)
    data = [torch.randint(0, 64, (2, 16), generator=g) for _ in range(3)]
    sparsify_activations(model, data, MLP, calibration={"progress": False})
    return model


def _ids():
    return torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(7))


# -- the state is tensors only ------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    target=st.floats(0, 1),
    calibrated=st.booleans(),
    ste=st.booleans(),
    cs=st.one_of(st.none(), st.floats(0, 1)),
    n=st.integers(0, 2**53),
)
def test_sparsifier_state_round_trips_exactly_through_a_tensor(target, calibrated, ste, cs, n):
    d = {"target": target, "calibrated": calibrated, "gradient_mode": "ste" if ste else "masked",
         "calibration_sparsity": cs, "calibration_elements": n}
    t = encode_sparsifier_state(d)
    assert t.dtype == torch.float64 and t.shape == (6,)
    assert decode_sparsifier_state(t) == d


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(6, dtype=torch.float64), "format"),
        (torch.tensor([1.0, 0.5, 2.0, 0, math.nan, 0], dtype=torch.float64), "calibrated must be 0/1"),
        (torch.tensor([1.0, 1.5, 1.0, 0, math.nan, 0], dtype=torch.float64), r"target 1.5 is not in \[0, 1\]"),
        (torch.tensor([1.0, 0.5, 1.0, 0, math.nan, 2.5], dtype=torch.float64), "non-negative integer"),
        ("0.5", "must be a tensor"),
    ],
)
def test_malformed_state_is_a_checkpoint_error(bad, match):
    with pytest.raises(CheckpointError, match=match):
        decode_sparsifier_state(bad)


def test_state_dict_holds_only_tensors_and_safetensors_round_trips(tiny, batches, tmp_path):
    sparsify_activations(tiny, batches, MLP, calibration={"progress": False})
    sd = tiny.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    safetensors_torch.save_model(tiny, str(tmp_path / "m.safetensors"))
    fresh = tiny_llama(seed=4)
    load_activation_sparsity(fresh, tmp_path / "m.safetensors")
    assert torch.equal(fresh(batches[0]), tiny(batches[0]))
    live, loaded = activation_sparsity_report(tiny), activation_sparsity_report(fresh)
    assert [(r.name, r.target, r.calibration_sparsity) for r in loaded.layers] == [
        (r.name, r.target, r.calibration_sparsity) for r in live.layers
    ]
    assert all(sparsifier_state(m).mode is SparsifierMode.SPARSIFYING for _, m in sparsified_layers(fresh))


def test_model_to_half_keeps_the_state_exact(tiny, batches):
    sparsify_activations(tiny, batches, {TargetScope(patterns=[r".*up_proj"]): 0.3}, calibration={"progress": False})
    tiny.half()
    d = decode_sparsifier_state(tiny.state_dict()["layers.0.mlp.up_proj._extra_state"])
    assert d["target"] == 0.3 and d["calibrated"]


# -- item 2: a threshold without state never loads silently dense ------------------------------------


def test_threshold_without_state_is_an_error_under_strict_and_a_sparsifying_layer_otherwise(tiny, batches):
    sparsify_activations(tiny, batches, MLP, calibration={"progress": False})
    ref = tiny(batches[0])
    sd = {k: v for k, v in tiny.state_dict().items() if not k.endswith("_extra_state")}
    fresh = tiny_llama(seed=4)
    with pytest.raises(CheckpointError, match=r"no sparsifier state \('_extra_state'\) for \['layers.0.mlp.down_proj'"):
        load_activation_sparsity(fresh, sd)
    assert not list(sparsified_layers(fresh))  # nothing changed
    with pytest.warns(UserWarning, match="sparsifies with the loaded threshold"):
        load_activation_sparsity(fresh, sd, strict=False)
    layers = dict(sparsified_layers(fresh))
    assert len(layers) == 9 and all(sparsifier_state(m).mode is SparsifierMode.SPARSIFYING for m in layers.values())
    assert torch.equal(fresh(batches[0]), ref)  # sparsifying exactly as saved, not dense
    # plain load_state_dict into a sparsified model: strict fails, non-strict warns and sparsifies
    other = tiny_llama(seed=4)
    pl_actsparse.prepare_activation_sparsity(other, MLP)
    with pytest.raises(RuntimeError, match="_extra_state"):
        other.load_state_dict(sd)
    with pytest.warns(UserWarning, match="layers.1.mlp.up_proj"):
        other.load_state_dict(sd, strict=False)
    assert torch.equal(other(batches[0]), ref)


def test_state_without_threshold_is_an_error(tiny, batches):
    sparsify_activations(tiny, batches, MLP, calibration={"progress": False})
    sd = dict(tiny.state_dict())
    del sd["layers.0.mlp.up_proj.activation_threshold"]
    with pytest.raises(CheckpointError, match=r"'layers.0.mlp.up_proj._extra_state' holds a sparsifier state but .* no 'activation_threshold'"):
        load_activation_sparsity(tiny_llama(), sd)


def test_one_parser_one_error_for_the_same_input(tiny, batches):
    """The loader, the callback helper and model_report read a state dict through one parser."""
    from pl_actsparse.api import install_sparsifiers_from_state_dict
    from pl_actsparse.measure.report import model_report

    sparsify_activations(tiny, batches, MLP, calibration={"progress": False})
    sd = dict(tiny.state_dict())
    sd["layers.0.mlp.up_proj._extra_state"] = torch.zeros(3)
    for call in (lambda: load_activation_sparsity(tiny_llama(), sd),
                 lambda: install_sparsifiers_from_state_dict(tiny_llama(), sd),
                 lambda: model_report(sd)):
        with pytest.raises(CheckpointError, match="layers.0.mlp.up_proj._extra_state"):
            call()
    # a layer the model lacks, or that is not an nn.Linear: the same error type from both installers
    sd = {"nope.activation_threshold": torch.tensor(0.1), "layers.0.mlp.activation_threshold": torch.tensor(0.1)}
    for fn in (load_activation_sparsity, install_sparsifiers_from_state_dict):
        with pytest.raises(NotSparsifiedError, match="'nope'"):
            fn(tiny_llama(), sd)
        with pytest.raises(UnsupportedModuleError, match=r"'layers.0.mlp' \(TinyMLP\)"):
            fn(tiny_llama(), {"layers.0.mlp.activation_threshold": torch.tensor(0.1)})
    names = [e.name for e in saved_sparsifiers(read_state_dict({"state_dict": {"m.a.activation_threshold": torch.tensor(1.0)}}, prefix="m."))]
    assert names == ["a"]


def test_strict_mismatch_is_reported_and_nothing_changes(tiny, batches):
    sparsify_activations(tiny, batches, MLP, calibration={"progress": False})
    sd = dict(tiny.state_dict())
    sd["extra.weight"] = torch.zeros(1)
    fresh = tiny_llama(seed=4)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"unexpected keys \['extra.weight'\]"):
        load_activation_sparsity(fresh, sd)
    assert not list(sparsified_layers(fresh))
    with pytest.warns(UserWarning, match="extra.weight"):
        load_activation_sparsity(fresh, sd, strict=False)
    assert torch.equal(fresh(batches[0]), tiny(batches[0]))
    assert set(before) <= set(fresh.state_dict())


def test_reading_a_path_that_is_no_checkpoint(tmp_path):
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        read_state_dict(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="not a save_pretrained folder"):
        read_state_dict(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "missing.safetensors")


# -- item 1 and 3: HF save_pretrained, in a new process ----------------------------------------------

_LOAD_SCRIPT = textwrap.dedent(
    """
    import sys, torch, transformers, pl_actsparse
    from pl_actsparse.core.layer import SparsifierMode, sparsified_layers, sparsifier_state
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(7))
    out = {}
    for folder in sys.argv[2:]:
        model = pl_actsparse.from_pretrained(transformers.AutoModelForCausalLM, folder)
        layers = dict(sparsified_layers(model))
        assert len(layers) == 6 and all(sparsifier_state(m).mode is SparsifierMode.SPARSIFYING for m in layers.values()), layers
        with torch.no_grad():
            out[folder] = model(ids).logits
    torch.save(out, sys.argv[1])
    """
)


def test_save_pretrained_loads_back_sparsifying_in_a_new_process(tmp_path):
    """A sparsified and an exported HF model: save_pretrained (safetensors), then one call in a new process."""
    pytest.importorskip("transformers")
    refs = {}
    for exported in (False, True):
        model = _hf_sparse()
        with torch.no_grad():
            ref = model(_ids()).logits
        if exported:
            pl_actsparse.export_for_inference(model, max_sparse_tokens=4)
        folder = tmp_path / ("exported" if exported else "sparsified")
        model.save_pretrained(folder)
        assert (folder / "model.safetensors").is_file()
        assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pkl"))
        refs[str(folder)] = ref
    with torch.no_grad():
        dense = tiny_hf_llama()(_ids()).logits
    assert not torch.allclose(ref, dense, atol=1e-4)  # the sparsity changes the outputs: the check below can fail
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRANSFORMERS_OFFLINE="1", HF_HUB_OFFLINE="1")
    out = tmp_path / "out.pt"
    proc = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(out), *refs], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    for folder, ref in refs.items():
        # the exported model saved W^T transposed back (exact); the reload is the sparsified model
        torch.testing.assert_close(got[folder], ref, rtol=0, atol=0)


def test_exported_save_loads_right_weights_into_a_plain_hf_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _hf_sparse()
    weights = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("weight")}
    pl_actsparse.export_for_inference(model)
    model.save_pretrained(tmp_path / "saved")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    got = plain.state_dict()
    # the exported layers' W^T was saved in the [out, in] layout: nothing is left random
    assert all(torch.equal(got[k], v) for k, v in weights.items())
    assert all(type(m) is nn.Linear for m in plain.modules() if isinstance(m, nn.Linear))


def test_tied_weights_of_a_save_pretrained_folder_count_as_loaded(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    sparsify_activations(model, [torch.randint(0, 64, (2, 8))], MLP, calibration={"progress": False})
    model.save_pretrained(tmp_path / "tied")
    back = pl_actsparse.from_pretrained(transformers.LlamaForCausalLM, tmp_path / "tied")
    ids = _ids()
    assert torch.equal(back(ids).logits, model(ids).logits)
    assert back.lm_head.weight is back.model.embed_tokens.weight


def test_from_pretrained_needs_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="save_pretrained folder"):
        pl_actsparse.from_pretrained(nn.Linear, tmp_path / "nothing")


# -- int8 models ------------------------------------------------------------------------------------------


def test_exported_int8_model_saves_in_the_int8_layer_layout_and_loads_back(tmp_path, batches):
    from pl_actsparse.core.int8 import quantize_weights_int8
    from pl_actsparse.export.int8_linear import Int8SparseInferenceLinear

    scope = TargetScope(patterns=[r".*down_proj"])
    model = tiny_llama()
    quantize_weights_int8(model, scope)
    sparsify_activations(model, batches, MLP, calibration={"progress": False})
    with torch.no_grad():
        ref = model(batches[0])
    keys = set(model.state_dict())
    pl_actsparse.export_for_inference(model)
    assert isinstance(model.layers[0].mlp.down_proj, Int8SparseInferenceLinear)
    assert set(model.state_dict()) == keys  # the same keys as before the export: qweight, scale, ... state
    safetensors_torch.save_model(model, str(tmp_path / "int8.safetensors"))
    # into a model quantized the same way: the int8 sparse model as saved
    fresh = tiny_llama(seed=3)
    quantize_weights_int8(fresh, scope)
    load_activation_sparsity(fresh, tmp_path / "int8.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh(batches[0]), ref, rtol=0, atol=0)
    # into a float model: refused by name, never random or re-quantized weights
    with pytest.raises(CheckpointError, match=r"\['layers.0.mlp.down_proj', .*\] are int8 layers .* quantize the model the same way first"):
        load_activation_sparsity(tiny_llama(), tmp_path / "int8.safetensors")
    # and back into the exported model itself
    model.load_state_dict(fresh.state_dict())


def test_from_pretrained_in_bf16_sparsifies_like_the_saved_model_cast_to_bf16(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _hf_sparse()
    model.save_pretrained(tmp_path / "saved")
    back = pl_actsparse.from_pretrained(transformers.LlamaForCausalLM, tmp_path / "saved", dtype=torch.bfloat16)
    assert back.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert len(list(sparsified_layers(back))) == 6
    thresholds = {n: m.activation_threshold for n, m in sparsified_layers(model)}
    assert all(torch.equal(m.activation_threshold, thresholds[n]) for n, m in sparsified_layers(back))
    assert all(sparsifier_state(m).mode is SparsifierMode.SPARSIFYING for _, m in sparsified_layers(back))
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.bfloat16)  # dense
    ids = _ids()
    with torch.no_grad():
        got, dense = back(ids).logits, plain(ids).logits
        # HF keeps some buffers (rotary inv_freq) in fp32 when loading in bf16, model.to() does not: a tolerance
        torch.testing.assert_close(got.float(), model.to(torch.bfloat16)(ids).logits.float(), rtol=3e-2, atol=3e-2)
    assert (got - dense).abs().max() > 1e-2  # the loaded bf16 model sparsifies
