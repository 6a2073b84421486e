"""The callback next to Lightning callbacks that try out or copy the model (issue 19, faults 3 and 7): tuners
(``LearningRateFinder``, ``BatchSizeFinder``, also through ``Tuner``) search the calibrated sparse model, and
``EMAWeightAveraging`` listed before or after the callback validates its averaged weights with thresholds
calibrated for them. Real Lightning, tiny models, and the real stories260K (pl_actsparse.demos)."""

from __future__ import annotations

import pytest
import torch
import lightning.pytorch as pl
from lightning.pytorch.callbacks import BatchSizeFinder, EMAWeightAveraging, LearningRateFinder
from lightning.pytorch.tuner import Tuner

from pl_actsparse.api import install_sparsifiers_from_state_dict
from pl_actsparse.core.layer import SparsifierMode, sparsified_layers, sparsifier_state
from pl_actsparse.lightning.callback import ActivationSparsityCallback
from pl_actsparse.measure.metric import ActivationSparsity
from test_callback import TinyData, TinyLM, _callback, _reference_thresholds, _thresholds, _trainer
from test_callback_stacks import _achieved


def _off_target(model, batches) -> dict[str, float]:
    """Per layer: achieved sparsity on ``batches`` minus the layer's target."""
    layers = dict(sparsified_layers(model))
    return {n: v - sparsifier_state(layers[n]).target for n, v in _achieved(model, batches).items()}


# ---------------------------------------------------------------------------------------------------------
# fault 3: tuners


