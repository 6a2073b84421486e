"""Per-model report: live model and checkpoint, tables, files, decode-memory arithmetic."""

import json

import pytest
import torch

from pl_actsparse.core.layer import sparsifier_state
from pl_actsparse import TargetScope, sparsify_activations
from pl_actsparse.errors import NotSparsifiedError
from pl_actsparse.measure.report import main, model_report

RECIPE = {TargetScope(patterns=[".*mlp.*"]): 0.4, TargetScope(patterns=[r".*self_attn\.[qkv]_proj"]): 0.25}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def sparse_tiny(tiny, batches):
    sparsify_activations(tiny, batches[:3], RECIPE, calibration={"progress": False})
    return tiny


def test_live_report_with_data_groups_and_spread(sparse_tiny, batches):
    report = model_report(sparse_tiny, batches[3:])
    assert len(report.layers) == 3 * 6
    rows = {r.name: r for r in report.layers}
    gate, up = rows["layers.0.mlp.gate_proj"], rows["layers.0.mlp.up_proj"]
    assert gate.group is not None and gate.group == up.group
    assert rows["layers.0.mlp.down_proj"].group is None
    assert {rows[f"layers.2.self_attn.{p}_proj"].group for p in "qkv"} == {rows["layers.2.self_attn.q_proj"].group}
    assert len(report.groups) == 6
    for r in report.layers:
        assert r.calibration_sparsity == pytest.approx(r.target, abs=0.01)
        assert r.data_sparsity is not None and abs(r.data_sparsity - r.target) < 0.15  # held-out drift
        assert 0.0 <= r.token_p5 <= r.data_sparsity <= r.token_p95 <= 1.0
        assert r.bytes_skipped == pytest.approx(r.data_sparsity * r.weight_bytes)
    assert report.data_tokens == sum(b.numel() for b in batches[3:])
    # arithmetic of the prediction: TinyLlama has an untied embedding, which a decode step does not read
    params = sum(p.numel() * p.element_size() for p in sparse_tiny.parameters())
    embed = sparse_tiny.embed_tokens.weight.numel() * 4
    assert report.model_bytes == params and report.decode_bytes == params - embed
    assert report.decode_saving == pytest.approx(sum(r.bytes_skipped for r in report.layers) / (params - embed))
    assert report.speedup_bound == pytest.approx(1 / (1 - report.decode_saving))


def test_files_and_formats(sparse_tiny, batches, tmp_path):
    report = model_report(sparse_tiny, batches[3:4])
    paths = report.save(tmp_path / "out")
    assert set(paths) == {"png", "md", "html", "json"}
    assert all(p.stat().st_size > 0 for p in paths.values())
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    md = paths["md"].read_text()
    assert md.count("| layers.") == 18 and "![per-layer sparsity](report.png)" in md
    html = paths["html"].read_text()
    assert html.count("<tr>") == 19 and "data:image/png;base64," in html
    data = json.loads(paths["json"].read_text())
    assert data["summary"]["layers"] == 18 and len(data["summary"]["shared_input_groups"]) == 6
    text = str(report)
    assert "layers.1.mlp.up_proj" in text and "ideal memory-bound speed-up" in text
    from rich.console import Console

    console = Console(record=True, width=200)
    report.print(console)
    assert "layers.1.mlp.up_proj" in console.export_text()


def test_checkpoint_report_equals_live_report(sparse_tiny, tmp_path):
    live = model_report(sparse_tiny)
    path = tmp_path / "sparse.pt"
    torch.save(sparse_tiny.state_dict(), path)
    saved = model_report(path)
    keys = ["name", "target", "threshold", "calibration_sparsity", "in_features", "out_features", "weight_bytes", "mode"]
    assert [[getattr(r, k) for k in keys] for r in saved.layers] == [[getattr(r, k) for k in keys] for r in live.layers]
    assert saved.decode_bytes == live.decode_bytes and saved.model_bytes == live.model_bytes
    # a Lightning checkpoint with the model under "model."
    ckpt = {"state_dict": {"model." + k: v for k, v in sparse_tiny.state_dict().items()}, "epoch": 3}
    torch.save(ckpt, tmp_path / "lightning.ckpt")
    assert [r.name for r in model_report(tmp_path / "lightning.ckpt", prefix="model.").layers] == [r.name for r in live.layers]
    with pytest.raises(ValueError, match="live model"):
        model_report(path, [torch.zeros(1, 4, dtype=torch.long)])


