"""Per-model report: live model and checkpoint, tables, files, decode-memory arithmetic."""

import json

import pytest
import torch

from pl_actsparse import TargetScope, sparsify_activations
from pl_actsparse.errors import NotSparsifiedError
from pl_actsparse.measure.report import main, model_report

RECIPE = {TargetScope(patterns=[".*mlp.*"]): 0.4, TargetScope(patterns=[r".*self_attn\.[qkv]_proj"]): 0.25}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def sparse_tiny(tiny, batches):
    sparsify_activations(tiny, batches[:3], RECIPE, progress=False)
    return tiny


def test_live_report_with_data_groups_and_spread(sparse_tiny, batches):
    report = model_report(sparse_tiny, batches[3:])
    assert len(report.rows) == 3 * 6
    rows = {r.name: r for r in report.rows}
    gate, up = rows["layers.0.mlp.gate_proj"], rows["layers.0.mlp.up_proj"]
    assert gate.group is not None and gate.group == up.group
    assert rows["layers.0.mlp.down_proj"].group is None
    assert {rows[f"layers.2.self_attn.{p}_proj"].group for p in "qkv"} == {rows["layers.2.self_attn.q_proj"].group}
    assert len(report.groups) == 6
    for r in report.rows:
        assert r.calibration_sparsity == pytest.approx(r.target, abs=0.01)
        assert r.data_sparsity is not None and abs(r.data_sparsity - r.target) < 0.15  # held-out drift
        assert 0.0 <= r.token_p5 <= r.data_sparsity <= r.token_p95 <= 1.0
        assert r.bytes_skipped == pytest.approx(r.data_sparsity * r.weight_bytes)
    assert report.data_tokens == sum(b.numel() for b in batches[3:])
    # arithmetic of the prediction: TinyLlama has an untied embedding, which a decode step does not read
    params = sum(p.numel() * p.element_size() for p in sparse_tiny.parameters())
    embed = sparse_tiny.embed_tokens.weight.numel() * 4
    assert report.model_bytes == params and report.decode_bytes == params - embed
    assert report.decode_saving == pytest.approx(sum(r.bytes_skipped for r in report.rows) / (params - embed))
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
    assert [[getattr(r, k) for k in keys] for r in saved.rows] == [[getattr(r, k) for k in keys] for r in live.rows]
    assert saved.decode_bytes == live.decode_bytes and saved.model_bytes == live.model_bytes
    # a Lightning checkpoint with the model under "model."
    ckpt = {"state_dict": {"model." + k: v for k, v in sparse_tiny.state_dict().items()}, "epoch": 3}
    torch.save(ckpt, tmp_path / "lightning.ckpt")
    assert [r.name for r in model_report(tmp_path / "lightning.ckpt", prefix="model.").rows] == [r.name for r in live.rows]
    with pytest.raises(ValueError, match="live model"):
        model_report(path, [torch.zeros(1, 4, dtype=torch.long)])


def test_tied_classifier_counts_once_live_and_saved(tmp_path, batches):
    from pl_actsparse.demos.llama2c import load_llama2c_checkpoint

    model = load_llama2c_checkpoint()
    assert model.lm_head.weight is model.embed_tokens.weight
    sparsify_activations(model, [torch.randint(0, 512, (2, 32))], {TargetScope(patterns=[".*down_proj"]): 0.5}, progress=False)
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
    assert len(report.rows) == 18 and (tmp_path / "cli" / "report.html").stat().st_size > 0
    from pl_actsparse.lightning.cli import main as console_main

    console_main(["report", str(tmp_path / "sparse.pt"), "--out", str(tmp_path / "cli2")])  # `pl-actsparse report`
    assert (tmp_path / "cli2" / "report.html").read_text() == (tmp_path / "cli" / "report.html").read_text()
