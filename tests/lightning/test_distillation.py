"""Self-distillation from the dense model (pl_actsparse.lightning.distillation) through the callback, on a user's
own LightningModule whose training_step is plain cross-entropy: the returned loss is exactly
(1 - w) * CE + w * T^2 * KL(dense || sparse), padding never counts, the hooks go away after fit, and the recipes
that use it run."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from pl_actsparse import ActivationSparsityCallback
from pl_actsparse.core.layer import activation_sparsity_disabled
from pl_actsparse.errors import ActivationSparsityError, CallbackConfigurationError, InvalidOptionError
from pl_actsparse.lightning.distillation import DistillationConfig, distillation_loss
from tiny_models import tiny_hf_llama, tiny_llama, token_batches

pytestmark = pytest.mark.usefixtures("one_thread")
MLP = [{"patterns": [r".*mlp\.(gate|up|down)_proj"], "sparsity": 0.5}]
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


class UserLM(pl.LightningModule):
    """A user's module: forward returns logits (or an HF ModelOutput), training_step is plain next-token CE."""

    def __init__(self, model: nn.Module, hf: bool = False, dict_output: bool = False, lr: float = 1e-2) -> None:
        super().__init__()
        self.model, self.hf, self.dict_output, self.lr = model, hf, dict_output, lr

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask) if self.hf else self.model(input_ids)

    def training_step(self, batch, batch_idx):
        ids = batch[0] if isinstance(batch, (list, tuple)) else batch
        mask = batch[1] if isinstance(batch, (list, tuple)) else None
        out = self(ids, attention_mask=mask) if mask is not None else self(ids)
        logits = out.logits if hasattr(out, "logits") else out
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        return {"loss": loss, "ce": loss.detach()} if self.dict_output else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Returned(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _fit(module, data, callback, steps=1, **trainer_kwargs):
    seen = Returned()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback, seen], **trainer_kwargs)
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))
    return trainer, seen.losses


def _callback(distillation, **kwargs):
    return ActivationSparsityCallback(scopes=MLP, calibration_dataloader=token_batches(4, batch=2, seq=12), submodule="model",
                                      calibration={"progress": False}, verbose=False, track=False, distillation=distillation, **kwargs)


# -- the configuration and the loss --------------------------------------------------------------------------


def test_config_from_a_weight_or_a_mapping():
    assert DistillationConfig.from_value(0.9) == DistillationConfig(weight=0.9)
    assert DistillationConfig.from_value(None) is None
    config = DistillationConfig.from_value({"weight": 0.8, "temperature": 2, "kl": "reverse", "hidden_states": r".*layers\.\d+"})
    assert (config.weight, config.temperature, config.kl, config.teacher) == (0.8, 2, "reverse", "initial")


@pytest.mark.parametrize(
    "value, message",
    [(1.5, "weight must be a number in [0, 1], got 1.5"), ({"temperature": 0}, "temperature must be a finite number > 0, got 0"),
     ({"teacher": "sparse"}, "teacher must be one of ('initial', 'dense', 'base'), got 'sparse'"), (True, "got bool"),
     ({"wieght": 0.9}, "unknown distillation option(s) ['wieght']"), ("0.9", "got str"),
     ({"kl": "both"}, "kl must be one of ('forward', 'reverse'), got 'both'"),
     ({"hidden_states": "layers.("}, "hidden_states must be None or a regular expression, got 'layers.('"),
     ({"weight_end": 1.5}, "weight_end must be None or a number in [0, 1], got 1.5"), ({"weight_end": "1"}, "weight_end must be None or a number in [0, 1], got '1'")],
)
def test_bad_config_names_the_value(value, message):
    with pytest.raises(InvalidOptionError) as info:
        DistillationConfig.from_value(value)
    assert message in str(info.value)


def test_callback_error_names_the_yaml_key():
    with pytest.raises(InvalidOptionError) as info:
        _callback({"weight": -0.1})
    assert info.value.argument == "distillation"


