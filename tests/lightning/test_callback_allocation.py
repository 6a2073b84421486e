"""``ActivationSparsityCallback(allocation=...)``: each scope's value read as a byte budget over its layers, on a
real third-party stack (a tiny random transformers LlamaForCausalLM), kept by recalibrations and by a resumed
fit, re-allocated when a schedule changes the budget, and expressible in a YAML recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pl_actsparse import TargetScope, activation_sparsity_report, sparsify_activations
from pl_actsparse.core.layer import sparsified_layers, sparsifier_state, weight_nbytes
from pl_actsparse.errors import InvalidOptionError, InvalidTargetError
from pl_actsparse.lightning import callback as callback_module
from pl_actsparse.lightning.callback import ActivationSparsityCallback
from pl_actsparse.lightning.schedule import LinearRamp
from test_callback import TinyData, _callback, _trainer
from test_callback_stacks import ConfiguredHFLM, _achieved
from tiny_models import tiny_hf_llama

ALL = [{"patterns": [r".*_proj"], "sparsity": 0.5}]
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _levels(module) -> dict[str, float]:
    return {n: sparsifier_state(m).target for n, m in sparsified_layers(module)}


def _byte_weighted(module, values: dict[str, float]) -> float:
    mods = dict(module.named_modules())
    nbytes = {n: weight_nbytes(mods[n]) for n in values}
    return sum(nbytes[n] * v for n, v in values.items()) / sum(nbytes.values())


@pytest.fixture
def allocations(monkeypatch):
    """Counts the callback's allocations (its calls of the functional sparsify_activations)."""
    calls = []
    real = callback_module.sparsify_activations

    def counting(*args, **kwargs):
        calls.append(kwargs["allocation"])
        return real(*args, **kwargs)

    monkeypatch.setattr(callback_module, "sparsify_activations", counting)
    return calls


def test_allocation_is_checked_at_construction():
    with pytest.raises(InvalidOptionError, match=r"allocation must be one of 'uniform', 'auto', 'fisher', got 'teal'") as info:
        ActivationSparsityCallback(scopes=ALL, allocation="teal")
    assert info.value.argument == "allocation"  # the YAML key the CLI prints
    assert ActivationSparsityCallback(scopes=ALL).allocation == "uniform"
    over = [{"patterns": [r".*_proj"], "sparsity": 0.95}]
    with pytest.raises(InvalidTargetError, match=r"byte budget must be <= 0.94; got 0.95 for TargetScope\(patterns=\['\.\*_proj'\]\)") as info:
        ActivationSparsityCallback(scopes=over, allocation="auto")  # before any data is read, not after the model loads
    assert info.value.argument == "allocation"
    assert ActivationSparsityCallback(scopes=over).targets  # uniform levels may go above 0.94


