"""The callback in the training stacks users run (issue 12): models built in ``configure_model``, weight
averaging (SWA, EMA) in either callback order, batches that do not fit ``forward``, custom schedules, the
token-mask option and logging. ``ddp_spawn`` is in tests/lightning/test_ddp_spawn.py."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, StochasticWeightAveraging
from torch.utils.data import DataLoader

from pl_actsparse import TargetScope, calibrate_activation_sparsity, prepare_activation_sparsity
from pl_actsparse.core.layer import sparsified_layers
from pl_actsparse.errors import CallbackConfigurationError, InvalidTargetError
from pl_actsparse.lightning.calibration_data import CalibrationData
from pl_actsparse.api import install_sparsifiers_from_state_dict
from pl_actsparse.config import CalibrationConfig
from pl_actsparse.lightning.callback import ActivationSparsityCallback
from pl_actsparse.lightning.schedule import LinearRamp, SparsitySchedule
from pl_actsparse.measure.metric import ActivationSparsity
from test_callback import MLP, TinyData, TinyLM, _callback, _reference_thresholds, _thresholds, _trainer, _windows
from tiny_models import tiny_hf_llama, tiny_llama

HF_MLP = [{"patterns": [r".*mlp\.(gate|up|down)_proj"], "sparsity": 0.5}]


def _achieved(model, batches) -> dict[str, float]:
    """The package's exact achieved-sparsity measurement with the model's thresholds, per layer."""
    metric = ActivationSparsity.from_model(model)
    with metric.observe(model), torch.no_grad():
        for x, _ in batches:
            model(x)
    values = metric.compute()
    return {n: float(values[f"{n}/sparsity"]) for n, _ in sparsified_layers(model)}


# ---------------------------------------------------------------------------------------------------------
# item 3: models built in LightningModule.configure_model


class ConfiguredHFLM(pl.LightningModule):
    """Builds a tiny transformers LlamaForCausalLM in configure_model (idempotent, as Lightning requires)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = None
        self.builds = 0

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.builds += 1
        self.model = tiny_hf_llama(seed=3).train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x).logits

    def _loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_model_built_in_configure_model_is_sparsified_validated_and_fitted(tmp_path):
    data = TinyData()
    lm = ConfiguredHFLM()
    cb = _callback(scopes=HF_MLP, submodule="model")
    trainer = _trainer(cb, limit_val_batches=2)
    results = trainer.validate(lm, datamodule=data, verbose=False)[0]
    names = [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")]
    assert sorted(_thresholds(lm.model)) == sorted(names)
    assert "configure_model" not in lm.__dict__  # the one-shot wrapper is gone
    # the same thresholds as the functional core on an identical model and the same batches
    ref = tiny_hf_llama(seed=3)
    prepare_activation_sparsity(ref, {TargetScope(patterns=HF_MLP[0]["patterns"]): 0.5})
    calibrate_activation_sparsity(ref, list(data.calibration_dataloader()), calibration={"transform_fn": lambda b: b[0], "progress": False})
    assert _thresholds(lm.model) == _thresholds(ref)
    metric = ActivationSparsity.from_model(lm)
    with metric.observe(lm), torch.no_grad():
        for x, _ in list(data.val_dataloader())[:2]:
            lm(x)
    assert results["actsparse/val/sparsity"] == pytest.approx(float(metric.compute()["sparsity"]), abs=1e-6)
    assert [h["reason"] for h in cb.history] == ["start of validation"]

    # fit: configure_model runs again (a no-op), the callback plans again, finds the model calibrated
    before = _thresholds(lm.model)
    trainer = _trainer(cb, max_epochs=1, limit_train_batches=2, limit_val_batches=2)
    trainer.fit(lm, datamodule=data)
    assert lm.builds == 1 and [h["reason"] for h in cb.history] == ["start of validation"]
    assert _thresholds(lm.model) == before and "actsparse/val/sparsity" in trainer.callback_metrics

    # a sparsified checkpoint loads strictly into a fresh module whose layers exist only after configure_model
    path = tmp_path / "configured.ckpt"
    trainer.save_checkpoint(path)
    fresh, fresh_cb = ConfiguredHFLM(), _callback(scopes=HF_MLP, submodule="model")
    _trainer(fresh_cb, limit_val_batches=1).validate(fresh, datamodule=data, ckpt_path=path, verbose=False)
    assert _thresholds(fresh.model) == before and fresh_cb.history == cb.history


def test_configure_model_without_matching_layers_still_fails_precisely():
    from pl_actsparse.errors import UnmatchedScopeError

    lm = ConfiguredHFLM()
    cb = _callback(scopes=[{"patterns": [r".*mlp\.nothing_proj"], "sparsity": 0.5}], submodule="model")
    with pytest.raises(UnmatchedScopeError):
        _trainer(cb).validate(lm, datamodule=TinyData(), verbose=False)


# ---------------------------------------------------------------------------------------------------------
# item 5: weight averaging swaps the weights


def _averaging(kind: str):
    if kind == "swa":
        return StochasticWeightAveraging(swa_lrs=0.2, swa_epoch_start=1)
    return EMAWeightAveraging(decay=0.5)


@pytest.mark.parametrize("kind", ["swa", "ema"])
@pytest.mark.parametrize("averaging_first", [True, False])
def test_make_permanent_thresholds_match_the_averaged_final_weights(kind, averaging_first):
    data = TinyData()
    lm = TinyLM(lr=0.5)
    cb = _callback(recalibrate_every_n_epochs=1, on_train_end="make_permanent", track=False)
    averaging = _averaging(kind)
    callbacks = [averaging, cb] if averaging_first else [cb, averaging]
    trainer = _trainer(*callbacks, max_epochs=3, limit_val_batches=0)
    trainer.fit(lm, datamodule=data)
    assert cb.finished == "make_permanent"
    assert trainer.callbacks.index(cb) > trainer.callbacks.index(averaging)  # runs after the averaging callback
    achieved = _achieved(lm, data.calibration_dataloader())
    assert len(achieved) == 9
    assert max(abs(v - 0.5) for v in achieved.values()) <= 0.002, achieved
    # exactly what the functional core computes on the final (averaged) weights
    assert _thresholds(lm) == _reference_thresholds(lm, data.calibration_dataloader())


@pytest.mark.parametrize("averaging_first", [True, False])
def test_keep_after_swa_gives_the_averaged_final_weights_their_own_thresholds(averaging_first):
    # SWA copies its average (parameters only) into the model at the end of fit: with on_train_end="keep" the
    # thresholds calibrated at the start of fit were kept for weights they were never calibrated on (0.0015 off
    # target on the calibration data, silently), while EMA's average got its own
    data, lm, cb = TinyData(), TinyLM(), _callback(track=False)
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)
    _trainer(*([swa, cb] if averaging_first else [cb, swa]), max_epochs=3, limit_val_batches=0).fit(lm, datamodule=data)
    assert [h["reason"] for h in cb.history] == ["start of fit", "end of training (weights or thresholds replaced by another callback)"]
    assert cb.finished is None and all(m._actsparse.mode.value == "sparsifying" for _, m in sparsified_layers(lm))
    assert _thresholds(lm) == _reference_thresholds(lm, data.calibration_dataloader())
    achieved = _achieved(lm, data.calibration_dataloader())
    assert len(achieved) == 9 and max(abs(v - 0.5) for v in achieved.values()) <= 0.002, achieved