def test_distillation_loss_is_temperature_scaled_kl_and_masks_padding():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    ref = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="sum") / 10 * 4
    assert float(distillation_loss(s, t, 2.0)) == pytest.approx(float(ref), rel=1e-5)
    assert float(distillation_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    s2 = s.clone()
    s2[0, 3:] += 100 * torch.randn(2, 7)  # padded positions: anything
    assert float(distillation_loss(s2, t, mask=mask)) == pytest.approx(float(distillation_loss(s, t, mask=mask)), rel=1e-6)
    kept = F.kl_div(F.log_softmax(s[mask.bool()], -1), F.log_softmax(t[mask.bool()], -1), log_target=True, reduction="sum") / 8
    assert float(distillation_loss(s, t, mask=mask)) == pytest.approx(float(kept), rel=1e-5)
    assert distillation_loss(s.bfloat16(), t.bfloat16()).dtype == torch.float32
    reverse = F.kl_div(F.log_softmax(t / 2, -1), F.log_softmax(s / 2, -1), log_target=True, reduction="sum") / 10 * 4
    assert float(distillation_loss(s, t, 2.0, kl="reverse")) == pytest.approx(float(reverse), rel=1e-5)


# -- through the callback, on a user's module ------------------------------------------------------------------


@pytest.mark.parametrize("dict_output", [False, True])
def test_returned_loss_is_the_mix_of_the_users_loss_and_the_kl_to_the_dense_model(dict_output):
    data = token_batches(2, batch=2, seq=12)
    module0 = UserLM(tiny_llama(), dict_output=dict_output, lr=0.0)
    trainer, losses0 = _fit(module0, data, _callback({"weight": 0.75, "temperature": 2.0}), steps=1)
    assert "training_step" not in module0.__dict__ and not module0.model._forward_hooks  # restored at teardown
    x = data[0]
    with torch.no_grad():
        student = module0.model(x)
        ce = F.cross_entropy(student[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        with activation_sparsity_disabled(module0.model):
            teacher = module0.model(x)
    kd = distillation_loss(student, teacher, 2.0)
    assert float(kd) > 1e-4  # sparsity changes the outputs
    assert losses0[0] == pytest.approx(float(0.25 * ce + 0.75 * kd), rel=1e-5)
    assert float(trainer.callback_metrics["actsparse/train/distill_loss"]) == pytest.approx(float(kd), rel=1e-5)


def test_hidden_states_add_the_normalised_error_of_the_block_outputs():
    data = token_batches(1, batch=2, seq=12)
    module = UserLM(tiny_llama(), lr=0.0)
    trainer, _ = _fit(module, data, _callback({"weight": 1.0, "hidden_states": r"layers\.\d+"}))
    outputs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, a, out: outputs.append(out)) for b in module.model.layers]
    with torch.no_grad():
        student = module.model(data[0])
        with activation_sparsity_disabled(module.model):
            teacher = module.model(data[0])
    for h in hooks:
        h.remove()
    blocks = len(module.model.layers)
    hidden = sum(float((s - t).square().sum() / t.square().sum()) for s, t in zip(outputs[:blocks], outputs[blocks:])) / blocks
    assert hidden > 1e-4
    expected = float(distillation_loss(student, teacher)) + hidden
    assert float(trainer.callback_metrics["actsparse/train/distill_loss"]) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(CallbackConfigurationError, match=r"hidden_states='blocks.*' matches no module name of TinyLlama"):
        _fit(UserLM(tiny_llama()), data, _callback({"hidden_states": r"blocks\.\d+"}))


def test_weight_zero_returns_the_users_loss_and_training_moves_towards_the_teacher():
    data = token_batches(4, batch=2, seq=12)
    torch.manual_seed(0)
    plain = UserLM(tiny_llama(), lr=0.0)
    _, plain_losses = _fit(plain, data[:1], _callback(0.0))
    torch.manual_seed(0)
    x = data[0]
    with torch.no_grad():
        ce = F.cross_entropy(plain.model(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    assert plain_losses[0] == pytest.approx(float(ce), rel=1e-5)
    module = UserLM(tiny_llama(), lr=0.5)
    trainer, losses = _fit(module, data * 5, _callback(1.0), steps=20)
    assert losses[-1] < 0.9 * losses[0]  # distillation only: the sparse model approaches the dense one


def test_weight_schedule_is_linear_over_optimizer_steps():
    config = DistillationConfig(weight=0.2, weight_end=1.0)
    assert [config.weight_at(s, 5) for s in (0, 2, 4, 9)] == pytest.approx([0.2, 0.6, 1.0, 1.0])
    assert DistillationConfig(weight=0.3).weight_at(7, 10) == 0.3 and DistillationConfig(weight=0.3, weight_end=0.1).weight_at(0, 1) == 0.3


def test_weight_schedule_mixes_and_logs_the_weight_of_each_optimizer_step():
    class Mixed(pl.Callback):
        def __init__(self) -> None:
            self.rows: list[tuple[float, float, float, float]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            self.rows.append((float(m["actsparse/train/distill_weight"]), float(outputs["ce"]), float(m["actsparse/train/distill_loss"]),
                              float(outputs["loss"])))

    data, mixed = token_batches(6, batch=2, seq=12), Mixed()
    module = UserLM(tiny_llama(), dict_output=True, lr=0.0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accumulate_grad_batches=2, callbacks=[_callback({"weight": 0.0, "weight_end": 1.0}), mixed])
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))
    weights = [w for w, *_ in mixed.rows]
    assert weights == pytest.approx([0.0, 0.0, 0.5, 0.5, 1.0, 1.0])  # per micro-batch: steps 0, 1 (middle), 2 (end) of 3
    for w, ce, kd, loss in mixed.rows:
        assert kd > 1e-4 and 2 * loss == pytest.approx((1 - w) * ce + w * kd, rel=1e-5)  # Lightning divides by the accumulation
    with pytest.raises(CallbackConfigurationError, match=r"weight_end=0.5 ramps over the fit's optimizer steps, which are unbounded"):
        pl.Trainer(accelerator="cpu", devices=1, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   callbacks=[_callback({"weight_end": 0.5})]).fit(UserLM(tiny_llama()), train_dataloaders=DataLoader(data, batch_size=None))


def test_hf_model_output_with_padding_under_bf16_mixed_and_gradient_accumulation():
    model = tiny_hf_llama()
    model.train()
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, 8:] = 0
    data = [(ids, mask)] * 4
    module = UserLM(model, hf=True, lr=0.0)
    trainer, losses = _fit(module, data, _callback(0.5), steps=2, precision="bf16-mixed", accumulate_grad_batches=2)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    kd_logged = float(trainer.callback_metrics["actsparse/train/distill_loss"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        student = model(input_ids=ids, attention_mask=mask).logits
        with activation_sparsity_disabled(model):
            teacher = model(input_ids=ids, attention_mask=mask).logits
    assert kd_logged == pytest.approx(float(distillation_loss(student, teacher, mask=mask)), rel=1e-3)
    assert kd_logged != pytest.approx(float(distillation_loss(student, teacher)), rel=1e-3)  # the padding is out


def test_output_without_logits_is_a_precise_error():
    class NoLogits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny_llama()

        def forward(self, input_ids):
            return {"hidden": self.inner(input_ids)}

    class Module(UserLM):
        def training_step(self, batch, batch_idx):
            return self.model(batch)["hidden"].float().mean()

    with pytest.raises(ActivationSparsityError, match=r"distillation needs logits: the forward of NoLogits returned dict"):
        _fit(Module(NoLogits()), token_batches(2, batch=2, seq=12), _callback(0.9))


def test_manual_optimization_and_base_teacher_without_peft_are_refused_at_fit_start():
    class Manual(UserLM):
        def __init__(self, model):
            super().__init__(model)
            self.automatic_optimization = False

    with pytest.raises(CallbackConfigurationError, match="automatic_optimization=False"):
        _fit(Manual(tiny_llama()), token_batches(2, batch=2, seq=12), _callback(0.9))
    with pytest.raises(CallbackConfigurationError, match="teacher='base' needs a peft model"):
        _fit(UserLM(tiny_llama()), token_batches(2, batch=2, seq=12), _callback({"teacher": "base"}))


def test_peft_lora_teacher_dense_keeps_adapters_base_drops_them():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_hf_llama(), peft.LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False))
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    kds = {}
    for teacher in ("dense", "base"):
        module = UserLM(model, hf=True, lr=0.0)
        trainer, _ = _fit(module, [ids], _callback({"weight": 0.9, "teacher": teacher}))
        kds[teacher] = float(trainer.callback_metrics["actsparse/train/distill_loss"])
    with torch.no_grad():
        student = model(input_ids=ids).logits
        with model.disable_adapter(), activation_sparsity_disabled(model):
            base = model(input_ids=ids).logits
    assert kds["base"] == pytest.approx(float(distillation_loss(student, base)), rel=1e-4)
    assert kds["dense"] < kds["base"]


# -- the recipes ------------------------------------------------------------------------------------------------

SMALL = ["trainer.max_steps=2", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=0",
         "trainer.log_every_n_steps=1", "data.init_args.seq_len=32", "data.init_args.batch_size=2",
         "data.init_args.max_calibration_windows=4", "data.init_args.calibration_batch_size=2"]


@pytest.mark.parametrize("recipe", ["stories260k_modelwide.yaml", "stories260k_lora.yaml"])
def test_recipes_fine_tune_with_the_librarys_distillation(recipe, tmp_path):
    if recipe == "stories260k_lora.yaml":
        pytest.importorskip("peft")
    from pl_actsparse.lightning.cli import run

    cli = run(["fit", "--config", str(RECIPES / recipe), *SMALL, f"trainer.logger.init_args.save_dir={tmp_path}"])
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, ActivationSparsityCallback))
    assert callback.distiller is not None and callback.distiller.config.weight == 0.9
    assert callback.distiller.config.hidden_states == r".*layers\.\d+"  # the measured best (docs/finetuning.md)
    assert cli.trainer.global_step == 2 and math.isfinite(float(cli.trainer.callback_metrics["actsparse/train/distill_loss"]))
    assert "training_step" not in cli.model.__dict__
    assert callback.rotated is (recipe == "stories260k_modelwide.yaml")  # rotation: true (peft adapters refuse it)


