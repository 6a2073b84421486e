"""Every error raised at a public boundary is of the one family (pl_actsparse.errors) and names the value."""

import pytest
import torch
from torch import nn

import pl_actsparse.errors as E
from pl_actsparse import TargetScope, activation_sparsity_report, load_activation_sparsity, prepare_activation_sparsity, sparsify_activations
from pl_actsparse.calibrate.groups import find_shared_input_groups
from pl_actsparse.core.int8 import Int8WeightLinear, quantize_weights_int8
from pl_actsparse.core.layer import install_sparsifier, linear_like_weight_t, sparsifier_state
from pl_actsparse.core.recipe import scopes_from_list
from pl_actsparse.export.convert import export_for_inference
from pl_actsparse.export.int8_linear import Int8SparseInferenceLinear
from pl_actsparse.measure.metric import ActivationSparsity, quantile_from_histogram
from pl_actsparse.measure.report import model_report
from pl_actsparse.tuning.sweep import sweep_sparsity
from pl_actsparse.tuning.weight_aware import sparsify_activations_weight_aware


def _net():
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


CASES = {
    "gradient_mode": (lambda: prepare_activation_sparsity(_net(), {TargetScope(names=["0"]): 0.5}, gradient_mode="sgd"),
                      E.InvalidOptionError, "'sgd'"),
    "groups layers": (lambda: find_shared_input_groups(_net(), torch.randn(2, 4), ["nope"]), E.UnsupportedModuleError, "'nope'"),
    "weight_t of a non-Linear": (lambda: linear_like_weight_t(nn.ReLU()), E.UnsupportedModuleError, "ReLU"),
    "install on a non-Linear": (lambda: install_sparsifier(nn.ReLU(), 0.5), E.UnsupportedModuleError, "ReLU"),
    "state of a plain layer": (lambda: sparsifier_state(nn.Linear(2, 2)), E.NotSparsifiedError, "Linear"),
    "int8 mode": (lambda: Int8WeightLinear(4, 2, mode="fp4"), E.InvalidOptionError, "'fp4'"),
    "int8 granularity": (lambda: Int8WeightLinear(4, 2, granularity="row"), E.InvalidOptionError, "'row'"),
    "int8 weight shape": (lambda: Int8WeightLinear(4, 2).set_weight(torch.zeros(3, 3)), E.InvalidOptionError, r"\(3, 3\)"),
    "int8 scope type": (lambda: quantize_weights_int8(_net(), "0"), E.InvalidScopeError, "'0'"),
    "int8 scope matches nothing": (lambda: quantize_weights_int8(_net(), TargetScope(names=["5"], validate=False)),
                                   E.UnmatchedScopeError, "'5'"),
    "report data on a checkpoint": (lambda: model_report({"x": torch.zeros(1)}, data=[torch.zeros(1)]),
                                    E.InvalidOptionError, "dict"),
    "quantile q": (lambda: quantile_from_histogram(torch.arange(3.0), torch.ones(3), 1.5), E.InvalidOptionError, "1.5"),
    "quantile interpolation": (lambda: quantile_from_histogram(torch.arange(3.0), torch.ones(3), 0.5, "cubic"),
                               E.InvalidOptionError, "'cubic'"),
    "metric token_bins": (lambda: ActivationSparsity(["a"], [4], token_bins=0), E.InvalidOptionError, "0"),
    "metric duplicate layers": (lambda: ActivationSparsity(["a", "a"], [4, 4]), E.InvalidOptionError, "'a'"),
    "int8 export max_sparse_tokens": (lambda: Int8SparseInferenceLinear(Int8WeightLinear(4, 2), max_sparse_tokens=-1),
                                      E.InvalidOptionError, "-1"),
    "export of nothing": (lambda: export_for_inference(_net()), E.NotSparsifiedError, "Sequential"),
    "scope spec key": (lambda: scopes_from_list([{"pattern": ["x"], "sparsity": 0.5}]), E.ScopeSpecError, "'pattern'"),
    "TargetScope keyword typo": (lambda: TargetScope(pattern=[".*"]), E.InvalidScopeError, "'pattern'; did you mean patterns=\\?"),
    "export max_sparse_tokens not an int": (lambda: export_for_inference(_sparse_net(), max_sparse_tokens="x"), E.InvalidOptionError, "'x'"),
    "export max_sparse_tokens negative": (lambda: export_for_inference(_sparse_net(), max_sparse_tokens=-5), E.InvalidOptionError, "-5"),
    "export max_sparse_tokens bool": (lambda: export_for_inference(_sparse_net(), max_sparse_tokens=True), E.InvalidOptionError, "True"),
    "report token_mask": (lambda: model_report(_sparse_net(), [torch.randn(2, 4)], token_mask="bogus"), E.TokenMaskError, "'bogus'"),
    "report token_mask without data": (lambda: model_report(_sparse_net(), token_mask=3), E.TokenMaskError, "got 3"),
    "load strict": (lambda: load_activation_sparsity(_net(), _sparse_net().state_dict(), strict="yes"), E.InvalidOptionError, "'yes'"),
    "one tensor as calibration data": (lambda: sparsify_activations(_net(), torch.randn(8, 4), {TargetScope(names=["0"]): 0.5}),
                                       E.InvalidOptionError, r"got one Tensor of shape \(8, 4\).*pass \[tensor\]"),
    "one tensor as report data": (lambda: model_report(_sparse_net(), torch.randn(8, 4)), E.InvalidOptionError, r"\(8, 4\)"),
    "one tensor to allocation='auto'": (lambda: sparsify_activations(_net(), torch.randn(8, 4), {TargetScope(names=["0"]): 0.5}, allocation="auto"),
                                        E.InvalidOptionError, r"\(8, 4\).*pass \[tensor\]"),
    "one tensor to sweep_sparsity": (lambda: sweep_sparsity(_net(), torch.randn(8, 4), [0.5], lambda m: 0.0, TargetScope(names=["0"])),
                                     E.InvalidOptionError, r"\(8, 4\).*pass \[tensor\]"),
    "one tensor to weight-aware": (lambda: sparsify_activations_weight_aware(_net(), torch.randn(8, 4), {TargetScope(names=["0"]): 0.5}),
                                   E.InvalidOptionError, r"\(8, 4\).*pass \[tensor\]"),
}


