"""Thresholds for any target from one calibration pass, and sweeps."""

import json
import math

import pytest
import torch

from pl_actsparse import TargetScope, calibrate_activation_sparsity, prepare_activation_sparsity, sparsify_activations
from pl_actsparse.core.layer import is_sparsified, sparsifier_state
from pl_actsparse.calibrate.histogram import LayerStatistics, coarse_histogram, threshold_for_target
from pl_actsparse.errors import InvalidTargetError, NotSparsifiedError
from pl_actsparse.tuning.sweep import apply_statistics, sweep_sparsity, thresholds_for_targets
from pl_actsparse.measure.metric import SparsityCounter

FIRST = "layers.0.self_attn.q_proj"  # the first sparsified layer the data reaches in TinyLlama
ALL = TargetScope(patterns=[".*_proj"])

pytestmark = pytest.mark.usefixtures("one_thread")



def _stats_at(model, batches, scope, base):
    prepare_activation_sparsity(model, {scope: base})
    return calibrate_activation_sparsity(model, batches, calibration={"progress": False}).statistics


def _fresh_thresholds(model_fn, batches, scope, target):
    m = model_fn()
    sparsify_activations(m, batches, {scope: target}, calibration={"progress": False})
    return {n: mod.activation_threshold.clone() for n, mod in m.named_modules() if is_sparsified(mod)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_thresholds_equal_fresh_calibration_for_the_first_layer(batches, dtype):
    from tiny_models import tiny_llama

    make = lambda: tiny_llama().to(dtype)  # noqa: E731
    stats = _stats_at(make(), batches, ALL, 0.5)
    for t in (0.0, 0.1, 0.37, 0.5, 0.8, 1.0):
        fresh = _fresh_thresholds(make, batches, ALL, t)
        assert threshold_for_target(stats[FIRST], t) == float(fresh[FIRST]), t
        # a single swept layer: exact whatever its position (its upstream layers keep their thresholds)
        single = _stats_at(make(), batches, TargetScope(names=["layers.1.mlp.down_proj"]), 0.5)
        only = _fresh_thresholds(make, batches, TargetScope(names=["layers.1.mlp.down_proj"]), t)
        assert threshold_for_target(single["layers.1.mlp.down_proj"], t) == float(only["layers.1.mlp.down_proj"])


def test_fp32_threshold_within_one_bin_and_achieved_within_bin_mass():
    torch.manual_seed(0)
    x = torch.randn(200_000) * torch.rand(200_000) * 3
    st = LayerStatistics("l", 0.5, torch.float32, coarse_histogram(x))
    ax = x.abs().sort().values
    for t in (0.05, 0.3, 0.5, 0.77, 0.95):
        thr = threshold_for_target(st, t)
        exact = float(ax[math.ceil(t * len(ax)) - 1])
        assert abs(thr - exact) <= exact * 2**-7
        achieved = float((x.abs() <= thr).float().mean())
        assert abs(achieved - t) < 2e-3  # linear interpolation inside the bin: far below the bin mass
        # the bin holding the order statistic bounds the error
        b = int(torch.tensor([exact]).view(torch.int32)) >> 16
        assert abs(achieved - t) <= int(st.coarse[b]) / len(x) + 1e-9
    assert threshold_for_target(st, 0.0) == -math.inf and threshold_for_target(st, 1.0) == math.inf


def test_fp32_first_layer_close_to_fresh_calibration(tiny, batches):
    from tiny_models import tiny_llama

    stats = _stats_at(tiny, batches, ALL, 0.5)
    for t in (0.2, 0.6):
        fresh = float(_fresh_thresholds(tiny_llama, batches, ALL, t)[FIRST])
        assert threshold_for_target(stats[FIRST], t) == pytest.approx(fresh, rel=2**-7)


def test_apply_statistics_all_layers_drift_small(tiny, batches):
    stats = _stats_at(tiny, batches, ALL, 0.4)
    thresholds = apply_statistics(tiny, stats, 0.6)
    assert set(thresholds) == set(stats)
    with SparsityCounter(tiny) as counter, torch.no_grad():
        for b in batches:
            tiny(b)
    got = counter.sparsity()
    assert got[FIRST] == pytest.approx(0.6, abs=2e-3)  # exact up to fp32 interpolation
    assert max(abs(v - 0.6) for v in got.values()) < 0.06  # downstream layers drift (random tiny model; see docs/sweep.md for stories260K)
    assert all(sparsifier_state(m).target == 0.6 for _, m in tiny.named_modules() if is_sparsified(m))
    with pytest.raises(NotSparsifiedError):
        thresholds_for_targets(stats, {"nope": 0.5})


def _nll(model):
    from tiny_models import token_batches

    data = token_batches(n=2, seed=7)
    with torch.no_grad():
        out = [torch.nn.functional.cross_entropy(model(b)[:, :-1].flatten(0, 1), b[:, 1:].flatten()) for b in data]
    return float(torch.stack(out).mean())


def test_sweep_costs_one_pass_and_restores_the_model(tiny, batches, tmp_path):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    calls = []
    metric = lambda m: calls.append(1) or _nll(m)  # noqa: E731
    result = sweep_sparsity(tiny, batches, [0.2, 0.4, 0.6], metric, ALL, metric_name="nll")
    assert result.calibration_passes == 1 and result.evaluations == 4 and len(calls) == 4
    assert not any(is_sparsified(m) for m in tiny.modules())
    assert all(torch.equal(v, before[k]) for k, v in tiny.state_dict().items())
    assert result.dense == pytest.approx(_nll(tiny))
    assert [p.mean_target for p in result.points] == pytest.approx([0.2, 0.4, 0.6])
    achieved = [p.achieved for p in result.points]
    assert achieved == sorted(achieved) and all(a is not None for a in achieved)
    metrics = [p.metric for p in result.points]
    assert metrics[-1] > result.dense  # sparsity costs something
    assert result.base_targets[FIRST] == 0.4
    json_path, png_path = tmp_path / "s.json", tmp_path / "s.png"
    result.to_json(json_path)
    result.plot(png_path)
    assert json.loads(json_path.read_text())["points"][1]["targets"][FIRST] == 0.4
    assert png_path.stat().st_size > 1000 and png_path.read_bytes()[:4] == b"\x89PNG"


def test_sweep_thresholds_equal_fresh_calibration(batches):
    """bf16: the first layer exactly at every point; recalibrate=True: every layer exactly."""
    from tiny_models import tiny_llama

    make = lambda: tiny_llama().to(torch.bfloat16)  # noqa: E731
    one = sweep_sparsity(make(), batches, [0.3, 0.5, 0.7], _nll, ALL, include_dense=False)
    exact = sweep_sparsity(make(), batches, [0.3, 0.5, 0.7], _nll, ALL, recalibrate=True, include_dense=False)
    assert exact.calibration_passes == 3
    for p_one, p_exact, t in zip(one.points, exact.points, [0.3, 0.5, 0.7]):
        fresh = _fresh_thresholds(make, batches, ALL, t)
        assert p_one.thresholds[FIRST] == float(fresh[FIRST])
        assert p_exact.thresholds == {n: float(v) for n, v in fresh.items()}
        rel = [abs(p_one.thresholds[n] / float(fresh[n]) - 1) for n in fresh]
        assert max(rel) < 0.35  # downstream: drift (random tiny model), not a different regime


def test_sweep_on_a_sparsified_model_and_per_layer_points(tiny, batches):
    sparsify_activations(tiny, batches, {TargetScope(patterns=[".*mlp.*"]): 0.3}, calibration={"progress": False})
    thr_before = {n: m.activation_threshold.clone() for n, m in tiny.named_modules() if is_sparsified(m)}
    names = list(thr_before)
    point = {n: (0.5 if "down" in n else 0.2) for n in names}
    result = sweep_sparsity(tiny, batches, [point, 0.4], _nll, include_dense=False)
    assert result.points[0].targets == point
    assert all(torch.equal(m.activation_threshold, thr_before[n]) for n, m in tiny.named_modules() if is_sparsified(m))
    assert all(sparsifier_state(m).target == 0.3 for _, m in tiny.named_modules() if is_sparsified(m))
    with pytest.raises(InvalidTargetError):
        sweep_sparsity(tiny, batches, [{names[0]: 0.5}], _nll)  # a dict point must set every layer
    with pytest.raises(InvalidTargetError):
        sweep_sparsity(tiny, batches, [1.5], _nll)


def test_sweep_needs_layers(tiny, batches):
    with pytest.raises(NotSparsifiedError):
        sweep_sparsity(tiny, batches, [0.5], _nll)


def test_lightning_validate_metric(tiny, batches):
    import lightning as L

    from pl_actsparse.tuning.sweep import lightning_validate_metric

    class Module(L.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def validation_step(self, batch, _):
            logits = self.model(batch)
            self.log("val_loss", torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten()))

    module = Module(tiny)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    metric = lightning_validate_metric(trainer, module, "val_loss", dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    result = sweep_sparsity(module.model, batches, [0.1, 0.8], metric, ALL, metric_name="val_loss")
    assert result.points[1].metric > result.points[0].metric > 0
    assert result.dense <= result.points[0].metric + 0.05


def test_cli_on_the_shipped_model(tmp_path, monkeypatch):
    import pl_actsparse.demos.__main__ as sweep_module  # the demo command line, outside the library

    results = []
    real_main = sweep_module.sweep_main
    monkeypatch.setattr(sweep_module, "sweep_main", lambda *a, **k: results.append(real_main(*a, **k)))

    sweep_module.main(  # python -m pl_actsparse.demos sweep
        ["sweep", "--targets", "0.2", "0.5", "--calibration-stories", "500", "506", "--eval-stories", "0", "4",
         "--json", str(tmp_path / "sweep.json"), "--plot", str(tmp_path / "sweep.png"), "--threads", "1"]
    )
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["calibration_passes"] == 1 and len(data["points"]) == 2
    assert data["dense"] < data["points"][0]["metric"] < data["points"][1]["metric"]
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    (result,) = results
    assert result.points[1].achieved == pytest.approx(0.5, abs=0.05)


# ---------------------------------------------------------------------------------------------------
# preserved(), stored weight bytes, padded batches


def test_preserved_restores_on_error_and_removes_what_it_added(tiny, batches):
    from pl_actsparse.core.layer import preserved

    sparsify_activations(tiny, batches, {TargetScope(names=["layers.0.mlp.up_proj"]): 0.3}, calibration={"progress": False})
    up = tiny.layers[0].mlp.up_proj
    thr, extra, plan = up.activation_threshold.clone(), up.get_extra_state(), tiny.__dict__["_actsparse_plan"]
    names = ["layers.0.mlp.up_proj", "layers.1.mlp.down_proj"]
    with pytest.raises(RuntimeError, match="boom"):
        with preserved(tiny, names):
            sparsify_activations(tiny, batches, {TargetScope(names=names): 0.7}, calibration={"progress": False})
            up.activation_threshold.fill_(123.0)
            raise RuntimeError("boom")
    assert torch.equal(up.activation_threshold, thr) and torch.equal(up.get_extra_state(), extra)
    assert not is_sparsified(tiny.layers[1].mlp.down_proj)  # added inside: removed, original class back
    assert type(tiny.layers[1].mlp.down_proj) is torch.nn.Linear
    assert tiny.__dict__["_actsparse_plan"] is plan
    with pytest.raises(KeyError, match="nope"):
        with preserved(tiny, ["nope"]):
            pass


def test_sweep_weights_are_stored_bytes_of_int8_layers(batches):
    from tiny_models import tiny_llama

    from pl_actsparse.core.int8 import quantize_weights_int8
    from pl_actsparse.core.layer import weight_nbytes

    model = tiny_llama()
    quantize_weights_int8(model, TargetScope(patterns=[r".*mlp\..*"]))
    result = sweep_sparsity(model, batches[:2], [0.3], _nll, TargetScope(patterns=[r".*mlp\..*"]), include_dense=False)
    modules = dict(model.named_modules())
    assert result.weight_bytes == {n: weight_nbytes(modules[n]) for n in result.weight_bytes}
    assert result.weight_bytes["layers.0.mlp.up_proj"] == 32 * 48 + 2 * 4 * 48  # int8 codes + fp32 scale/zero point
    assert result.weight_bytes["layers.0.mlp.up_proj"] < modules["layers.0.mlp.up_proj"].weight.numel() * 4


def test_next_token_nll_counts_real_predictions_only():
    from pl_actsparse.calibrate.allocation import next_token_nll

    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 11, (n,), generator=g) for n in (7, 4, 2)]
    logits = [torch.randn(len(s), 11, generator=g) for s in seqs]
    want = sum(float(torch.nn.functional.cross_entropy(lg[:-1], s[1:], reduction="sum")) for lg, s in zip(logits, seqs))
    count = sum(len(s) - 1 for s in seqs)
    for left in (False, True):
        ids = torch.zeros(3, 7, dtype=torch.long)
        out = torch.full((3, 7, 11), 50.0)  # pad logits: huge losses if they counted
        mask = torch.zeros(3, 7, dtype=torch.bool)
        for i, (s, lg) in enumerate(zip(seqs, logits)):
            sl = slice(7 - len(s), 7) if left else slice(0, len(s))
            ids[i, sl], out[i, sl], mask[i, sl] = s, lg, True
        total, n = next_token_nll(out, {"input_ids": ids, "attention_mask": mask.long()})
        assert n == count and float(total) == pytest.approx(want, rel=1e-6)
        total_all, n_all = next_token_nll(out, ids)  # without a mask every position counts
        assert n_all == 3 * 6 and float(total_all) != pytest.approx(want, rel=1e-3)