def test_tied_classifier_counts_once_live_and_saved(tmp_path, batches):
    from pl_actsparse.demos.llama2c import load_llama2c_checkpoint

    model = load_llama2c_checkpoint()
    assert model.lm_head.weight is model.embed_tokens.weight
    sparsify_activations(model, [torch.randint(0, 512, (2, 32))], {TargetScope(patterns=[".*down_proj"]): 0.5}, calibration={"progress": False})
    unique = sum(p.numel() * 4 for p in model.parameters())  # parameters() yields a tied tensor once
    live = model_report(model)
    assert live.decode_bytes == unique  # the tied classifier reads the whole table each step
    torch.save(model.state_dict(), tmp_path / "m.pt")
    assert model_report(tmp_path / "m.pt").decode_bytes == unique


def test_errors_and_cli(tiny, sparse_tiny, tmp_path):
    from tiny_models import tiny_llama

    with pytest.raises(NotSparsifiedError):
        model_report(tiny_llama())
    torch.save(tiny_llama().state_dict(), tmp_path / "dense.pt")
    with pytest.raises(NotSparsifiedError):
        model_report(tmp_path / "dense.pt")
    torch.save(sparse_tiny.state_dict(), tmp_path / "sparse.pt")
    report = main([str(tmp_path / "sparse.pt"), "--out", str(tmp_path / "cli")])
    assert len(report.layers) == 18 and (tmp_path / "cli" / "report.html").stat().st_size > 0
    from pl_actsparse.lightning.cli import main as console_main

    console_main(["report", str(tmp_path / "sparse.pt"), "--out", str(tmp_path / "cli2")])  # `pl-actsparse report`
    assert (tmp_path / "cli2" / "report.html").read_text() == (tmp_path / "cli" / "report.html").read_text()


# ---------------------------------------------------------------------------------------------------
# one report for every source; real tokens only; per-channel thresholds; stored weight bytes


def _padded_hf_batches(side, g):
    ids = torch.randint(1, 64, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    for i, n in enumerate((10, 6, 3)):
        if side == "right":
            mask[i, n:] = 0
        else:
            mask[i, : 10 - n] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("side", ["right", "left"])
def test_report_on_padded_hf_batches_counts_real_tokens(side):
    from tiny_models import tiny_hf_llama

    from pl_actsparse.measure.metric import SparsityCounter

    model = tiny_hf_llama()
    g = torch.Generator().manual_seed(0)
    sparsify_activations(model, [torch.randint(1, 64, (3, 12), generator=g)], {TargetScope(patterns=[r".*mlp\..*_proj"]): 0.4}, calibration={"progress": False})
    batches = [_padded_hf_batches(side, g) for _ in range(2)]
    name = "model.layers.0.mlp.down_proj"
    layer = dict(model.named_modules())[name]
    captured = []
    layer._actsparse.observers[0] = lambda m, x, y: captured.append(x.detach().clone())
    try:
        report = model_report(model, batches, detect_groups=False)
    finally:
        del layer._actsparse.observers[0]
    real = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(captured, batches)])
    row = {r.name: r for r in report.layers}[name]
    assert row.data_sparsity == pytest.approx(float((real.abs() <= layer.activation_threshold).double().mean()), abs=1e-12)
    assert report.data_tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    unmasked = model_report(model, batches, detect_groups=False, token_mask=None)  # pads counted: a different number
    assert {r.name: r for r in unmasked.layers}[name].data_sparsity != row.data_sparsity
    with SparsityCounter(model):  # the report's counting left no observer behind
        pass
    assert not sparsifier_state(layer).observers