def _sparse_net():
    net = _net()
    sparsify_activations(net, [torch.randn(8, 4)], {TargetScope(names=["0"]): 0.5}, calibration={"progress": False})
    return net


@pytest.mark.parametrize("call", [lambda: export_for_inference("model"), lambda: activation_sparsity_report("model")])
def test_a_non_module_model_is_a_type_error_naming_the_argument(call):
    with pytest.raises(TypeError, match=r"model must be an nn.Module.*got str 'model'"):
        call()


def test_unmatched_regex_looking_names_and_type_strings_get_a_hint():
    """A positional string is a name: one that looks like a regex says to use patterns=; a type string how types match."""
    with pytest.raises(E.UnmatchedScopeError, match=r"name '\.\*up_proj' \(a regular expression\? pass it as patterns=\[...\]\)"):
        prepare_activation_sparsity(_net(), {TargetScope(".*up_proj"): 0.5})
    with pytest.raises(E.UnmatchedScopeError, match=r"type 'nn.Linear' \(a class, its __name__ such as 'Linear'"):
        prepare_activation_sparsity(_net(), {TargetScope(types=["nn.Linear"]): 0.5})
    with pytest.raises(E.UnmatchedScopeError, match=r"name 'layers.9'; the model's nn.Linear layers \(2\): 0, 2$"):  # no hint; what is valid
        prepare_activation_sparsity(_net(), {TargetScope(names=["layers.9"]): 0.5})


def test_tuple_batches_into_an_hf_attention_mask_warn_once():
    """(input_ids, labels) pairs passed positionally put labels into an HF model's attention_mask: one warning per model;
    an (input_ids, 0/1 mask) pair does not warn."""
    import warnings

    from torch.utils.data import DataLoader, TensorDataset
    from tiny_models import tiny_hf_llama

    x, y = torch.randint(0, 64, (8, 16)), torch.randint(2, 64, (8, 16))
    model = tiny_hf_llama()
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        for _ in range(2):  # two calibrations of two batches each
            sparsify_activations(model, DataLoader(TensorDataset(x, y), batch_size=4), {TargetScope(patterns=[".*_proj"]): 0.5},
                                 calibration={"progress": False})
    told = [str(w.message) for w in got if "attention_mask" in str(w.message)]
    assert len(told) == 1 and "LlamaForCausalLM receives a tuple batch's 2nd element as attention_mask" in told[0] and "input_key=0" in told[0]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*attention_mask")  # only ours: other libraries may warn once per process
        sparsify_activations(tiny_hf_llama(), [(x[:4], torch.ones_like(x[:4]))], {TargetScope(patterns=[".*_proj"]): 0.5},
                             calibration={"progress": False})


@pytest.mark.parametrize("case", sorted(CASES))
def test_error_is_of_the_family_and_names_the_value(case):
    call, cls, value = CASES[case]
    with pytest.raises(cls, match=value) as info:
        call()
    assert isinstance(info.value, E.ActivationSparsityError) and type(info.value).__module__ == "pl_actsparse.errors"


def test_every_family_class_is_defined_in_errors_and_derives_from_the_root():
    for name in E.__all__:
        cls = getattr(E, name)
        assert cls.__module__ == "pl_actsparse.errors" and issubclass(cls, E.ActivationSparsityError)
    assert not issubclass(E.ScopeSpecError, E.InvalidTargetError)  # InvalidTargetError is for target sparsities only