def test_checkpoint_with_ema_averaged_weights_carries_thresholds_for_those_weights(tmp_path):
    data = TinyData()
    lm = TinyLM(lr=0.5)
    cb = _callback(recalibrate_every_n_epochs=1, track=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    trainer = _trainer(cb, EMAWeightAveraging(decay=0.5), checkpoint, max_epochs=2, limit_val_batches=0, enable_checkpointing=True)
    trainer.fit(lm, datamodule=data)
    state = torch.load(tmp_path / "epoch=1.ckpt", weights_only=False)
    assert "current_model_state" in state  # EMA saved the averaged weights as the state_dict
    averaged = TinyLM(seed=9)
    install_sparsifiers_from_state_dict(averaged, state["state_dict"])
    averaged.load_state_dict(state["state_dict"])
    achieved = _achieved(averaged, data.calibration_dataloader())
    assert len(achieved) == 9 and max(abs(v - 0.5) for v in achieved.values()) <= 0.002, achieved
    # the current (non-averaged) weights in the checkpoint keep the training thresholds of the epoch-end recalibration
    epoch_end = [h for h in cb.history if h["reason"] == "every 1 epoch(s)"]
    assert [h["step"] for h in epoch_end] == [4, 8]
    current = {k: float(v) for k, v in state["current_model_state"].items() if k.endswith("activation_threshold")}
    assert current == {f"{n}.activation_threshold": v for n, v in epoch_end[-1]["thresholds"].items()}
    # EMA copied its average (parameters and buffers) into the model at the end: with on_train_end="keep" the
    # thresholds it copied were replaced by thresholds calibrated on those final weights
    assert cb.history[-1]["reason"] == "end of training (weights or thresholds replaced by another callback)"
    achieved = _achieved(lm, data.calibration_dataloader())
    assert max(abs(v - 0.5) for v in achieved.values()) <= 0.002, achieved


def test_ema_validation_measures_thresholds_calibrated_for_the_averaged_weights():
    data = TinyData()
    lm = TinyLM(lr=0.5)
    cb = _callback(recalibrate_every_n_epochs=1)
    trainer = _trainer(cb, EMAWeightAveraging(decay=0.5), max_epochs=2, limit_val_batches=2)
    trainer.fit(lm, datamodule=data)
    reasons = [h["reason"] for h in cb.history]
    # EMA swaps its averaged weights *and buffers* in for validation: its copy's thresholds are not calibrated
    # for anything, so every validation first gets thresholds for the averaged weights
    assert reasons[0] == "start of fit" and "validation with weights swapped in by another callback" in reasons
    swapped = [h for h in cb.history if h["reason"].startswith("validation with")]
    assert len(swapped) == 2  # one per epoch
    assert all(h["sparsity_after"] == pytest.approx(0.5, abs=2e-3) for h in swapped)


# ---------------------------------------------------------------------------------------------------------
# item 6 (second half): a TensorDataset batch (x, y) fed to forward(x)


def test_tuple_batch_into_one_argument_forward_names_input_key():
    lm, data = TinyLM(), TinyData()
    cb = _callback(input_key=None)
    with pytest.raises(CallbackConfigurationError, match=r"tuple|list") as info:
        _trainer(cb).validate(lm, datamodule=data, verbose=False)
    message = str(info.value)
    assert "input_key" in message and "input_key=0" in message and "TinyLM.forward" in message
    assert all(float(m.activation_threshold) == float("-inf") for _, m in sparsified_layers(lm))  # nothing half-calibrated


def test_inputs_fn_passes_well_formed_batches_through():
    model = tiny_llama()
    fn = CalibrationData().inputs_fn(None, model)
    x = torch.zeros(2, 4, dtype=torch.long)
    assert fn(x) is x and fn((x,)) == (x,)
    with pytest.raises(CallbackConfigurationError, match="input_key"):
        fn((x, x))
    assert CalibrationData(input_key=0).inputs_fn(None, model)((x, "y")) is x


# ---------------------------------------------------------------------------------------------------------
# configuration objects


def test_custom_schedule_by_overriding_targets():
    class Halfway(SparsitySchedule):
        check_every_n_steps = 2

        def targets(self, final, epoch, step):
            return {s: t if step >= 4 else t / 2 for s, t in final.items()}

    lm = TinyLM()
    cb = _callback(schedule=Halfway(), track=False)
    _trainer(cb, max_steps=6, limit_val_batches=0).fit(lm, datamodule=TinyData())
    assert [(h["step"], round(h["target"], 6)) for h in cb.history] == [(0, 0.25), (4, 0.5)]
    assert all(h["sparsity_after"] == pytest.approx(h["target"], abs=2e-3) for h in cb.history)


def test_schedule_validation():
    final = {TargetScope(patterns=[".*"]): 0.5}
    with pytest.raises(InvalidTargetError, match=r"targets\(epoch=0, step=0\)"):
        type("Bad", (SparsitySchedule,), {"targets": lambda self, f, e, s: {k: 1.5 for k in f}})().checked_targets(final, 0, 0)
    with pytest.raises(CallbackConfigurationError, match="one target per scope"):
        type("Lost", (SparsitySchedule,), {"targets": lambda self, f, e, s: {}})().checked_targets(final, 0, 0)
    ramp = LinearRamp(initial_sparsity=0.1, epochs=4)
    assert [ramp.checked_targets(final, e, 0)[TargetScope(patterns=[".*"])] for e in range(6)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.5])
    assert ActivationSparsityCallback(scopes=MLP, schedule=ramp).schedule is ramp


