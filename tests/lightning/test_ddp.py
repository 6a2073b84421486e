"""DDP on 2 CPU processes (gloo): identical thresholds on both ranks, equal to one process calibrating on the
union of their batches; synced metrics; identical fine-tuning.

The test launches this file as a script in a subprocess with a timeout (a hang cannot take the suite down);
Lightning's DDP launcher starts the second rank by running the same command again. Each rank saves what it
saw, and the test compares the ranks with each other and with a single-process run of the functional core.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

WORLD = 2
CALIBRATION_BATCHES = 6  # of 2 windows: rank 0 gets batches 0, 2, 4 and rank 1 gets 1, 3, 5
MLP = [{"patterns": [r".*mlp\.(gate|up|down)_proj"], "sparsity": 0.5}]


def _data():
    from pl_actsparse.demos.lightning_models import TinyStoriesDataModule

    return TinyStoriesDataModule(
        seq_len=32,
        batch_size=2,
        eval_batch_size=2,
        calibration_batch_size=2,
        max_train_windows=8,
        max_eval_windows=8,
        max_calibration_windows=2 * CALIBRATION_BATCHES,
    )


def _worker(out: Path) -> None:  # pragma: no cover - runs in the subprocesses
    import warnings

    import lightning.pytorch as pl

    from pl_actsparse.lightning.callback import ActivationSparsityCallback
    from pl_actsparse.demos.lightning_models import TinyStoriesLM

    warnings.filterwarnings("ignore")
    pl.seed_everything(0)
    seen: list[torch.Tensor] = []
    lock = threading.Lock()

    def inputs(batch):  # runs in the calibration threads: record which batches this rank calibrated on
        with lock:
            seen.append(batch[0].clone())
        return batch[0]

    cb = ActivationSparsityCallback(
        scopes=MLP, calibration={"transform_fn": inputs, "progress": False}, recalibrate_every_n_epochs=1, verbose=False
    )
    trainer = pl.Trainer(
        strategy="ddp",
        devices=WORLD,
        accelerator="cpu",
        max_epochs=2,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    model = TinyStoriesLM(learning_rate=1e-3)
    trainer.validate(model, datamodule=_data(), verbose=False)
    validated = {
        "thresholds": {n: b.clone() for n, b in model.named_buffers() if n.endswith("activation_threshold")},
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "batches": list(seen),
    }
    trainer.fit(model, datamodule=_data())
    fitted = {
        "thresholds": {n: b.clone() for n, b in model.named_buffers() if n.endswith("activation_threshold")},
        "params": [p.detach().clone() for p in model.parameters()],
        "history": cb.history,
        "train_sparsity": float(trainer.callback_metrics["actsparse/train/sparsity"]),
    }
    torch.save({"validated": validated, "fitted": fitted, "world": trainer.world_size}, out / f"rank{trainer.global_rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    root = Path(__file__).resolve().parents[2]
    # the script's own folder comes first on its sys.path: put this checkout's package before any installed one
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(out)], cwd=root, env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_both_ranks_calibrate_identically_on_their_own_batches(ranks):
    a, b = (r["validated"] for r in ranks)
    assert ranks[0]["world"] == WORLD
    assert a["thresholds"].keys() == b["thresholds"].keys() and len(a["thresholds"]) == 15
    assert all(torch.equal(a["thresholds"][k], b["thresholds"][k]) for k in a["thresholds"])
    # round-robin shards: each rank ran the model on its half, the halves are disjoint and cover all batches
    assert len(a["batches"]) == len(b["batches"]) == CALIBRATION_BATCHES // WORLD
    expected = [x for x, _ in _data().calibration_dataloader()]
    assert len(expected) == CALIBRATION_BATCHES
    got = sorted(a["batches"] + b["batches"], key=lambda t: t.flatten().tolist())
    assert all(torch.equal(x, y) for x, y in zip(got, sorted(expected, key=lambda t: t.flatten().tolist())))


def test_ddp_thresholds_equal_single_process_on_the_union(ranks):
    from pl_actsparse import TargetScope, calibrate_activation_sparsity, prepare_activation_sparsity
    from pl_actsparse.core.layer import sparsified_layers
    from pl_actsparse.demos.llama2c import load_llama2c_checkpoint

    a, b = (r["validated"] for r in ranks)
    model = load_llama2c_checkpoint()
    prepare_activation_sparsity(model, {TargetScope(patterns=MLP[0]["patterns"]): 0.5})
    calibrate_activation_sparsity(model, a["batches"] + b["batches"], calibration={"progress": False})
    single = {f"model.{n}.activation_threshold": m.activation_threshold for n, m in sparsified_layers(model)}
    # the calibration is exact, so "within its resolution" is equality
    assert all(torch.equal(single[k], a["thresholds"][k]) for k in single)


def test_metrics_are_synced_across_ranks(ranks):
    from pl_actsparse import TargetScope, prepare_activation_sparsity
    from pl_actsparse.core.layer import SparsifierMode, sparsified_layers
    from pl_actsparse.tuning.objectives import perplexity
    from pl_actsparse.demos.llama2c import load_llama2c_checkpoint
    from pl_actsparse.measure.metric import ActivationSparsity

    a, b = (r["validated"] for r in ranks)
    keys = [k for k in a["metrics"] if k.startswith("actsparse/val/") or k.startswith("val/")]
    assert "actsparse/val/sparsity" in keys and "val/ppl" in keys
    assert {k: a["metrics"][k] for k in keys} == {k: b["metrics"][k] for k in keys}
    # and equal to one process measuring all validation windows with the same thresholds
    model = load_llama2c_checkpoint()
    prepare_activation_sparsity(model, {TargetScope(patterns=MLP[0]["patterns"]): 0.5})
    for name, m in sparsified_layers(model):
        m.activation_threshold.copy_(a["thresholds"][f"model.{name}.activation_threshold"])
        m._actsparse.mode = SparsifierMode.SPARSIFYING
    windows = _data().dataset("val")
    metric = ActivationSparsity.from_model(model)
    with metric.observe(model), torch.no_grad():
        for i in range(len(windows)):
            model(windows[i][0][None])
    whole = metric.compute()
    prefix = "actsparse/val/"
    for key in ("sparsity", "weighted_sparsity", "token_sparsity_p5", "token_sparsity_p95", "layers.3.mlp.down_proj/sparsity"):
        name = prefix + (f"model.{key}" if "/" in key else key)
        assert a["metrics"][name] == pytest.approx(float(whole[key]), abs=1e-6)
    assert a["metrics"]["val/ppl"] == pytest.approx(perplexity(model, [windows[i] for i in range(len(windows))]), rel=1e-5)


def test_fine_tuning_stays_in_lockstep(ranks):
    a, b = (r["fitted"] for r in ranks)
    # calibrated once by validate (the fit found the model calibrated), then at the end of each epoch
    assert [h["reason"] for h in a["history"]] == ["start of validation", "every 1 epoch(s)", "every 1 epoch(s)"]
    assert a["history"] == b["history"]
    assert all(torch.equal(a["thresholds"][k], b["thresholds"][k]) for k in a["thresholds"])
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
    assert a["train_sparsity"] == b["train_sparsity"]
    assert all(h["sparsity_after"] == pytest.approx(0.5, abs=1e-3) for h in a["history"])


if __name__ == "__main__":  # pragma: no cover
    _worker(Path(sys.argv[1]))