def test_per_channel_thresholds_through_reports_and_sweep(tiny, batches, tmp_path):
    """Issue 11 item 3: every consumer in measure/ and tuning/ accepts per-channel thresholds."""
    from pl_actsparse import activation_sparsity_report
    from pl_actsparse.measure.metric import ActivationSparsity
    from pl_actsparse.measure.report import achieved_table
    from pl_actsparse.tuning.sweep import sweep_sparsity
    from pl_actsparse.tuning.weight_aware import sparsify_activations_weight_aware

    sparsify_activations_weight_aware(tiny, batches[:3], {TargetScope(patterns=[".*mlp.*"]): 0.3}, calibration={"progress": False})
    before = {n: m.activation_threshold.clone() for n, m in tiny.named_modules() if hasattr(m, "_actsparse")}
    live = model_report(tiny, batches[3:])
    for r in live.layers:
        assert r.per_channel and r.threshold == pytest.approx(float(before[r.name].mean()), rel=1e-6)
        assert abs(r.calibration_sparsity - 0.3) < 2e-3 and r.data_sparsity is not None
    assert "(per-ch. mean)" in str(live) and "(per-ch. mean)" in live.to_markdown()
    torch.save(tiny.state_dict(), tmp_path / "wa.pt")
    saved = model_report(tmp_path / "wa.pt")
    assert [(r.name, r.threshold, r.per_channel, r.weight_bytes) for r in saved.layers] == [
        (r.name, r.threshold, r.per_channel, r.weight_bytes) for r in activation_sparsity_report(tiny).layers
    ]
    metric = ActivationSparsity.from_model(tiny)
    with metric.observe(tiny), torch.no_grad():
        tiny(batches[3])
    table = achieved_table("val", {k: float(v) for k, v in metric.compute().items()}, tiny)
    assert "layers.0.mlp.up_proj" in table and "weight-bytes-weighted" in table

    def nll(m):
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(m(batches[0])[:, :-1].flatten(0, 1), batches[0][:, 1:].flatten()))

    result = sweep_sparsity(tiny, batches[:3], [0.2, 0.5], nll, include_dense=False)
    assert [p.mean_target for p in result.points] == pytest.approx([0.2, 0.5])
    for n, m in tiny.named_modules():  # the sweep gave the per-channel thresholds back bit for bit
        if n in before:
            assert m.activation_threshold.shape == before[n].shape and torch.equal(m.activation_threshold, before[n])


def test_int8_checkpoint_report_counts_stored_bytes(tmp_path):
    from torch import nn

    from pl_actsparse import activation_sparsity_report
    from pl_actsparse.core.int8 import quantize_weights_int8

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
    quantize_weights_int8(net)
    sparsify_activations(net, [torch.randn(32, 64) for _ in range(4)], {TargetScope(types=[nn.Linear]): 0.5}, calibration={"progress": False})
    torch.save(net.state_dict(), tmp_path / "int8.pt")
    live, saved = activation_sparsity_report(net), model_report(tmp_path / "int8.pt")
    assert [r.weight_bytes for r in saved.layers] == [r.weight_bytes for r in live.layers] == [18432, 16896]
    assert [(r.in_features, r.out_features) for r in saved.layers] == [(64, 256), (256, 64)]
    assert saved.decode_bytes == live.decode_bytes


def test_report_demo_is_a_demos_command(tmp_path, monkeypatch):
    import pl_actsparse.demos.__main__ as demos

    calls = []
    monkeypatch.setattr(demos, "report_main", lambda argv: calls.append(argv))
    demos.main(["report", "--out", str(tmp_path)])  # python -m pl_actsparse.demos report
    assert calls == [["--out", str(tmp_path)]]


