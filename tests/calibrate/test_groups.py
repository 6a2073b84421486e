"""Shared-input groups: detection on several module graphs, and one threshold/statistic per group."""

import pytest
import torch
from torch import nn

from pl_actsparse import TargetScope, calibrate_activation_sparsity, prepare_activation_sparsity, sparsify_activations
from pl_actsparse.calibrate.groups import check_shared_thresholds, find_shared_input_groups
from pl_actsparse.errors import UnsupportedModuleError

pytestmark = pytest.mark.usefixtures("one_thread")



def _expected_llama_groups(n_layers, prefix=""):
    out = []
    for i in range(n_layers):
        p = f"{prefix}layers.{i}."
        out.append([p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"])
        out.append([p + "mlp.gate_proj", p + "mlp.up_proj"])
    return out


def _as_sets(groups):
    return sorted(sorted(g) for g in groups)


def test_tiny_llama_groups(tiny, batches):
    groups = find_shared_input_groups(tiny, batches[0])
    assert _as_sets(groups) == _as_sets(_expected_llama_groups(3))
    # model order inside a group, and no layer in two groups
    assert groups[0] == ["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj"]
    members = [n for g in groups for n in g]
    assert len(set(members)) == len(members)


def test_llama2c_groups_with_grouped_query_attention():
    from pl_actsparse.demos.llama2c import load_llama2c_checkpoint

    model = load_llama2c_checkpoint()
    assert model.layers[0].self_attn.k_proj.out_features < model.layers[0].self_attn.q_proj.out_features  # GQA
    groups = find_shared_input_groups(model, torch.randint(0, 512, (1, 8)))
    assert _as_sets(groups) == _as_sets(_expected_llama_groups(5))


def test_hf_llama_groups():
    from tiny_models import tiny_hf_llama

    model = tiny_hf_llama()
    groups = find_shared_input_groups(model, {"input_ids": torch.randint(0, 64, (1, 8))})
    assert _as_sets(groups) == _as_sets(_expected_llama_groups(2, prefix="model."))


def test_restriction_singletons_and_sparsified_layers(tiny, batches):
    names = ["layers.0.mlp.gate_proj", "layers.0.mlp.up_proj", "layers.0.mlp.down_proj"]
    assert find_shared_input_groups(tiny, batches[0], names) == [names[:2]]
    with_single = find_shared_input_groups(tiny, batches[0], names, include_singletons=True)
    assert with_single == [names[2:], names[:2]]  # model order: TinyMLP defines down_proj first
    sparsify_activations(tiny, batches, {TargetScope(patterns=[".*_proj"]): 0.4}, calibration={"progress": False})
    assert _as_sets(find_shared_input_groups(tiny, batches[0])) == _as_sets(_expected_llama_groups(3))
    with pytest.raises(UnsupportedModuleError, match="not nn.Linear"):
        find_shared_input_groups(tiny, batches[0], ["layers.0.mlp"])


class _Reused(nn.Module):
    """``a`` and ``b`` share the input on the first call only; ``a`` is called again on another tensor."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        y = self.a(x) + self.b(x)
        return self.a(y) + self.c(x)


def test_layer_called_twice_groups_only_on_every_call():
    groups = find_shared_input_groups(_Reused(), torch.randn(2, 4))
    # a shared x with b and c on its first call but not on its second: b and c still share every call
    assert groups == [["b", "c"]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equal_targets_share_threshold_and_statistic(tiny, batches, dtype):
    tiny = tiny.to(dtype)
    prepare_activation_sparsity(tiny, {TargetScope(patterns=[".*_proj"]): 0.37})
    report = calibrate_activation_sparsity(tiny, batches, calibration={"progress": False})
    groups = find_shared_input_groups(tiny, batches[0])
    assert check_shared_thresholds(tiny, groups, report.statistics) == []
    # and a group member with another target gets its own threshold
    prepare_activation_sparsity(tiny, {TargetScope(names=["layers.0.mlp.up_proj"]): 0.6})
    calibrate_activation_sparsity(tiny, batches, layers=["layers.0.mlp.up_proj"], calibration={"progress": False})
    assert not torch.equal(tiny.layers[0].mlp.up_proj.activation_threshold, tiny.layers[0].mlp.gate_proj.activation_threshold)
    assert check_shared_thresholds(tiny, groups) == []  # different targets: nothing to share


def test_check_shared_thresholds_reports_a_mismatch(tiny, batches):
    prepare_activation_sparsity(tiny, {TargetScope(patterns=[".*mlp.*"]): 0.3})
    calibrate_activation_sparsity(tiny, batches, calibration={"progress": False})
    tiny.layers[1].mlp.up_proj.activation_threshold.fill_(123.0)
    problems = check_shared_thresholds(tiny, find_shared_input_groups(tiny, batches[0]))
    assert len(problems) == 1 and "layers.1.mlp.up_proj" in problems[0]
