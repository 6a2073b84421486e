"""ActivationSparsityCallback: construction, lifecycle, tracking, fine-tuning, checkpoints.

A tiny random Llama (tests/tiny_models.py) keeps every Trainer run well under a second; the real model is
exercised through the recipes (tests/lightning/test_cli.py).
"""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pl_actsparse import (
    ActivationSparsityCallback,
    IgnoredScope,
    TargetScope,
    calibrate_activation_sparsity,
    load_activation_sparsity,
    prepare_activation_sparsity,
)
from pl_actsparse.api import install_sparsifiers_from_state_dict
from pl_actsparse.config import CalibrationConfig
from pl_actsparse.errors import InvalidOptionError, InvalidScopeError, InvalidTargetError, ScopeSpecError
from pl_actsparse.core.layer import SparsifierMode, sparsified_layers, sparsifier_state
from pl_actsparse.lightning.callback import CallbackConfigurationError, ScopeSpec
from pl_actsparse.lightning.schedule import LinearRamp
from pl_actsparse.measure.metric import ActivationSparsity
from tiny_models import tiny_llama

MLP = [{"patterns": [r".*mlp\.(gate|up|down)_proj"], "sparsity": 0.5}]
SEED = [{"patterns": [".*up_proj", ".*gate_proj"], "sparsity": 0.3}, {"patterns": [".*down_proj"], "sparsity": 0.5}]


# ---------------------------------------------------------------------------------------------------------
# a tiny LightningModule / DataModule


class TinyLM(pl.LightningModule):
    def __init__(self, lr: float = 0.05, seed: int = 0) -> None:
        super().__init__()
        self.model = tiny_llama(seed).train()
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch))

    def test_step(self, batch, batch_idx):
        self.log("test/loss", self._loss(batch))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def on_load_checkpoint(self, checkpoint):
        install_sparsifiers_from_state_dict(self, checkpoint["state_dict"])


def _windows(n: int, seed: int, seq: int = 16, vocab: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, seq + 1), generator=g)
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


class TinyData(pl.LightningDataModule):
    def __init__(self, train: int = 16, val: int = 8, batch_size: int = 4) -> None:
        super().__init__()
        self.train_set, self.val_set, self.calib_set = _windows(train, 1), _windows(val, 2), _windows(12, 3)
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def predict_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def calibration_dataloader(self):
        return DataLoader(self.calib_set, batch_size=3)


def _trainer(*callbacks, **kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=50,  # training batches are tracked on logging steps only: off unless a test asks
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **options)


def _callback(scopes=MLP, **kwargs) -> ActivationSparsityCallback:
    kwargs.setdefault("input_key", 0)
    kwargs.setdefault("calibration", {"progress": False})
    kwargs.setdefault("verbose", False)
    return ActivationSparsityCallback(scopes=scopes, **kwargs)


def _thresholds(module: nn.Module) -> dict[str, float]:
    return {n: float(m.activation_threshold) for n, m in sparsified_layers(module)}


def _reference_thresholds(lm: pl.LightningModule, batches, scopes=MLP, state=None) -> dict[str, float]:
    """The functional core on a fresh copy of the weights: what the callback must reproduce."""
    ref = TinyLM()
    ref.load_state_dict(state if state is not None else _dense_state(lm), strict=False)
    prepare_activation_sparsity(ref, {ScopeSpec(**s).to_scope(): s["sparsity"] for s in scopes})
    calibrate_activation_sparsity(ref, list(batches), calibration={"transform_fn": lambda b: b[0], "progress": False})
    return _thresholds(ref)


def _dense_state(lm: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lm.state_dict().items() if not k.endswith(("activation_threshold", "_extra_state"))}


