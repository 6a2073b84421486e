"""Every error raised at a public boundary is of the one family (pl_actsparse.errors) and names the value."""

import pytest
import torch
from torch import nn

import pl_actsparse.errors as E
from pl_actsparse import TargetScope, prepare_activation_sparsity
from pl_actsparse.calibrate.groups import find_shared_input_groups
from pl_actsparse.core.int8 import Int8WeightLinear, quantize_weights_int8
from pl_actsparse.core.layer import install_sparsifier, linear_like_weight_t, sparsifier_state
from pl_actsparse.core.recipe import scopes_from_list
from pl_actsparse.export.convert import export_for_inference
from pl_actsparse.export.int8_linear import Int8SparseInferenceLinear
from pl_actsparse.measure.metric import ActivationSparsity, quantile_from_histogram
from pl_actsparse.measure.report import model_report


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
}


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