@pytest.mark.parametrize("teacher", ["initial", "dense"])
def test_initial_teacher_keeps_the_weights_of_the_start_of_fit(teacher):
    import copy

    class Snapshot(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:
                self.after_first = copy.deepcopy(pl_module.model.state_dict())

    data = token_batches(1, batch=2, seq=12) * 2
    module = UserLM(tiny_llama(), lr=2.0)
    original = copy.deepcopy(module.model)
    snap = Snapshot()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[_callback({"weight": 0.5, "teacher": teacher}), snap])
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))
    module.model.load_state_dict(snap.after_first)  # the weights step 2 saw
    x = data[1]
    with torch.no_grad():
        student = module.model(x)
        dense_source = module.model if teacher == "dense" else original
        with activation_sparsity_disabled(dense_source):
            expected = distillation_loss(student, dense_source(x))
    assert float(trainer.callback_metrics["actsparse/train/distill_loss"]) == pytest.approx(float(expected), rel=1e-4)


def test_a_failed_fit_leaves_no_distillation_behind():
    """Lightning calls no callback teardown when fit raises: on_exception unwraps training_step and removes the
    teacher hook, so a later fit without the callback trains on the module's own loss."""

    class Flaky(UserLM):
        def training_step(self, batch, batch_idx):
            if batch_idx == 1:
                raise RuntimeError("interrupted at step 1")
            return super().training_step(batch, batch_idx)

    data = token_batches(3, batch=2, seq=12)
    module = Flaky(tiny_llama(), lr=0.0)
    with pytest.raises(RuntimeError, match="interrupted at step 1"):
        _fit(module, data, _callback(0.9), steps=3)
    assert "training_step" not in module.__dict__ and not module.model._forward_hooks
    seen = Returned()
    pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[seen]).fit(module, train_dataloaders=DataLoader(data[:1], batch_size=None))
    with torch.no_grad():
        logits = module.model(data[0])
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), data[0][:, 1:].flatten())
    assert seen.losses[0] == pytest.approx(float(ce), rel=1e-5)  # the user's loss, no KL mixed in