def _csv_rows(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------------------
# construction


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(), CallbackConfigurationError, "neither was given"),
        (dict(scopes=MLP, target_sparsity_by_scope={TargetScope(patterns=".*"): 0.5}), CallbackConfigurationError, "both were given"),
        (dict(scopes=[]), CallbackConfigurationError, "no scope given"),
        (dict(scopes="mlp"), InvalidScopeError, "must be a list"),
        (dict(scopes=[{"patterns": [".*"], "sparsity": 1.5}]), InvalidTargetError, r"scopes\[0\].*\[0, 1\]"),
        (dict(scopes=[{"patterns": ["("], "sparsity": 0.5}]), InvalidScopeError, r"scopes\[0\].*not a valid regular expression"),
        (dict(scopes=[{"patterns": [".*"]}]), ScopeSpecError, r"scopes\[0\] needs a 'sparsity'"),
        (dict(scopes=[{"pattern": [".*"], "sparsity": 0.5}]), ScopeSpecError, r"unknown key\(s\) \['pattern'\]"),
        (dict(scopes=[{"sparsity": 0.5}]), InvalidScopeError, "selects nothing"),
        (dict(scopes=MLP + MLP), InvalidScopeError, r"scopes\[1\] repeats"),
        (dict(target_sparsity_by_scope=[TargetScope(patterns=".*")]), InvalidScopeError, "must be a mapping"),
        (dict(target_sparsity_by_scope={".*": 0.5}), InvalidScopeError, "TargetScope objects"),
        (dict(scopes=MLP, ignored_scope={"name": ["x"]}), ScopeSpecError, "ignored_scope has unknown"),
        (dict(scopes=MLP, ignored_scope=TargetScope(names="x")), InvalidScopeError, "ignored_scope must be"),
        (dict(scopes=MLP, submodule="model..x"), CallbackConfigurationError, "dotted attribute path"),
        (dict(scopes=MLP, calibration_source="val loader"), CallbackConfigurationError, "calibration_source must be"),
        (dict(scopes=MLP, calibration_source="val", calibration_dataloader=[1]), CallbackConfigurationError, "not both"),
        (dict(scopes=MLP, calibration_dataloader=3), CallbackConfigurationError, "must be iterable"),
        (dict(scopes=MLP, calibration_source="train"), CallbackConfigurationError, "needs calibration.num_batches"),
        (dict(scopes=MLP, calibration={"num_batches": 0}), InvalidOptionError, "num_batches must be a positive"),
        (dict(scopes=MLP, calibration={"num_batches": True}), InvalidOptionError, "num_batches"),
        (dict(scopes=MLP, calibration={"num_batch": 2}), InvalidOptionError, r"unknown CalibrationConfig field\(s\) \['num_batch'\]"),
        (dict(scopes=MLP, calibration=3), InvalidOptionError, "calibration must be a CalibrationConfig"),
        (dict(scopes=MLP, input_key=0, calibration={"transform_fn": lambda b: b}), CallbackConfigurationError, "input_key or calibration.transform_fn"),
        (dict(scopes=MLP, input_key=1.5), CallbackConfigurationError, "input_key must be"),
        (dict(scopes=MLP, recalibrate_every_n_epochs=0), CallbackConfigurationError, "recalibrate_every_n_epochs"),
        (dict(scopes=MLP, recalibrate_every_n_steps=-2), CallbackConfigurationError, "recalibrate_every_n_steps"),
        (dict(scopes=MLP, schedule="linear"), CallbackConfigurationError, "schedule must be 'constant' or a SparsitySchedule"),
        (dict(scopes=MLP, gradient_mode="exact"), CallbackConfigurationError, "gradient_mode must be one of 'masked', 'ste'"),
        (dict(scopes=MLP, on_train_end="delete"), CallbackConfigurationError, "on_train_end must be one of"),
        (dict(scopes=MLP, track=["training"]), CallbackConfigurationError, "track must be"),
        (dict(scopes=MLP, log_prefix="a/"), CallbackConfigurationError, "log_prefix"),
        (dict(scopes=MLP, verbose="yes"), CallbackConfigurationError, "verbose must be True or False"),
        (dict(scopes=MLP, calibration="blockwise"), InvalidOptionError, "method must be one of 'auto', 'lockstep', 'sequential', got 'blockwise'"),
        (dict(scopes=MLP, calibration={"offload": "ssd"}), InvalidOptionError, "offload must be one of None, 'cpu', 'disk', got 'ssd'"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        ActivationSparsityCallback(**kwargs)
    assert issubclass(error, ValueError)
    assert info.value.argument.split(".")[0].split("[")[0] in {*kwargs, "scopes", "calibration"}  # the argument it is about (for the CLI)


def test_schedule_ramp_errors_name_the_ramp_argument():
    for kwargs, match in [(dict(), "exactly one of epochs and steps"), (dict(epochs=2, steps=3), "exactly one"),
                          (dict(epochs=2, every_n_steps=3), "every_n_steps only"), (dict(epochs=0), "epochs must be a positive")]:
        with pytest.raises(CallbackConfigurationError, match=match):
            LinearRamp(**kwargs)
    with pytest.raises(InvalidTargetError, match="initial_sparsity"):
        LinearRamp(initial_sparsity=-0.1, epochs=2)


def test_yaml_scopes_equal_the_functional_mapping():
    a = ActivationSparsityCallback(scopes=[ScopeSpec(patterns=[".*up_proj"], sparsity=0.3), {"names": ["x.y"], "sparsity": 0.5}])
    b = ActivationSparsityCallback({TargetScope(patterns=".*up_proj"): 0.3, TargetScope(names=["x.y"]): 0.5})
    assert a.targets == b.targets
    c = ActivationSparsityCallback(scopes=MLP, ignored_scope={"names": ["model.layers.0.mlp.up_proj"]})
    assert c.ignored_scope == IgnoredScope(names=["model.layers.0.mlp.up_proj"])


def test_schedule_targets():
    cb = ActivationSparsityCallback(scopes=MLP, schedule=LinearRamp(initial_sparsity=0.1, epochs=4))
    assert [cb.scheduled_targets(epoch=e)[TargetScope(patterns=[r".*mlp\.(gate|up|down)_proj"])] for e in range(6)] == pytest.approx(
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.5]
    )
    steps = ActivationSparsityCallback(scopes=MLP, schedule=LinearRamp(steps=10, every_n_steps=5))
    values = [next(iter(steps.scheduled_targets(step=s).values())) for s in (0, 4, 5, 9, 10, 50)]
    assert values == pytest.approx([0.0, 0.0, 0.25, 0.25, 0.5, 0.5])
    assert next(iter(steps.scheduled_targets(final=True).values())) == 0.5