def test_calibration_loss_on_right_padded_hf_batches_equals_unpadded():
    from tiny_models import tiny_hf_llama

    from pl_actsparse.tuning.objectives import CalibrationLoss

    model = tiny_hf_llama()
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(1, 64, (n,), generator=g) for n in (9, 5, 3)]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    padded = CalibrationLoss(model, [{"input_ids": ids, "attention_mask": mask}], None, None)()
    with torch.no_grad():
        nll = [torch.nn.functional.cross_entropy(model(s[None]).logits[0, :-1], s[1:], reduction="sum") for s in seqs]
    assert padded == pytest.approx(float(sum(nll)) / sum(len(s) - 1 for s in seqs), rel=1e-5)


def test_tuning_calibration_refuses_padded_batches_it_cannot_mask(batches):
    """Padded calibration batches never count pad positions silently."""
    from tiny_models import tiny_hf_llama

    model = tiny_hf_llama()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    data = [{"input_ids": ids, "attention_mask": mask}]
    metric = lambda m: 0.0  # noqa: E731
    scope = TargetScope(patterns=[r".*mlp\.down_proj"])
    # calibration masks padding: thresholds from the padded batch equal those from its real tokens
    padded = sweep_sparsity(model, data, [0.5], metric, scope, include_dense=False)
    real = [ids[:1], ids[1:, :5]]
    unpadded = sweep_sparsity(model, real, [0.5], metric, scope, include_dense=False)
    assert padded.points[0].thresholds == unpadded.points[0].thresholds
    assert not any(is_sparsified(m) for m in model.modules())
    result = sweep_sparsity(model, data, [0.5], metric, scope, include_dense=False, calibration={"token_mask": None})  # explicit opt-out
    assert result.calibration_passes == 1
