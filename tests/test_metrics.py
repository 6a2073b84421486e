"""ActivationSparsity: exact counts, exact per-token quantiles, mergeable states, observation, plotting."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn

from pl_actsparse import TargetScope, sparsify_activations
from pl_actsparse.lightning.callback import activation_sparsity_disabled
from pl_actsparse.measure.metric import ActivationSparsity


def _brute(xs: list[torch.Tensor], thr: float) -> tuple[float, list[float]]:
    """Element-weighted sparsity and per-token fractions, the slow way."""
    zeroed = sum(int((x.abs() <= thr).sum()) for x in xs)
    total = sum(x.numel() for x in xs)
    per_token = torch.cat([(x.abs() <= thr).double().reshape(-1, x.shape[-1]).mean(-1) for x in xs])
    return zeroed / total, per_token


def test_counts_and_quantiles_are_exact():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 7, 40, generator=g) for _ in range(4)]
    ys = [torch.randn(11, 172, generator=g) for _ in range(3)]
    metric = ActivationSparsity(["a", "b"], [40, 172], [100, 300])
    for x in xs:
        metric.update("a", x, 0.5)
    for y in ys:
        metric.update(1, y, torch.tensor(0.25))
    out = metric.compute()
    sa, ta = _brute(xs, 0.5)
    sb, tb = _brute(ys, 0.25)
    assert float(out["a/sparsity"]) == pytest.approx(sa, abs=1e-12)
    assert float(out["b/sparsity"]) == pytest.approx(sb, abs=1e-12)
    na, nb = sum(x.numel() for x in xs), sum(y.numel() for y in ys)
    assert float(out["sparsity"]) == pytest.approx((sa * na + sb * nb) / (na + nb), abs=1e-12)
    assert float(out["weighted_sparsity"]) == pytest.approx((100 * sa + 300 * sb) / 400, abs=1e-12)
    # both widths are <= token_bins, so per-token quantiles are exact ("lower" interpolation)
    for q, key in ((0.05, "token_sparsity_p5"), (0.95, "token_sparsity_p95")):
        assert float(out[f"a/{key}"]) == pytest.approx(float(torch.quantile(ta, q, interpolation="lower")), abs=1e-12)
        assert float(out[f"b/{key}"]) == pytest.approx(float(torch.quantile(tb, q, interpolation="lower")), abs=1e-12)
        both = torch.cat([ta, tb])
        assert float(out[key]) == pytest.approx(float(torch.quantile(both, q, interpolation="lower")), abs=1e-12)
    assert float(out["a/threshold"]) == 0.5 and float(out["b/threshold"]) == 0.25


def test_wide_layers_are_binned_within_resolution():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 3000, generator=g) * torch.rand(200, 1, generator=g)
    metric = ActivationSparsity(["wide"], [3000], token_bins=100)
    metric.update("wide", x, 0.3)
    _, per_token = _brute([x], 0.3)
    got = float(metric.compute()["wide/token_sparsity_p95"])
    want = float(torch.quantile(per_token, 0.95, interpolation="lower"))
    assert want - 1 / 100 <= got <= want  # a lower bound within one bin


def test_unobserved_layers_are_nan_and_do_not_count():
    metric = ActivationSparsity(["a", "b"], [4, 4])
    metric.update("a", torch.tensor([[0.1, 0.2, 3.0, 4.0]]), 1.0)
    out = metric.compute()
    assert float(out["a/sparsity"]) == 0.5 and float(out["sparsity"]) == 0.5
    assert float(out["weighted_sparsity"]) == 0.5
    assert math.isnan(float(out["b/sparsity"])) and math.isnan(float(out["b/threshold"]))
    assert math.isnan(float(out["b/token_sparsity_p5"]))


def test_infinite_thresholds():
    metric = ActivationSparsity(["lo", "hi"], [3, 3])
    x = torch.tensor([[0.0, 1.0, -2.0]])
    metric.update("lo", x, -math.inf)  # target 0 / pass-through: nothing zeroed, not even exact zeros
    metric.update("hi", x, math.inf)
    out = metric.compute()
    assert float(out["lo/sparsity"]) == 0.0 and float(out["hi/sparsity"]) == 1.0
    assert float(out["lo/threshold"]) == -math.inf and float(out["hi/threshold"]) == math.inf


def test_states_are_sums_so_shards_merge_exactly():
    """What DDP does (sum of states over ranks) equals one process seeing all the data."""
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(5, 16, generator=g) for _ in range(6)]
    whole, rank0, rank1 = (ActivationSparsity(["l"], [16]) for _ in range(3))
    for i, b in enumerate(batches):
        whole.update("l", b, 0.7)
        (rank0 if i % 2 == 0 else rank1).update("l", b, 0.7)
    for state in ("zeroed", "elements", "token_counts"):
        assert whole._reductions[state].__name__ == "dim_zero_sum"  # dist_reduce_fx="sum"
        assert whole._defaults[state].dtype == torch.long  # integer counts: exact under all_reduce(SUM)
    rank0.merge_state(rank1)
    a, b = whole.compute(), rank0.compute()
    assert a.keys() == b.keys()
    assert all(float(a[k]) == float(b[k]) for k in a)


def test_observe_counts_the_model_and_matches_calibration():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    data = [torch.randn(8, 16) for _ in range(5)]
    sparsify_activations(net, data, {TargetScope(names=["0"]): 0.25, TargetScope(names=["2"]): 0.5}, progress=False)
    metric = ActivationSparsity.from_model(net)
    assert metric.layers == ["0", "2"] and metric.in_features == [16, 32]
    assert metric.weight_bytes == [16 * 32 * 4, 32 * 4 * 4]
    with metric.observe(net):
        for x in data:
            net(x)
        with activation_sparsity_disabled(net):  # a dense reference pass is not counted
            net(data[0])
    out = metric.compute()
    # on the calibration data the measured sparsity is the calibration's own result, exactly (layer 2 reads
    # ReLU outputs: ties at zero make 0.5 itself unreachable, the closest reachable fraction is chosen)
    assert float(out["0/sparsity"]) == 0.25
    assert float(out["2/sparsity"]) == net[2]._actsparse.calibration_sparsity
    assert abs(float(out["2/sparsity"]) - 0.5) < 0.01
    assert float(out["0/threshold"]) == float(net[0].activation_threshold)
    assert all(not m._actsparse.observers for m in (net[0], net[2]))  # detached on exit
    net(data[0])
    assert int(metric.elements.sum()) == 5 * 8 * (16 + 32)


def test_observe_rejects_untracked_layers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    sparsify_activations(net, [torch.randn(4, 4)], {TargetScope(types=[nn.Linear]): 0.5}, progress=False)
    metric = ActivationSparsity(["0"], [4])
    with pytest.raises(ValueError, match="not tracked"):
        with metric.observe(net):
            pass
    with pytest.raises(ValueError, match="expects inputs with 4 features"):
        metric.update("0", torch.randn(2, 3), 0.1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layers=[], in_features=[]), "at least one layer"),
        (dict(layers=["a", "a"], in_features=[1, 1]), "unique"),
        (dict(layers=["a"], in_features=[0]), "in_features"),
        (dict(layers=["a"], in_features=[2], weight_bytes=[1, 2]), "weight_bytes"),
        (dict(layers=["a"], in_features=[2], token_bins=0), "token_bins"),
        (dict(layers=["a"], in_features=[2], quantiles=(1.5,)), "quantiles"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ActivationSparsity(**kwargs)


def test_reset_copy_pickle_and_plot(tmp_path):
    metric = ActivationSparsity(["a", "b"], [8, 8])
    metric.update("a", torch.arange(16.0).reshape(2, 8), 3.0)
    metric.update("b", torch.arange(16.0).reshape(2, 8), 7.5)
    value = metric.compute()
    for other in (copy.deepcopy(metric), pickle.loads(pickle.dumps(metric))):
        assert float(other.compute()["sparsity"]) == float(value["sparsity"])
    fig, ax = metric.plot()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    assert [round(p.get_height(), 4) for p in ax.patches] == [float(value["a/sparsity"]), float(value["b/sparsity"])]
    fig2, _ = metric.plot([value, value])  # a series of results over time
    fig.savefig(tmp_path / "bars.png")
    fig2.savefig(tmp_path / "series.png")
    metric.reset()
    assert int(metric.elements.sum()) == 0 and float(metric.threshold[0]) == -math.inf