# ---------------------------------------------------------------------------------------------------------
# lifecycle


class _Probe(pl.Callback):
    """Records what the model looks like when Lightning calls the hooks after the sparsity callback's."""

    def __init__(self) -> None:
        self.seen: dict[str, object] = {}
        self.thresholds_at_step: list[dict[str, float]] = []

    def setup(self, trainer, pl_module, stage):
        layers = list(sparsified_layers(pl_module))
        self.seen["setup"] = (len(layers), {sparsifier_state(m).mode for _, m in layers}, trainer.strategy.model is None or trainer.strategy.model is pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.thresholds_at_step.append(_thresholds(pl_module))


def test_training_free_validate_calibrates_then_validates():
    lm, data = TinyLM(), TinyData()
    dense = _dense_state(lm)
    calls = []

    def spy(module, x, out):
        if module._actsparse.session is not None:  # inside a calibration pass
            calls.append((torch.is_grad_enabled(), lm.model.training))

    layer = lm.model.layers[0].mlp.up_proj
    probe = _Probe()
    cb = _callback(scopes=SEED)
    trainer = _trainer(cb, probe)
    lm.train()
    original = {id(p) for p in lm.parameters()}
    cb.setup(trainer, lm, "validate")  # install now to attach the spy; setup again is a no-op
    layer._actsparse.observers["spy"] = spy
    results = trainer.validate(lm, datamodule=data, verbose=False)[0]
    # installed in setup, pass-through until calibrated, same Parameter objects
    assert probe.seen["setup"] == (9, {SparsifierMode.PASSTHROUGH}, True)
    assert {id(p) for p in lm.parameters()} == original
    # calibrated in eval mode without gradients, on the datamodule's calibration_dataloader (auto source)
    assert calls and set(calls) == {(False, False)}
    assert cb.history[0]["source"] == "TinyData.calibration_dataloader()"
    assert _thresholds(lm) == _reference_thresholds(lm, data.calibration_dataloader(), SEED, dense)
    # achieved sparsity logged next to the model's own metrics, equal to a direct measurement
    assert {"val/loss", "actsparse/val/sparsity", "actsparse/val/weighted_sparsity", "actsparse/calibration/sparsity"} <= set(results)
    metric = ActivationSparsity.from_model(lm)
    with metric.observe(lm), torch.no_grad():
        for x, _ in data.val_dataloader():
            lm(x)
    expected = metric.compute()
    for key in ("sparsity", "weighted_sparsity", "token_sparsity_p95", "model.layers.2.mlp.down_proj/sparsity"):
        assert results[f"actsparse/val/{key}"] == pytest.approx(float(expected[key]), abs=1e-6)
    assert results["actsparse/val/model.layers.0.mlp.down_proj/threshold"] == pytest.approx(_thresholds(lm)["model.layers.0.mlp.down_proj"])
    # a second validate finds the model calibrated: no new calibration
    trainer.validate(lm, datamodule=data, verbose=False)
    assert len(cb.history) == 1


@pytest.mark.parametrize(
    "options, batches",
    [
        (dict(calibration_source="train", calibration={"num_batches": 2, "progress": False}), lambda d: list(d.train_dataloader())[:2]),
        (dict(calibration_source="val", calibration={"num_batches": 1, "progress": False}), lambda d: list(d.val_dataloader())[:1]),
        (dict(calibration_source="calibration_dataloader", calibration={"num_batches": 2, "progress": False}), lambda d: list(d.calibration_dataloader())[:2]),
        (dict(calibration_dataloader=[b for b in DataLoader(_windows(6, 9), batch_size=2)]), lambda d: list(DataLoader(_windows(6, 9), batch_size=2))),
    ],
)
def test_calibration_sources(options, batches):
    lm, data = TinyLM(), TinyData()
    dense = _dense_state(lm)
    cb = _callback(**options)
    _trainer(cb).validate(lm, datamodule=data, verbose=False)
    assert _thresholds(lm) == _reference_thresholds(lm, batches(data), MLP, dense)


@pytest.mark.parametrize("calibration, offload", [("sequential", "disk"), ("lockstep", None)])
def test_calibration_method_reaches_the_functional_api(calibration, offload, monkeypatch):
    """``calibration``/``offload`` of the callback choose the method (seen by the dispatcher), with the same
    thresholds as the functional API's default on the same batches."""
    import pl_actsparse.calibrate as calibrate

    used = []
    real = calibrate.METHODS["sequential"]
    monkeypatch.setitem(calibrate.METHODS, "sequential", lambda *a, **k: used.append(a[3].offload) or real(*a, **k))
    lm, data = TinyLM(), TinyData()
    dense = _dense_state(lm)
    cb = _callback(calibration={"method": calibration, "offload": offload, "progress": False})
    assert (cb.calibration_data.config.method, cb.calibration_data.config.offload) == (calibration, offload)
    _trainer(cb).validate(lm, datamodule=data, verbose=False)
    assert used == ([offload] if calibration == "sequential" else [])
    assert _thresholds(lm) == _reference_thresholds(lm, data.calibration_dataloader(), MLP, dense)


def test_auto_source_falls_back_to_first_training_batches_and_transform_fn():
    class NoCalibration(TinyData):
        calibration_dataloader = None  # type: ignore[assignment]

    lm, data = TinyLM(), NoCalibration()
    dense = _dense_state(lm)
    with pytest.raises(CallbackConfigurationError, match="no calibration data"):
        _trainer(_callback()).validate(lm, datamodule=data, verbose=False)
    assert not list(sparsified_layers(lm)) and lm.state_dict().keys() == dense.keys()  # the failed run gives its uncalibrated layers back
    assert all(torch.equal(lm.state_dict()[k], v) for k, v in dense.items())
    lm = TinyLM()
    cb = _callback(input_key=None, calibration=CalibrationConfig(transform_fn=lambda batch: batch[0], num_batches=3, progress=False))
    _trainer(cb).validate(lm, datamodule=data, verbose=False)
    assert cb.history[0]["source"] == "the train dataloader"
    assert _thresholds(lm) == _reference_thresholds(lm, list(data.train_dataloader())[:3], MLP, dense)


@pytest.mark.parametrize("source, num_batches", [("auto", 3), ("train", 2), ("val", 1)])
def test_dataloaders_passed_straight_to_fit_calibrate(source, num_batches):
    """``trainer.fit(module, train_loader, val_loader)``, the commonest call: the loaders are set up by Lightning's
    fit loop after ``on_fit_start``; the callback sets them up itself and calibrates on their first batches."""
    data = TinyData()
    train, val = data.train_dataloader(), data.val_dataloader()
    lm = TinyLM()
    dense = _dense_state(lm)
    cb = _callback(calibration_source=source, calibration={"num_batches": num_batches, "progress": False})
    _trainer(cb, max_steps=1).fit(lm, train, val)
    assert cb.history[0]["source"] == f"the {'val' if source == 'val' else 'train'} dataloader"
    first = list(val if source == "val" else train)[:num_batches]
    assert cb.history[0]["thresholds"] == _reference_thresholds(lm, first, MLP, dense)


def test_calibration_data_resolves_without_a_trainer():
    lm, data = TinyLM(), TinyData()
    explicit = [torch.zeros(2, 9, dtype=torch.long)]
    assert _callback(calibration_dataloader=explicit).calibration_data.resolve(data, lm) == (explicit, "calibration_dataloader")
    loader, where = _callback().calibration_data.resolve(data, lm)  # auto: the datamodule method
    assert where == "TinyData.calibration_dataloader()" and len(list(loader)) == len(list(data.calibration_dataloader()))
    loader, where = _callback(calibration_source="val", calibration={"num_batches": 1}).calibration_data.resolve(data, lm)
    assert where == "the val dataloader" and [x.tolist() for x, _ in loader] == [x.tolist() for x, _ in data.val_dataloader()]
    with pytest.raises(CallbackConfigurationError, match="neither TinyData nor TinyLM has a method 'holdout_dataloader', and"):
        _callback(calibration_source="holdout_dataloader").calibration_data.resolve(data, lm)
    with pytest.raises(CallbackConfigurationError, match="method 'calibration_datalodaer' \\(did you mean 'calibration_dataloader'\\?\\)"):
        _callback(calibration_source="calibration_datalodaer").calibration_data.resolve(data, lm)
    with pytest.raises(CallbackConfigurationError, match="TinyLM has no method 'test_dataloader'"):  # Lightning's default hook raises
        _callback(calibration_source="test", calibration={"num_batches": 1}).calibration_data.resolve(None, lm)


def test_unknown_source_method_and_submodule():
    with pytest.raises(CallbackConfigurationError, match="has a method 'holdout_dataloader'"):
        _trainer(_callback(calibration_source="holdout_dataloader")).validate(TinyLM(), datamodule=TinyData(), verbose=False)
    with pytest.raises(CallbackConfigurationError, match="has no such submodule"):
        _trainer(_callback(submodule="encoder")).validate(TinyLM(), datamodule=TinyData(), verbose=False)


def test_submodule_scopes_are_relative_and_ignored_scope_applies():
    lm = TinyLM()
    cb = _callback(
        scopes=[{"names": ["layers.1.mlp.down_proj", "layers.2.mlp.down_proj"], "sparsity": 0.5}],
        submodule="model",
        ignored_scope={"names": ["layers.2.mlp.down_proj"]},
    )
    results = _trainer(cb).validate(lm, datamodule=TinyData(), verbose=False)[0]
    assert list(_thresholds(lm.model)) == ["layers.1.mlp.down_proj"]
    assert "actsparse/val/layers.1.mlp.down_proj/sparsity" in results


def test_test_and_predict_calibrate_when_needed():
    lm, data = TinyLM(), TinyData()
    cb = _callback()
    results = _trainer(cb).test(lm, datamodule=data, verbose=False)[0]
    assert len(cb.history) == 1 and "actsparse/test/sparsity" in results and "test/loss" in results
    lm2, cb2 = TinyLM(), _callback()
    out = _trainer(cb2).predict(lm2, datamodule=data)
    assert len(cb2.history) == 1 and cb2.history[0]["reason"] == "start of predict" and len(out) == 2


def test_logging_options():
    lm = TinyLM()
    cb = _callback(log_per_layer=False, track=["val"], log_prefix="sparse")
    trainer = _trainer(cb, max_epochs=1, limit_train_batches=2)
    trainer.fit(lm, datamodule=TinyData())
    keys = set(trainer.callback_metrics)
    assert {"sparse/val/sparsity", "sparse/val/token_sparsity_p5", "sparse/calibration/sparsity"} <= keys
    assert not any(k.startswith("sparse/train/") for k in keys)
    assert not any(k.count("/") > 2 for k in keys if k.startswith("sparse/"))  # no per-layer keys


# ---------------------------------------------------------------------------------------------------------
# fine-tuning


def test_recalibration_every_epoch_fixed_thresholds_between(tmp_path):
    lm, data, probe = TinyLM(lr=0.5), TinyData(), _Probe()
    logger = CSVLogger(tmp_path)
    cb = _callback(recalibrate_every_n_epochs=1)
    trainer = _trainer(cb, probe, max_epochs=3, logger=logger, log_every_n_steps=1)
    trainer.fit(lm, datamodule=data)
    assert [(h["reason"], h["step"]) for h in cb.history] == [
        ("start of fit", 0),
        ("every 1 epoch(s)", 4),
        ("every 1 epoch(s)", 8),
        ("every 1 epoch(s)", 12),
    ]
    # thresholds are fixed between recalibrations (only the epoch boundaries change them)
    steps = probe.thresholds_at_step
    assert len(steps) == 12
    for epoch in range(3):
        assert all(steps[4 * epoch + i] == steps[4 * epoch] for i in range(4))
    assert steps[4] != steps[0] and steps[8] != steps[4]
    # the weights drift, so the old thresholds miss the target; recalibration brings it back exactly
    for h in cb.history[1:]:
        assert abs(h["sparsity_before"] - 0.5) > 1e-4
        assert h["sparsity_after"] == pytest.approx(0.5, abs=2e-3)
        assert set(h["sparsity_before_by_layer"]) == set(h["thresholds"])
    assert cb.history[-1]["thresholds"] == _thresholds(lm)
    # the epoch-end recalibration happens before that epoch's validation: validation measures new thresholds
    rows = _csv_rows(logger)
    val_rows = [r for r in rows if r.get("actsparse/val/sparsity")]
    assert len(val_rows) == 3
    last = val_rows[-1]
    assert float(last["actsparse/val/model.layers.0.mlp.up_proj/threshold"]) == pytest.approx(_thresholds(lm)["model.layers.0.mlp.up_proj"])
    before = [float(r["actsparse/calibration/sparsity_before"]) for r in rows if r.get("actsparse/calibration/sparsity_before")]
    assert before == pytest.approx([h["sparsity_before"] for h in cb.history[1:]], abs=1e-6)
    assert any(r.get("actsparse/train/sparsity") for r in rows)  # tracked on logging steps


def test_recalibration_every_n_steps_without_validation():
    lm, probe = TinyLM(lr=0.5), _Probe()
    cb = _callback(recalibrate_every_n_steps=3, track=False)
    _trainer(cb, probe, max_steps=7, limit_val_batches=0).fit(lm, datamodule=TinyData())
    assert [h["step"] for h in cb.history] == [0, 3, 6]
    steps = probe.thresholds_at_step
    changes = [i for i in range(1, len(steps)) if steps[i] != steps[i - 1]]
    assert changes == [3, 6]


def test_linear_ramp_over_epochs_retargets_and_recalibrates():
    lm = TinyLM()
    cb = _callback(schedule=LinearRamp(initial_sparsity=0.1, epochs=2), track=False)
    _trainer(cb, max_epochs=3, limit_val_batches=0, limit_train_batches=2).fit(lm, datamodule=TinyData())
    assert [(h["epoch"], round(h["target"], 6)) for h in cb.history] == [(0, 0.1), (1, 0.3), (2, 0.5)]
    assert {round(sparsifier_state(m).target, 6) for _, m in sparsified_layers(lm)} == {0.5}
    assert all(h["sparsity_after"] == pytest.approx(h["target"], abs=2e-3) for h in cb.history)


def test_linear_ramp_over_steps():
    lm = TinyLM()
    cb = _callback(schedule=LinearRamp(steps=4, every_n_steps=2), track=False)
    _trainer(cb, max_steps=6, limit_val_batches=0).fit(lm, datamodule=TinyData())
    assert [(h["step"], round(h["target"], 6)) for h in cb.history] == [(0, 0.0), (2, 0.25), (4, 0.5)]


@pytest.mark.parametrize("mode", ["masked", "ste"])
def test_gradient_mode(mode):
    lm = TinyLM()
    cb = _callback(gradient_mode=mode)
    trainer = _trainer(cb, max_steps=1, limit_val_batches=0)
    trainer.fit(lm, datamodule=TinyData())
    layers = dict(sparsified_layers(lm))
    assert {sparsifier_state(m).gradient_mode.value for m in layers.values()} == {mode}
    layer = layers["model.layers.0.mlp.down_proj"]
    x = torch.randn(5, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    zeroed = x.detach().abs() <= layer.activation_threshold
    assert bool(zeroed.any())
    full = layer.weight.detach().sum(0).expand_as(x)
    if mode == "masked":  # the exact derivative: nothing flows through zeroed inputs
        assert torch.equal(x.grad[zeroed], torch.zeros(int(zeroed.sum())))
    else:  # straight-through: as if nothing was zeroed
        torch.testing.assert_close(x.grad, full)


def test_on_train_end_keep_make_permanent_remove():
    data = TinyData()
    kept, cb = TinyLM(lr=0.5), _callback()
    _trainer(cb, max_steps=3, limit_val_batches=0).fit(kept, datamodule=data)
    assert cb.finished is None and len(cb.history) == 1 and _thresholds(kept) == cb.history[0]["thresholds"]

    permanent, cb = TinyLM(lr=0.5), _callback(on_train_end="make_permanent")
    trainer = _trainer(cb, max_steps=3, limit_val_batches=0)
    trainer.fit(permanent, datamodule=data)
    assert cb.finished == "make_permanent" and cb.history[-1]["reason"].startswith("end of training")
    # recalibrated on the final weights
    assert _thresholds(permanent) == _reference_thresholds(permanent, data.calibration_dataloader())
    frozen = _thresholds(permanent)
    results = _trainer(cb).validate(permanent, datamodule=data, verbose=False)[0]
    assert _thresholds(permanent) == frozen and len(cb.history) == 2
    assert "actsparse/val/sparsity" in results  # still tracked

    removed, cb = TinyLM(lr=0.5), _callback(on_train_end="remove")
    trainer = _trainer(cb, max_steps=3, limit_val_batches=0)
    trainer.fit(removed, datamodule=data)
    assert not list(sparsified_layers(removed))
    assert type(removed.model.layers[0].mlp.up_proj) is nn.Linear
    results = _trainer(cb).validate(removed, datamodule=data, verbose=False)[0]
    assert "val/loss" in results and not any(k.startswith("actsparse/") for k in results)
    assert not list(sparsified_layers(removed))


def test_no_deep_copy_of_the_model(monkeypatch):
    def refuse(self, memo):
        raise AssertionError(f"deepcopy of {type(self).__name__}")

    monkeypatch.setattr(nn.Module, "__deepcopy__", refuse, raising=False)
    lm = TinyLM()
    with pytest.raises(AssertionError):
        copy.deepcopy(lm.model)
    cb = _callback(recalibrate_every_n_epochs=1, on_train_end="make_permanent")
    _trainer(cb, max_epochs=2, limit_train_batches=2).fit(lm, datamodule=TinyData())
    assert len(cb.history) == 3


# ---------------------------------------------------------------------------------------------------------
# checkpoints


def test_resume_continues_with_identical_thresholds_and_no_recalibration(tmp_path):
    data = TinyData()

    def run(max_epochs, ckpt_path=None, checkpoint=None):
        torch.manual_seed(0)
        lm, cb = TinyLM(lr=0.5), _callback(recalibrate_every_n_epochs=1)
        callbacks = [cb] + ([checkpoint] if checkpoint else [])
        trainer = _trainer(*callbacks, max_epochs=max_epochs, enable_checkpointing=checkpoint is not None)
        trainer.fit(lm, datamodule=data, ckpt_path=ckpt_path)
        return lm, cb

    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    full, full_cb = run(2, checkpoint=checkpoint)
    ckpt = tmp_path / "epoch=0.ckpt"
    state = torch.load(ckpt, weights_only=False)
    saved = {k: float(v) for k, v in state["state_dict"].items() if k.endswith("activation_threshold")}
    assert saved == {f"{n}.activation_threshold": v for n, v in full_cb.history[1]["thresholds"].items()}
    from pl_actsparse.core.layer import decode_sparsifier_state

    states = [decode_sparsifier_state(v) for k, v in state["state_dict"].items() if k.endswith("_extra_state")]
    assert states and all(s["calibrated"] for s in states)

    resumed, resumed_cb = run(2, ckpt_path=ckpt)
    # the callback state came back; resuming added exactly the epoch-1 recalibration, no start-of-fit one
    assert [h["reason"] for h in resumed_cb.history] == [h["reason"] for h in full_cb.history]
    assert resumed_cb.history[:2] == full_cb.history[:2]
    assert _thresholds(resumed) == _thresholds(full)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_sparsified_checkpoint_loads_with_and_without_lightning(tmp_path):
    data = TinyData()
    lm, cb = TinyLM(lr=0.5), _callback()
    trainer = _trainer(cb, max_steps=2, limit_val_batches=0)
    trainer.fit(lm, datamodule=data)
    path = tmp_path / "sparse.ckpt"
    trainer.save_checkpoint(path)
    expected = _thresholds(lm)
    x = data.val_set.tensors[0][:2]
    with torch.no_grad():
        want = lm.eval()(x)

    # into a fresh model, with the callback present: thresholds from the checkpoint, no calibration
    # (the callback's history comes back with the checkpoint and gets no new entry)
    fresh, fresh_cb = TinyLM(seed=5), _callback()
    results = _trainer(fresh_cb).validate(fresh, datamodule=data, ckpt_path=path, verbose=False)[0]
    assert fresh_cb.history == cb.history and len(cb.history) == 1 and _thresholds(fresh) == expected
    assert "actsparse/val/sparsity" in results

    # without Lightning: the documented loader into a plain model
    plain = tiny_llama(seed=7)
    load_activation_sparsity(plain, path, prefix="model.")
    assert _thresholds(plain) == {k[len("model."):]: v for k, v in expected.items()}
    with torch.no_grad():
        torch.testing.assert_close(plain(x), want, rtol=0, atol=0)

    # LightningModule.load_from_checkpoint (the module installs sparsifiers in on_load_checkpoint)
    loaded = TinyLM.load_from_checkpoint(path)
    assert _thresholds(loaded) == expected
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), want, rtol=0, atol=0)


