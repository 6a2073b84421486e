"""Self-distillation (pl_actsparse.lightning.distillation) on the stacks issue 21 names: DDP on 2 CPU processes
(gloo), a module whose model is ``torch.compile``-d, and peft LoRA with each teacher, every time against the number
the distillation objective predicts.

The DDP test runs this file as a script in a subprocess with a timeout, as tests/lightning/test_ddp.py does:
Lightning's DDP launcher starts the second rank by running the same command again.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from test_distillation import MLP, UserLM, _callback, _fit  # noqa: E402
from tiny_models import tiny_hf_llama, tiny_llama, token_batches  # noqa: E402

from pl_actsparse.core.layer import activation_sparsity_disabled  # noqa: E402
from pl_actsparse.lightning.distillation import distillation_loss  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
WORLD, STEPS = 2, 2


def _sequences() -> torch.Tensor:
    return torch.cat(token_batches(4, batch=2, seq=12))  # 8 sequences of 12 tokens


class _Record(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.kd: list[float] = []
        self.batches: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append(batch.clone())
        self.losses.append(float(outputs["loss"]))
        self.kd.append(float(trainer.callback_metrics["actsparse/train/distill_loss"]))


def _worker(out: Path) -> None:  # pragma: no cover - runs in the subprocesses
    import warnings

    warnings.filterwarnings("ignore")
    pl.seed_everything(0)
    record = _Record()
    trainer = pl.Trainer(strategy="ddp", devices=WORLD, accelerator="cpu", max_steps=STEPS, callbacks=[_callback(0.9), record],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    module = UserLM(tiny_llama(), lr=0.5)
    trainer.fit(module, train_dataloaders=DataLoader(_sequences(), batch_size=2))  # a DistributedSampler shards it
    torch.save({"losses": record.losses, "kd": record.kd, "batches": record.batches, "params": [p.detach().clone() for p in module.parameters()],
                "world": trainer.world_size}, out / f"rank{trainer.global_rank}.pt")


def test_ddp_ranks_train_like_one_process_on_the_union_of_their_batches(tmp_path):
    root = HERE.parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(tmp_path)], cwd=root, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert ranks[0]["world"] == WORLD and len(ranks[0]["losses"]) == STEPS
    # DDP averages the gradients: both ranks hold the same weights after every step
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"]))
    assert ranks[0]["kd"] != ranks[1]["kd"] and all(k > 1e-4 for k in ranks[0]["kd"])  # each rank distils on its own half
    # one process fitting the union of each step's two halves (same mean loss, so the same gradient)
    union = [torch.cat([ranks[0]["batches"][i], ranks[1]["batches"][i]]) for i in range(STEPS)]
    assert sorted(torch.cat(union).tolist()) == sorted(_sequences().tolist())  # disjoint halves of the data
    pl.seed_everything(0)
    single = UserLM(tiny_llama(), lr=0.5)
    _, losses = _fit(single, union, _callback(0.9), steps=STEPS)
    expected = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    assert losses == pytest.approx(expected, rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(single.parameters(), ranks[0]["params"]))


class _Compiled(UserLM):
    """A user's module that compiles its own model, as users do (``self.model = torch.compile(self.model)``)."""

    def __init__(self, model, lr):
        super().__init__(torch.compile(model, fullgraph=True), lr=lr)


def test_compiled_model_distils_like_the_eager_one():
    import torch._dynamo
    from torch._dynamo.utils import counters

    data = token_batches(3, batch=2, seq=12)
    runs = {}
    for name, cls in (("eager", UserLM), ("compiled", _Compiled)):
        torch._dynamo.reset()
        counters.clear()
        module = cls(tiny_llama(), lr=0.5)
        record = _Record()
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[_callback(0.9), record])
        trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))
        runs[name] = (record, [p.detach().clone() for p in module.model.parameters()], sum(counters["graph_break"].values()))
    (eager, eager_params, _), (compiled, compiled_params, breaks) = runs["eager"], runs["compiled"]
    assert breaks == 0
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4) and compiled.kd == pytest.approx(eager.kd, rel=1e-3)
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(compiled_params, eager_params))
    assert compiled.kd[0] > 1e-4  # the teacher is not the student


@pytest.mark.parametrize("teacher", ["initial", "base", "dense"])
def test_peft_lora_teacher_is_the_initial_adapters_the_base_model_or_the_current_adapters(teacher):
    """Random initial adapters (B != 0), so the three teachers differ; the teacher of step 2 is, with sparsity off,
    the model with its adapters of the start of fit, without adapters, or with the adapters step 1 trained."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], init_lora_weights=False)
    model = peft.get_peft_model(tiny_hf_llama(), lora)
    original = copy.deepcopy(model)  # not sparsified yet: the callback sparsifies at the start of fit
    data = token_batches(2, batch=2, seq=12)
    record = _Record()
    snapshot = {}

    class Snapshot(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:
                snapshot.update(copy.deepcopy(pl_module.model.state_dict()))

    module = UserLM(model, hf=True, lr=0.5)
    pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[_callback({"weight": 0.9, "teacher": teacher}), record, Snapshot()]
               ).fit(module, train_dataloaders=DataLoader(data, batch_size=None))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    model.load_state_dict(snapshot)  # the weights step 2 saw
    with torch.no_grad():
        student = model(input_ids=data[1]).logits
        with activation_sparsity_disabled(model):
            teachers = {"dense": model(input_ids=data[1]).logits, "initial": original(input_ids=data[1]).logits}
        with original.disable_adapter():
            teachers["base"] = original(input_ids=data[1]).logits
    kd = {name: float(distillation_loss(student, t)) for name, t in teachers.items()}
    others = [v for name, v in kd.items() if name != teacher]
    assert all(abs(v - kd[teacher]) > 1e-3 * kd[teacher] for v in others), kd  # the teachers differ
    assert record.kd[1] == pytest.approx(kd[teacher], rel=1e-4)


if __name__ == "__main__":  # pragma: no cover
    _worker(Path(sys.argv[1]))
