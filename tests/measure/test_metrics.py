"""ActivationSparsity: exact counts, exact per-token quantiles, mergeable states, observation, plotting."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn

from pl_actsparse.core.layer import sparsifier_state
from pl_actsparse import TargetScope, sparsify_activations
from pl_actsparse.core.layer import activation_sparsity_disabled
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
    sparsify_activations(net, data, {TargetScope(names=["0"]): 0.25, TargetScope(names=["2"]): 0.5}, calibration={"progress": False})
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
    assert float(out["2/sparsity"]) == sparsifier_state(net[2]).calibration_sparsity
    assert abs(float(out["2/sparsity"]) - 0.5) < 0.01
    assert float(out["0/threshold"]) == float(net[0].activation_threshold)
    assert all(not sparsifier_state(m).observers for m in (net[0], net[2]))  # detached on exit
    net(data[0])
    assert int(metric.elements.sum()) == 5 * 8 * (16 + 32)


def test_observe_rejects_untracked_layers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    sparsify_activations(net, [torch.randn(4, 4)], {TargetScope(types=[nn.Linear]): 0.5}, calibration={"progress": False})
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


# ---------------------------------------------------------------------------------------------------
# issue 11 item 3: per-channel thresholds; item 4: no size limit; masks; issue 10: stored weight bytes

from hypothesis import given, strategies as st  # noqa: E402

from pl_actsparse.core.masking import token_mask  # noqa: E402
from pl_actsparse.errors import TokenMaskError  # noqa: E402
from pl_actsparse.measure.metric import DecodeSparsity, SparsityCounter, quantile_from_histogram  # noqa: E402


def test_per_channel_threshold_broadcasts_on_the_last_axis():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 64, generator=g)
    thr = torch.rand(64, generator=g) * 1.5
    metric = ActivationSparsity(["l"], [64])
    metric.update("l", x, thr)  # crashed with expand(torch.FloatTensor{[64]}, size=[]) before
    want = (x.abs() <= thr).double()
    out = metric.compute()
    assert float(out["l/sparsity"]) == pytest.approx(float(want.mean()), abs=1e-12)
    assert float(out["l/threshold"]) == pytest.approx(float(thr.mean()), rel=1e-6)  # threshold_summary: the mean
    per_token = want.reshape(-1, 64).mean(-1)
    assert float(out["l/token_sparsity_p95"]) == pytest.approx(float(torch.quantile(per_token, 0.95, interpolation="lower")), abs=1e-12)
    with pytest.raises(ValueError, match=r"scalar or per-channel with shape \[64\]"):
        metric.update("l", x, torch.ones(32))


def test_weight_aware_model_through_metric_counter_and_observe(tiny, batches):
    from pl_actsparse.tuning.weight_aware import sparsify_activations_weight_aware

    sparsify_activations_weight_aware(tiny, batches, {TargetScope(patterns=[".*mlp.*"]): 0.45}, calibration={"progress": False})
    down = tiny.layers[1].mlp.down_proj
    captured = []
    down._actsparse.observers[0] = lambda m, x, y: captured.append(x.detach().clone())
    metric = ActivationSparsity.from_model(tiny)
    with metric.observe(tiny), SparsityCounter(tiny) as counter, torch.no_grad():
        for b in batches:
            tiny(b)
    del down._actsparse.observers[0]
    out = metric.compute()
    x = torch.cat([c.reshape(-1, down.in_features) for c in captured])
    brute = (x.abs() <= down.activation_threshold).double()  # the per-channel rule, broadcast on the last axis
    assert float(out["layers.1.mlp.down_proj/sparsity"]) == pytest.approx(float(brute.mean()), abs=1e-12)
    for name, m in tiny.named_modules():
        if hasattr(m, "_actsparse"):
            assert counter.sparsity()[name] == pytest.approx(float(out[f"{name}/sparsity"]), abs=1e-12)
            assert abs(float(out[f"{name}/sparsity"]) - 0.45) < 2e-3  # the target, on the calibration data
            assert float(out[f"{name}/threshold"]) == pytest.approx(float(m.activation_threshold.mean()), rel=1e-6)


@given(
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=5),
    left=st.booleans(),
    seed=st.integers(0, 2**16),
    per_channel=st.booleans(),
)
def test_padded_batch_counts_exactly_the_real_tokens(lengths, left, seed, per_channel):
    """The metric on a padded batch under its mask equals the metric on the same real tokens unpadded."""
    g = torch.Generator().manual_seed(seed)
    d, seq = 6, max(lengths)
    real = [torch.randn(n, d, generator=g) for n in lengths]
    padded = torch.zeros(len(lengths), seq, d)  # zero padding: every pad element would count as zeroed
    mask = torch.zeros(len(lengths), seq, dtype=torch.bool)
    for i, r in enumerate(real):
        sl = slice(seq - len(r), seq) if left else slice(0, len(r))
        padded[i, sl], mask[i, sl] = r, True
    thr = torch.rand(d, generator=g) if per_channel else torch.tensor(0.5)
    masked, unpadded, unmasked = (ActivationSparsity(["l"], [d]) for _ in range(3))
    with token_mask(mask):
        masked.update("l", padded, thr)
    for r in real:
        unpadded.update("l", r, thr)
    unmasked.update("l", padded, thr)
    for state in ("zeroed", "elements", "token_counts"):
        assert torch.equal(getattr(masked, state), getattr(unpadded, state))
    if int(mask.sum()) < mask.numel():  # the test can fail: without the mask the pads count
        assert int(unmasked.elements[0]) > int(masked.elements[0])


def test_mask_without_a_matching_token_axis_is_an_error():
    metric = ActivationSparsity(["l"], [4])
    with pytest.raises(TokenMaskError, match=r"l: input of shape \(3, 5, 4\) has no token axes"):
        metric.update("l", torch.randn(3, 5, 4), 0.1, token_mask=torch.ones(2, 5, dtype=torch.bool))


def test_hf_llama_right_and_left_padded_metric_counts_real_tokens_only():
    """A real third-party stack: the counts equal a brute-force count over the captured inputs at real positions."""
    from tiny_models import tiny_hf_llama

    model = tiny_hf_llama()
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(1, 64, (3, 12), generator=g) for _ in range(2)]
    sparsify_activations(model, data, {TargetScope(patterns=[r".*mlp\..*_proj"]): 0.4}, calibration={"progress": False})
    layer_name = "model.layers.1.mlp.down_proj"
    layer = dict(model.named_modules())[layer_name]
    for side in ("right", "left"):
        ids = torch.randint(1, 64, (3, 10), generator=g)
        mask = torch.ones(3, 10, dtype=torch.long)
        for i, n in enumerate((10, 7, 4)):
            if side == "right":
                mask[i, n:] = 0
            else:
                mask[i, : 10 - n] = 0
        captured = []
        metric = ActivationSparsity.from_model(model)
        layer._actsparse.observers[0] = lambda m, x, y: captured.append(x.detach().clone())
        try:
            with metric.observe(model), token_mask(mask.bool()), torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
        finally:
            del layer._actsparse.observers[0]
        (x,) = captured
        real = x[mask.bool()]
        i = metric.layers.index(layer_name)
        assert int(metric.elements[i]) == real.numel() == int(mask.sum()) * layer.in_features
        assert int(metric.zeroed[i]) == int((real.abs() <= layer.activation_threshold).sum())


def test_quantiles_have_no_size_limit():
    """torch.quantile refuses more than 2**24 values; the histogram quantile has no limit."""
    import numpy as np

    n = 2**24 + 8
    g = torch.Generator().manual_seed(5)
    ints = torch.randint(0, 7, (n,), generator=g, dtype=torch.int8)
    counts = torch.bincount(ints.long(), minlength=7)
    ref = np.sort(ints.numpy())
    for q in (0.0, 0.05, 0.3, 0.95, 1.0):
        for how in ("lower", "linear"):
            assert quantile_from_histogram(torch.arange(7.0), counts, q, how) == pytest.approx(
                float(np.quantile(ref, q, method=how)), abs=1e-12
            )
    with pytest.raises(RuntimeError, match="too large"):
        torch.quantile(ints[: 2**24 + 1].float(), 0.5)  # the limit this replaces


def test_counter_token_quantiles_past_2_pow_24_tokens():
    import numpy as np

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 2))
    sparsify_activations(net, [torch.randn(64, 2)], {TargetScope(names=["0"]): 0.5}, calibration={"progress": False})
    net[0].activation_threshold.fill_(0.5)
    n = 2**24 + 8
    x = torch.randint(-2, 3, (n, 2), generator=torch.Generator().manual_seed(1), dtype=torch.int8).to(torch.bfloat16) * 0.4
    counter = SparsityCounter(net)
    counter.metric.update("0", x, net[0].activation_threshold)
    per_token = (x.abs() <= net[0].activation_threshold).double().mean(-1).numpy()
    per_token.sort()
    got = counter.token_quantiles((0.05, 0.37, 0.95))["0"]
    assert got == pytest.approx([float(np.quantile(per_token, q)) for q in (0.05, 0.37, 0.95)], abs=1e-12)
    assert counter.total["0"] == 2 * n and counter.sparsity()["0"] == pytest.approx(float(per_token.mean()), abs=1e-12)


def test_exact_token_histogram_for_wide_layers_and_shard_merge():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, 3000, generator=g) * torch.rand(300, 1, generator=g)
    whole, a, b = (ActivationSparsity(["w"], [3000]) for _ in range(3))  # token_bins=None: exact at any width
    whole.update("w", x, 0.4)
    a.update("w", x[:120], 0.4)
    b.update("w", x[120:], 0.4)
    a.merge_state(b)
    per_token = (x.abs() <= 0.4).double().mean(-1)
    for m in (whole, a):
        out = m.compute()
        assert float(out["w/token_sparsity_p95"]) == float(torch.quantile(per_token, 0.95, interpolation="lower"))
        assert float(out["w/token_sparsity_p5"]) == float(torch.quantile(per_token, 0.05, interpolation="lower"))


def test_int8_weight_bytes_agree_everywhere():
    """Issue 10: report, model_report and metric count the stored int8 bytes (not 65536/65536)."""
    from pl_actsparse import activation_sparsity_report
    from pl_actsparse.core.int8 import quantize_weights_int8
    from pl_actsparse.measure.report import model_report

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
    quantize_weights_int8(net)
    sparsify_activations(net, [torch.randn(32, 64) for _ in range(4)], {TargetScope(types=[nn.Linear]): 0.5}, calibration={"progress": False})
    stored = [18432, 16896]  # int8 codes + fp32 per-channel scale and zero point: 64*256 + 2*4*256, 256*64 + 2*4*64
    assert [r.weight_bytes for r in activation_sparsity_report(net).layers] == stored
    assert [r.weight_bytes for r in model_report(net, detect_groups=False).layers] == stored
    assert ActivationSparsity.from_model(net).weight_bytes == stored
    report = model_report(net)
    assert report.decode_bytes == sum(stored) + (256 + 64) * 4  # codes and scales are buffers; biases count too


def test_torchao_int8_weight_only_bytes():
    torchao = pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from pl_actsparse import activation_sparsity_report
    from pl_actsparse.core.layer import weight_nbytes

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
    quantize_(net, Int8WeightOnlyConfig())
    sparsify_activations(net, [torch.randn(32, 64) for _ in range(4)], {TargetScope(types=[nn.Linear]): 0.5}, calibration={"progress": False})
    stored = [weight_nbytes(net[0]), weight_nbytes(net[2])]
    assert stored[0] < 64 * 256 * 2 and stored[0] >= 64 * 256  # int8 codes (+ scales), not float bytes
    assert [r.weight_bytes for r in activation_sparsity_report(net).layers] == stored
    assert ActivationSparsity.from_model(net).weight_bytes == stored


def test_decode_sparsity_counts_single_token_calls_of_any_thresholded_layer():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    lin.register_buffer("activation_threshold", torch.tensor(0.3))  # duck-typed: any layer with the buffer
    net = nn.Sequential(lin, nn.ReLU(), nn.Linear(4, 2))
    xs = [torch.randn(1, 1, 8) for _ in range(5)]
    with DecodeSparsity(net) as probe:
        net(torch.randn(1, 3, 8))  # prefill: not counted
        for x in xs:
            net(x)
    assert len(probe.layers) == 1 and probe.total == 5 * 8
    assert probe.zero == sum(int((x.abs() <= 0.3).sum()) for x in xs)
    assert not lin._forward_pre_hooks
    with DecodeSparsity(nn.Sequential(nn.Linear(2, 2))) as empty:
        pass
    assert empty.fraction is None and empty.total == 0


@given(
    values=st.lists(st.integers(-20, 20), min_size=1, max_size=60),
    q=st.floats(0.0, 1.0),
    how=st.sampled_from(["lower", "linear"]),
)
def test_histogram_quantile_equals_torch_quantile(values, q, how):
    x = torch.tensor(values, dtype=torch.float64)
    uniq, counts = torch.unique(x, return_counts=True)
    assert quantile_from_histogram(uniq, counts, q, how) == pytest.approx(float(torch.quantile(x, q, interpolation=how)), abs=1e-9)