class Spy(TinyLM):
    """Records, for every training or validation step: which callbacks ran it (a tuner's search replaces
    ``trainer.callbacks``), the batch size, the layers' modes and thresholds, and the achieved sparsity."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.steps: list[dict] = []

    def _record(self, step, batch, batch_idx):
        metric = ActivationSparsity.from_model(self.model).to(self.device)
        with metric.observe(self.model):
            out = step(batch, batch_idx)
        layers = sparsified_layers(self.model)
        self.steps.append({
            "callbacks": [type(c).__name__ for c in self.trainer.callbacks],
            "batch": len(batch[0]),
            "modes": {sparsifier_state(m).mode for _, m in layers},
            "thresholds": _thresholds(self),
            "sparsity": float(metric.compute()["sparsity"]),
        })
        return out

    def training_step(self, batch, batch_idx):
        return self._record(super().training_step, batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        return self._record(super().validation_step, batch, batch_idx)


@pytest.mark.parametrize("how", ["lr_finder", "tuner_lr_find", "batch_size_finder", "batch_size_finder_validate"])
def test_every_tuner_step_runs_the_calibrated_sparse_model(how):
    data, lm = TinyData(train=96), Spy(lr=0.05)
    cb = _callback(track=False)
    if how in ("lr_finder", "tuner_lr_find"):
        tuner, ours = LearningRateFinder(num_training_steps=20, early_stop_threshold=None), ["_LRCallback"]
    else:
        tuner, ours = BatchSizeFinder(init_val=2, max_trials=2, steps_per_trial=1), []
    if how == "tuner_lr_find":
        trainer = _trainer(cb, max_epochs=1, limit_val_batches=0)
        tuner = Tuner(trainer).lr_find(lm, datamodule=data, num_training=20, early_stop_threshold=None)
    else:
        trainer = _trainer(tuner, cb, max_epochs=1, limit_val_batches=2)
        trainer.validate(lm, datamodule=data, verbose=False) if how.endswith("validate") else trainer.fit(lm, datamodule=data)
    calibrated = cb.history[0]["thresholds"]
    searched = [s for s in lm.steps if s["callbacks"] == ours]  # the tuner's own steps (its callbacks only)
    assert len(searched) == (20 if "lr" in how else 2), [s["callbacks"] for s in lm.steps]
    for s in searched:  # sparsified, with the thresholds calibrated before the search, at the target
        assert s["modes"] == {SparsifierMode.SPARSIFYING} and s["thresholds"] == calibrated, s
        assert s["sparsity"] == pytest.approx(0.5, abs=0.02), s
    name = "LearningRateFinder" if "lr" in how else "BatchSizeFinder"
    assert [h["reason"] for h in cb.history] == [f"before {name}"]  # once, then training/validation found it calibrated
    assert calibrated == _reference_thresholds(TinyLM(), data.calibration_dataloader())  # on the untouched weights
    assert all(s["thresholds"] == calibrated and s["modes"] == {SparsifierMode.SPARSIFYING} for s in lm.steps)
    if how == "lr_finder":  # training runs with the rate found for the sparse model
        assert lm.lr == tuner.optimal_lr.suggestion() and len([s for s in lm.steps if s["callbacks"] != ours]) == 24 + 2  # training, validation
    if how.startswith("batch"):
        assert {s["batch"] for s in searched} <= {2, 4} and "scale_batch_size" not in tuner.__dict__  # wrapper removed
    else:
        assert not any(n in vars(c) for c in [tuner, *trainer.callbacks] for n in ("lr_find",))


# ---------------------------------------------------------------------------------------------------------
# fault 7: EMA weight averaging, listed before or after the callback


class ValidatedWeights(pl.Callback):
    """Listed last: snapshots weights and thresholds as validation sees them (after EMA's swap and the
    callback's recalibration), and what EMA's copy holds once validation swapped back."""

    def __init__(self, ema: EMAWeightAveraging) -> None:
        self.ema, self.validated, self.copy_after = ema, [], []

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validated.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.copy_after.append({k: v.detach().clone() for k, v in self.ema._average_model.module.state_dict().items()})


def _validated_deviation(states, data, make) -> list[float]:
    """Per validation: the largest per-layer |achieved - target| of the validated state on the calibration data."""
    out = []
    for state in states:
        model = make()
        install_sparsifiers_from_state_dict(model, state)
        model.load_state_dict(state)
        out.append(max(abs(v) for v in _off_target(model.eval(), data.calibration_dataloader()).values()))
    return out


@pytest.mark.parametrize("ema_first", [True, False])
def test_ema_validation_thresholds_match_the_averaged_weights_in_either_order(ema_first):
    data, lm = TinyData(), TinyLM(lr=0.5)
    cb = _callback(recalibrate_every_n_epochs=1, track=False)
    ema = EMAWeightAveraging(decay=0.9)
    probe = ValidatedWeights(ema)
    trainer = _trainer(*([ema, cb] if ema_first else [cb, ema]), probe, max_epochs=3, limit_val_batches=2)
    trainer.fit(lm, datamodule=data)
    assert trainer.callbacks.index(cb) == trainer.callbacks.index(ema) + 1
    # EMA's copy has the sparsifiers (made again once they existed): parameters and buffers pair one to one
    assert list(ema._average_model.module.state_dict()) == list(lm.state_dict())
    assert len(probe.validated) == 3
    for validated, copy in zip(probe.validated, probe.copy_after):
        tensors = [k for k in copy if not k.endswith("_extra_state")]  # parameters and buffers (thresholds included)
        assert all(torch.equal(validated[k], copy[k]) for k in tensors)  # validation ran EMA's averaged weights
    assert _validated_deviation(probe.validated, data, TinyLM) == pytest.approx([0, 0, 0], abs=0.002)
    reasons = [h["reason"] for h in cb.history]
    assert reasons == ["start of fit"] + ["every 1 epoch(s)", "validation with weights swapped in by another callback"] * 3
    # EMA copied its average in at the end: the last calibration was on exactly those weights, so none more
    assert _validated_deviation([lm.state_dict()], data, TinyLM) == pytest.approx([0], abs=0.002)


def test_ema_first_on_stories260k_validates_with_thresholds_for_the_averaged_weights():
    from pl_actsparse.demos.lightning_models import TinyStoriesDataModule, TinyStoriesLM
    from pl_actsparse.demos.paths import resolve_data_dir

    if not (resolve_data_dir() / "stories260K.bin").is_file():
        pytest.skip("stories260K.bin not in the data directory")
    torch.manual_seed(0)
    data = TinyStoriesDataModule(seq_len=32, batch_size=8, max_train_windows=32, max_eval_windows=8, max_calibration_windows=8)
    lm = TinyStoriesLM(learning_rate=5e-3, log_dense_perplexity=False)
    scopes = [{"patterns": [".*up_proj", ".*gate_proj"], "sparsity": 0.3}, {"patterns": [".*down_proj"], "sparsity": 0.5}]
    cb = ActivationSparsityCallback(scopes=scopes, input_key=0, calibration={"progress": False}, verbose=False, recalibrate_every_n_epochs=1, track=False)
    ema = EMAWeightAveraging(decay=0.9)
    probe = ValidatedWeights(ema)
    _trainer(ema, cb, probe, max_epochs=2, limit_val_batches=1).fit(lm, datamodule=data)
    # the model's rope buffers come before the thresholds: the copy holds both, in the model's order
    assert list(ema._average_model.module.state_dict()) == list(lm.state_dict())
    data.setup("fit")
    deviation = _validated_deviation(probe.validated, data, lambda: TinyStoriesLM(log_dense_perplexity=False))
    assert len(deviation) == 2 and max(deviation) <= 0.002, deviation


def test_ema_first_with_a_model_built_in_configure_model():
    """EMA's setup builds the layers (configure_model) and copies them; the callback plans after configure_model."""
    from test_callback_stacks import HF_MLP, ConfiguredHFLM

    data, lm = TinyData(), ConfiguredHFLM()
    cb = _callback(scopes=HF_MLP, submodule="model", recalibrate_every_n_epochs=1, track=False)
    ema = EMAWeightAveraging(decay=0.9)
    probe = ValidatedWeights(ema)
    _trainer(ema, cb, probe, max_epochs=2, limit_val_batches=2).fit(lm, datamodule=data)
    assert lm.builds == 1 and list(ema._average_model.module.state_dict()) == list(lm.state_dict())
    assert len(probe.validated) == 2
    for state in probe.validated:
        model = ConfiguredHFLM()
        model.configure_model()
        install_sparsifiers_from_state_dict(model, state)
        model.load_state_dict(state)
        metric = ActivationSparsity.from_model(model.model)
        with metric.observe(model.model), torch.no_grad():
            for x, _ in data.calibration_dataloader():
                model(x)
        values = metric.compute()
        assert max(abs(float(values[f"{n}/sparsity"]) - 0.5) for n, _ in sparsified_layers(model.model)) <= 0.002


def test_lr_finder_with_ema_searches_the_calibrated_model_and_validates_the_average():
    data, lm = TinyData(train=96), Spy(lr=0.05)
    cb = _callback(recalibrate_every_n_epochs=1, track=False)
    ema = EMAWeightAveraging(decay=0.9)
    trainer = _trainer(LearningRateFinder(num_training_steps=20, early_stop_threshold=None), ema, cb, max_epochs=1, limit_val_batches=2)
    trainer.fit(lm, datamodule=data)
    assert [type(c).__name__ for c in trainer.callbacks] == ["LearningRateFinder", "EMAWeightAveraging", "ActivationSparsityCallback"]
    searched = [s for s in lm.steps if s["callbacks"] == ["_LRCallback"]]
    assert len(searched) == 20 and all(s["thresholds"] == cb.history[0]["thresholds"] for s in searched)
    assert [h["reason"] for h in cb.history] == ["before LearningRateFinder", "every 1 epoch(s)", "validation with weights swapped in by another callback"]
    assert cb.history[-1]["sparsity_after"] == pytest.approx(0.5, abs=0.002)