def test_a_resumed_fit_distils_from_the_original_start_of_fit(tmp_path):
    """teacher="initial" is saved in the callback's checkpoint state: resuming at an epoch boundary ends bit-identical
    to the uninterrupted fit (without it the teacher would be the weights at the resume); the weight schedule, a
    function of the global step, continues where it was."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = token_batches(2, batch=2, seq=12)

    def fit(steps, ckpt_path=None, save=False):
        torch.manual_seed(0)
        module = UserLM(tiny_llama(), lr=0.5)
        saver = [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)] if save else []
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=save, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[_callback({"weight": 0.9, "weight_end": 0.3, "hidden_states": r"layers\.\d+"}), *saver])
        trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None), ckpt_path=ckpt_path)
        return module

    full = fit(4, save=True)
    (ckpt,) = [p for p in tmp_path.glob("*.ckpt") if "step=2" in p.name]
    assert torch.load(ckpt, weights_only=False)["callbacks"]  # the teacher travels in the callback's state
    resumed = fit(4, ckpt_path=ckpt)
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))
    state = next(v for k, v in torch.load(ckpt, weights_only=False)["callbacks"].items() if "ActivationSparsityCallback" in k)
    torch.manual_seed(0)
    start = UserLM(tiny_llama(), lr=0.5).model  # the weights of the start of fit, as fit() builds them
    assert all(torch.equal(state["distillation_teacher"][n], p) for n, p in start.named_parameters())