def test_callback_allocates_the_byte_budget_on_hf_llama_and_resumes_with_the_same_levels(tmp_path, allocations):
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = TinyData()
    lm = ConfiguredHFLM()
    cb = _callback(scopes=ALL, submodule="model", allocation="auto", recalibrate_every_n_epochs=1)
    _trainer(cb, limit_val_batches=1).validate(lm, datamodule=data, verbose=False)
    levels = _levels(lm.model)
    assert len(levels) == 14 and max(levels.values()) - min(levels.values()) > 0.1  # 2 blocks x 7 projections
    assert _byte_weighted(lm.model, levels) == pytest.approx(0.5, abs=1e-9)
    # measured from outside on the calibration batches: the budget is met
    calibration = list(data.calibration_dataloader())
    assert _byte_weighted(lm.model, _achieved(lm.model, calibration)) == pytest.approx(0.5, abs=0.01)
    # the functional core on the same weights and batches gives the same levels and thresholds (deterministic)
    ref = sparsify_activations(tiny_hf_llama(seed=3), calibration, {TargetScope(patterns=ALL[0]["patterns"]): 0.5},
                               calibration={"transform_fn": lambda b: b[0], "progress": False}, allocation="auto")
    assert _levels(ref) == pytest.approx(levels, abs=1e-12)
    assert all(torch.equal(m.activation_threshold, ref.get_submodule(n).activation_threshold) for n, m in sparsified_layers(lm.model))
    # the report shows each layer's allocated level and the scope's budget met
    report = activation_sparsity_report(lm.model)
    (scope, (target, achieved)), = report.budgets().items()
    assert scope == repr(TargetScope(patterns=ALL[0]["patterns"])) and target == pytest.approx(0.5, abs=1e-9)
    assert achieved == pytest.approx(0.5, abs=0.01)
    assert "Byte budgets (weight-byte-weighted target -> achieved): TargetScope" in str(report)
    assert report.summary()["byte_budgets"][scope]["target"] == pytest.approx(0.5, abs=1e-9)
    assert allocations == ["auto"]

    # fit: the epoch-end recalibrations keep the levels (thresholds only); the state dict carries them
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer = _trainer(cb, ckpt, max_epochs=1, limit_train_batches=2, limit_val_batches=1, enable_checkpointing=True)
    trainer.fit(lm, datamodule=data)
    assert [h["reason"] for h in cb.history] == ["start of validation", "every 1 epoch(s)"]
    assert _levels(lm.model) == levels and allocations == ["auto"]
    assert cb.state_dict()["allocated"]["levels"] == {f"{n}": v for n, v in levels.items()}

    # a resumed fit in a new process (new module and callback) keeps the same levels and does not allocate again
    lm2, cb2 = ConfiguredHFLM(), _callback(scopes=ALL, submodule="model", allocation="auto", recalibrate_every_n_epochs=1)
    trainer = _trainer(cb2, max_epochs=2, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(lm2, datamodule=data, ckpt_path=str(tmp_path / "last.ckpt"))
    assert cb2.allocated == cb.allocated and _levels(lm2.model) == levels and allocations == ["auto"]
    assert [h["reason"] for h in cb2.history] == ["start of validation", "every 1 epoch(s)", "every 1 epoch(s)"]


def test_a_schedule_that_changes_the_budget_reallocates(allocations):
    data = TinyData()
    lm = ConfiguredHFLM()
    cb = _callback(scopes=ALL, submodule="model", allocation="auto", schedule=LinearRamp(initial_sparsity=0.2, epochs=2))
    _trainer(cb, max_epochs=3, limit_train_batches=1, limit_val_batches=0).fit(lm, datamodule=data)
    # budgets 0.2 (start of fit), 0.35 (epoch 1), 0.5 (epoch 2): one allocation each, each budget met by the levels
    assert allocations == ["auto"] * 3
    assert cb.allocated["budgets"] == {repr(TargetScope(patterns=ALL[0]["patterns"])): 0.5}
    assert _byte_weighted(lm.model, _levels(lm.model)) == pytest.approx(0.5, abs=1e-9)


def test_allocation_errors_leave_the_model_as_it_was(monkeypatch):
    """An allocation that fails at the first calibration leaves no layer allocated (a budget the levels cannot reach
    fails earlier, at construction: test_allocation_is_checked_at_construction)."""
    import pl_actsparse.api as api

    def failing(*args, **kwargs):
        raise InvalidTargetError("the search failed")

    monkeypatch.setattr(api, "search_levels", failing)
    lm = ConfiguredHFLM()
    cb = _callback(scopes=[{"patterns": [r".*_proj"], "sparsity": 0.5}], submodule="model", allocation="auto")
    with pytest.raises(InvalidTargetError, match="the search failed"):
        _trainer(cb, limit_val_batches=1).validate(lm, datamodule=TinyData(), verbose=False)
    assert cb.allocated == {} and all(sparsifier_state(m).target == 0.5 for _, m in sparsified_layers(lm.model))


def test_yaml_recipe_with_allocation_auto_through_the_cli(tmp_path):
    """recipes/stories260k_modelwide.yaml says ``allocation: auto``: validated through LightningCLI on a few windows."""
    import yaml

    from pl_actsparse.lightning.cli import run

    assert yaml.safe_load((RECIPES / "stories260k_modelwide.yaml").read_text())["trainer"]["callbacks"][0]["init_args"]["allocation"] == "auto"
    cli = run(["validate", "--config", str(RECIPES / "stories260k_modelwide.yaml"), "trainer.logger=false",
               f"trainer.default_root_dir={tmp_path}", "trainer.limit_val_batches=1", "data.init_args.seq_len=64",
               "data.init_args.max_calibration_windows=8", "data.init_args.calibration_batch_size=4"])
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, ActivationSparsityCallback))
    levels = _levels(cli.model)
    assert cb.allocation == "auto" and len(levels) == 35 and max(levels.values()) - min(levels.values()) > 0.1
    assert _byte_weighted(cli.model, levels) == pytest.approx(0.5, abs=1e-9)
    assert all(sparsifier_state(m).calibration_sparsity == pytest.approx(sparsifier_state(m).target, abs=0.01) for _, m in sparsified_layers(cli.model))