def test_calibration_data_validation_and_hooks_resolution():
    with pytest.raises(CallbackConfigurationError, match="needs calibration.num_batches"):
        CalibrationData(source="val")
    data = CalibrationData(source="val", config=CalibrationConfig(num_batches=1))
    loader, where = data.resolve(TinyData(), TinyLM())
    assert where == "the val dataloader" and len(list(data.batches(loader))) == 1
    assert [x for x in data.batches(range(10), world_size=3, rank=1)] == []  # num_batches=1: rank 1 gets nothing
    assert list(CalibrationData(config=CalibrationConfig(num_batches=7)).batches(range(10), world_size=3, rank=1)) == [1, 4]


def test_the_calibration_config_reaches_the_functional_api(monkeypatch):
    """Every option of ``calibration`` reaches the api's verb (token_mask, method, offload, batches in flight)."""
    import pl_actsparse.lightning.callback as module

    seen = {}
    real = module.calibrate_activation_sparsity

    def calibrate(model, dataset, *, calibration=None, **kwargs):
        seen["config"] = calibration
        return real(model, dataset, calibration=calibration, **kwargs)

    monkeypatch.setattr(module, "calibrate_activation_sparsity", calibrate)
    mask = lambda batch: torch.ones(batch[0].shape, dtype=torch.bool)  # noqa: E731
    cb = _callback(calibration=CalibrationConfig(token_mask=mask, method="lockstep", max_batches_in_flight=2, progress=False))
    _trainer(cb).validate(TinyLM(), datamodule=TinyData(), verbose=False)
    config = seen["config"]
    assert config.token_mask is mask and len(cb.history) == 1
    assert (config.method, config.max_batches_in_flight, config.offload, config.progress) == ("lockstep", 2, None, False)