def test_dense_checkpoint_into_callback_run_calibrates(tmp_path):
    data = TinyData()
    dense = TinyLM(lr=0.5)
    trainer = _trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(dense, datamodule=data)
    path = tmp_path / "dense.ckpt"
    trainer.save_checkpoint(path)
    lm, cb = TinyLM(), _callback()
    _trainer(cb).validate(lm, datamodule=data, ckpt_path=path, verbose=False)
    assert len(cb.history) == 1  # dense weights loaded strictly, thresholds calibrated on them
    assert _thresholds(lm) == _reference_thresholds(lm, data.calibration_dataloader(), MLP, _dense_state(dense))
    assert math.isfinite(cb.history[0]["sparsity_after"])


@pytest.mark.parametrize("enable_progress_bar", [False, True])
def test_calibration_bar_goes_to_stderr_and_follows_the_trainer(enable_progress_bar, capsys):
    """The functional bar is on stderr, stdout untouched; the callback draws it only when the trainer shows a bar."""
    from tiny_models import tiny_hf_llama
    from pl_actsparse import sparsify_activations

    sparsify_activations(tiny_hf_llama(), [torch.randint(0, 64, (2, 16))], {TargetScope(patterns=[".*_proj"]): 0.5})
    out, err = capsys.readouterr()
    assert out == "" and "calibrating activation thresholds" in err
    trainer = _trainer(_callback(calibration={"progress": True, "num_batches": 2}, calibration_source="calibration_dataloader"),
                       enable_progress_bar=enable_progress_bar)
    trainer.validate(TinyLM(), datamodule=TinyData())
    out, err = capsys.readouterr()
    assert "calibrating activation thresholds" not in out
    assert ("calibrating activation thresholds" in err) == enable_progress_bar