def test_prepare_with_levels_keeps_the_scopes_and_checks_the_levels():
    """prepare_activation_sparsity(levels=) is how the callback re-installs allocated levels; the report groups the
    layers by the scope that claimed them and shows each scope's byte-weighted target."""
    from pl_actsparse import prepare_activation_sparsity

    model = tiny_hf_llama()
    scopes = {TargetScope(patterns=[r".*mlp\..*_proj"]): 0.5, TargetScope(patterns=[r".*self_attn\..*_proj"]): 0.2}
    with pytest.raises(InvalidTargetError, match=r"levels \{'lm_head': 0.3\} are not in \[0, 1\] or name no layer these scopes select"):
        prepare_activation_sparsity(model, scopes, levels={"lm_head": 0.3})
    with pytest.raises(InvalidTargetError, match=r"'model.layers.0.mlp.up_proj': 1.5"):
        prepare_activation_sparsity(model, scopes, levels={"model.layers.0.mlp.up_proj": 1.5})
    assert not list(sparsified_layers(model))  # a failed call changes nothing
    plan = prepare_activation_sparsity(model, scopes, levels={"model.layers.0.mlp.up_proj": 0.8})
    assert plan.targets["model.layers.0.mlp.up_proj"] == 0.8 and plan.targets["model.layers.0.mlp.down_proj"] == 0.5
    assert _levels(model)["model.layers.0.mlp.up_proj"] == 0.8
    report = activation_sparsity_report(model)
    assert report.scopes == {repr(s): [n for n in plan.targets if n in plan.claimed_by and plan.claimed_by[n] == s] for s in scopes}
    mlp = report.scopes[repr(TargetScope(patterns=[r".*mlp\..*_proj"]))]
    expected = _byte_weighted(model, {n: _levels(model)[n] for n in mlp})
    target, achieved = report.budgets()[repr(TargetScope(patterns=[r".*mlp\..*_proj"]))]
    assert target == pytest.approx(expected) and target > 0.5 and achieved == 0.0  # not calibrated: pass-through skips nothing
    assert report.budgets()[repr(TargetScope(patterns=[r".*self_attn\..*_proj"]))][0] == pytest.approx(0.2)


def test_a_regression_module_allocates_with_its_calibration_loss_method():
    """No callable in the callback's arguments (YAML): a LightningModule that is no causal LM gives the allocation its
    loss as a method calibration_loss(output, batch, mask), which gets the (x, y) batch; without it the first
    calibration names loss_fn. Levels differ across the layers and meet the byte budget."""
    import lightning.pytorch as pl
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    class Regression(pl.LightningModule):
        def __init__(self, with_loss: bool) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net, self.seen = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 1)), []
            if with_loss:
                self.calibration_loss = self._loss

        def forward(self, x):
            return self.net(x)

        def _loss(self, output, batch, mask):
            self.seen.append(len(batch))
            return torch.nn.functional.mse_loss(output, batch[1], reduction="sum"), len(batch[1])

        def validation_step(self, batch, _):
            return None

    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    loader = DataLoader(TensorDataset(x, x[:, :1] * 2 + 0.1 * torch.randn(64, 1, generator=g)), batch_size=16)
    scopes = [{"types": ["Linear"], "sparsity": 0.4}]
    module = Regression(with_loss=True)
    cb = _callback(scopes=scopes, allocation="auto", calibration_dataloader=loader)
    _trainer(cb, limit_val_batches=1).validate(module, dataloaders=loader, verbose=False)
    levels = _levels(module)
    assert len(levels) == 3 and max(levels.values()) - min(levels.values()) > 0.05 and set(module.seen) == {2}
    assert _byte_weighted(module, levels) == pytest.approx(0.4, abs=1e-3)
    with pytest.raises(InvalidOptionError, match=r"calibration=\{'loss_fn': f\}"):
        _trainer(_callback(scopes=scopes, allocation="auto", calibration_dataloader=loader),
                 limit_val_batches=1).validate(Regression(with_loss=False), dataloaders=loader, verbose=False)