def test_verbose_output_goes_to_the_logger_on_rank_zero(caplog, capsys):
    caplog.set_level(logging.INFO, logger="pl_actsparse")
    cb = _callback(verbose=True)
    _trainer(cb).validate(TinyLM(), datamodule=TinyData(), verbose=False)
    messages = [r.getMessage() for r in caplog.records if r.name == "pl_actsparse.lightning.callback"]
    assert len(messages) == 2
    assert messages[0].startswith("activation sparsity calibrated (start of validation")
    assert "achieved activation sparsity on the val data" in messages[1] and "model.layers.2.mlp.down_proj" in messages[1]
    assert "activation sparsity" not in capsys.readouterr().out  # nothing printed


def test_calibration_error_restores_thresholds_and_loader_is_unchanged():
    # a well-formed explicit calibration list is consumed as given (regression guard for the CalibrationData move)
    lm = TinyLM()
    batches = list(DataLoader(_windows(6, 4), batch_size=3))
    cb = _callback(calibration_dataloader=batches)
    _trainer(cb).validate(lm, datamodule=TinyData(), verbose=False)
    assert cb.history[0]["source"] == "calibration_dataloader" and cb.history[0]["elements"] > 0
    assert _thresholds(lm) == _reference_thresholds(TinyLM(), batches)


def test_a_callback_changing_weights_after_make_permanent_triggers_a_final_recalibration():
    class Rescale(pl.Callback):  # runs after the sparsity callback in on_train_end and changes the weights
        def on_train_end(self, trainer, pl_module):
            with torch.no_grad():
                for p in pl_module.model.layers.parameters():
                    p.mul_(1.25)

    data = TinyData()
    lm = TinyLM(lr=0.5)
    cb = _callback(on_train_end="make_permanent", track=False)
    trainer = _trainer(cb, Rescale(), max_steps=2, limit_val_batches=0)
    trainer.fit(lm, datamodule=data)
    assert [h["reason"] for h in cb.history] == [
        "start of fit",
        "end of training (make permanent)",
        "end of fit (weights changed after make permanent)",
    ]
    achieved = _achieved(lm, data.calibration_dataloader())
    assert max(abs(v - 0.5) for v in achieved.values()) <= 0.002, achieved


def test_thresholds_that_differ_across_ranks_raise():
    from types import SimpleNamespace

    from pl_actsparse.errors import ActivationSparsityError
    from pl_actsparse.lightning import callback as callback_module

    lm = TinyLM()
    prepare_activation_sparsity(lm, {TargetScope(patterns=MLP[0]["patterns"]): 0.5})
    for _, m in sparsified_layers(lm):
        m.activation_threshold.fill_(0.5)
    agree = SimpleNamespace(reduce=lambda t, reduce_op: t, root_device=torch.device("cpu"))
    callback_module._check_replicated(SimpleNamespace(world_size=2, strategy=agree), list(sparsified_layers(lm)))  # identical everywhere: fine
    differ = SimpleNamespace(reduce=lambda t, reduce_op: t + 1, root_device=torch.device("cpu"))  # another rank is higher
    with pytest.raises(ActivationSparsityError, match="different thresholds or levels on different ranks"):
        callback_module._check_replicated(SimpleNamespace(world_size=2, strategy=differ), list(sparsified_layers(lm)))