def test_input_key_mistakes_are_configuration_errors_naming_input_key():
    """A key the batch lacks names input_key and the batch's keys; a dict batch whose keys forward does not take
    (labels) names input_key as the fix, instead of a KeyError / TypeError deep inside the model."""
    from pl_actsparse.errors import CallbackConfigurationError

    batches = [{"input_ids": torch.randint(0, 64, (2, 16)), "labels": torch.randint(0, 64, (2, 16))} for _ in range(2)]
    cases = [
        (dict(input_key="input_idz"), r"input_key='input_idz' is not in the calibration batch, a dict with \['input_ids', 'labels'\]"),
        (dict(input_key=None), r"a dict with keys \['input_ids', 'labels'\], passed as keyword arguments to TinyLM.forward\(x"
                               r".*set input_key \(e.g. input_key='input_ids'"),
        (dict(input_key=3), r"input_key=3 is not in the calibration batch, a dict"),
    ]
    for kwargs, match in cases:
        with pytest.raises(CallbackConfigurationError, match=match) as err:
            _trainer(_callback(calibration_dataloader=batches, **kwargs)).validate(TinyLM(), datamodule=TinyData())
        assert getattr(err.value, "argument", "input_key") == "input_key"
    thresholds = []
    for key in ("input_ids", None):  # right: the key, or forward taking the dict's keys
        lm = TinyLM()
        if key is None:
            lm.forward = lambda input_ids, labels=None: lm.model(input_ids)
        _trainer(_callback(calibration_dataloader=batches, input_key=key)).validate(lm, datamodule=TinyData())
        thresholds.append(_thresholds(lm.model))
    assert thresholds[0] == thresholds[1]