@pytest.mark.parametrize("content", [None, b"{not a checkpoint}"])
def test_report_command_on_a_bad_file_is_one_line_and_exit_2(tmp_path, capsys, content):
    from pl_actsparse.measure.report import main

    path = tmp_path / "bad.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as info:
        main([str(path), "--no-files"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and err[0].startswith("pl-actsparse report: error:")


def test_pass_through_layers_skip_nothing_in_every_report(batches):
    """Retargeted (set_target_sparsity) and never-calibrated layers pass inputs through: the report must not count their
    stale calibration, threshold or data sparsity, in live, data and checkpoint reports and in the budget line."""
    from tiny_models import tiny_hf_llama
    from pl_actsparse import activation_sparsity_report, prepare_activation_sparsity, set_target_sparsity

    scope = TargetScope(patterns=[r".*mlp\..*_proj"])
    model = tiny_hf_llama()
    sparsify_activations(model, batches[:3], {scope: 0.5}, calibration={"progress": False})
    mlp0 = [f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")]
    set_target_sparsity(model, {n: 0.2 for n in mlp0})  # block 1 stays sparsifying at 0.5
    for report in (activation_sparsity_report(model), model_report(model, batches[3:]), model_report(model.state_dict())):
        rows = {r.name: r for r in report.layers}
        for name, r in rows.items():
            if name in mlp0:
                assert r.mode == "passthrough" and r.target == 0.2
                assert r.calibration_sparsity is None and r.error is None and r.data_sparsity is None
                assert r.achieved == 0.0 and r.bytes_skipped == 0.0
            else:
                assert r.mode == "sparsifying" and r.achieved == pytest.approx(0.5, abs=0.15)
        assert report.bytes_skipped == pytest.approx(sum(r.bytes_skipped for r in rows.values() if r.name not in mlp0))
        assert report.max_abs_error is None or report.max_abs_error < 0.01  # no stale "+0.3000"
        cells = next(line for line in str(report).splitlines() if line.startswith(mlp0[0])).split()
        assert cells[cells.index("0.2000") + 1:][:5] == ["-"] * 5  # threshold, calib., error, data, spread
    budget_t, budget_a = activation_sparsity_report(model).budgets()[repr(scope)]
    assert budget_t == pytest.approx((3 * 0.2 + 3 * 0.5) / 6) and budget_a == pytest.approx(0.5 / 2, abs=0.01)
    fresh = tiny_hf_llama()
    prepare_activation_sparsity(fresh, {scope: 0.5})  # never calibrated
    report = activation_sparsity_report(fresh)
    assert report.bytes_skipped == 0.0 and report.decode_saving == 0.0 and report.budgets()[repr(scope)] == (0.5, 0.0)
    assert "(0.0% less; ideal memory-bound speed-up <= 1.00x)" in str(report)


def test_exported_model_is_reported_from_its_saved_state(batches):
    """After export_for_inference the report shows the exported layers (mode "exported") with the figures they had;
    a retargeted (pass-through) layer exports without sparsity and counts 0; data cannot be measured there."""
    from tiny_models import tiny_hf_llama
    from pl_actsparse import activation_sparsity_report, export_for_inference, set_target_sparsity

    model = tiny_hf_llama()
    sparsify_activations(model, batches[:3], {TargetScope(patterns=[".*_proj"]): 0.5}, calibration={"progress": False})
    set_target_sparsity(model, {"model.layers.0.mlp.down_proj": 0.2})
    before = activation_sparsity_report(model)
    with pytest.warns(UserWarning, match="not calibrated"):
        export_for_inference(model)
    after = activation_sparsity_report(model)
    keys = ["name", "target", "calibration_sparsity", "in_features", "out_features", "weight_bytes"]
    assert [[getattr(r, k) for k in keys] for r in after.layers] == [[getattr(r, k) for k in keys] for r in before.layers]
    assert [r.threshold for r in after.layers if r.mode == "exported"] == [r.threshold for r in before.layers if r.mode == "sparsifying"]
    assert [r.mode for r in after.layers] == ["passthrough" if r.mode == "passthrough" else "exported" for r in before.layers]
    assert after.bytes_skipped == pytest.approx(before.bytes_skipped) and before.bytes_skipped > 0 and after.decode_bytes == before.decode_bytes
    assert after.budgets() == before.budgets()
    with pytest.raises(NotSparsifiedError, match=r"exported layers \(export_for_inference\) are not measured on data.*without data"):
        model_report(model, batches[3:4])


def test_budget_after_partial_removal_counts_removed_layers_as_dense(batches):
    """remove_activation_sparsity(model, scope) leaves the other layers: the scope's budget stays the one over the layers
    it had at sparsify time, the removed ones count 0 in achieved, and the budget line names them."""
    from tiny_models import tiny_hf_llama
    from pl_actsparse import activation_sparsity_report, remove_activation_sparsity

    scope = TargetScope(patterns=[".*_proj"])
    model = tiny_hf_llama()
    sparsify_activations(model, batches[:3], {scope: 0.5}, calibration={"progress": False}, allocation="auto")
    full = activation_sparsity_report(model)
    remove_activation_sparsity(model, TargetScope(patterns=[r".*mlp\..*"]))
    after = activation_sparsity_report(model)
    mlp = [r for r in full.layers if ".mlp." in r.name]
    assert [r.name for r in after.removed] == [r.name for r in mlp] and all(".mlp." not in r.name for r in after.layers)
    assert [(r.target, r.weight_bytes, r.achieved, r.mode) for r in after.removed] == [(r.target, r.weight_bytes, 0.0, "removed") for r in mlp]
    (target, achieved), = after.budgets().values()
    total = sum(r.weight_bytes for r in full.layers)
    assert target == pytest.approx(full.budgets()[repr(scope)][0], abs=1e-12) == pytest.approx(0.5, abs=1e-9)
    assert achieved == pytest.approx(sum(r.bytes_skipped for r in full.layers if ".mlp." not in r.name) / total)
    assert f"removed since, counted dense: {mlp[0].name}" in str(after)
