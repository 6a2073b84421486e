"""``strategy="ddp_spawn"`` on 2 CPU processes (gloo): after fit, the main process holds the same sparsified
model (thresholds, calibration state) and the same callback state as the workers (issue 12, item 4).

As in tests/lightning/test_ddp.py the test runs this file as a script in a subprocess with a timeout. The main process
of that script saves what it holds after ``fit``; a probe callback saves what each worker held at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

WORLD = 2


def _script(out: Path) -> None:  # pragma: no cover - runs in the subprocess (and its spawned workers)
    import warnings

    sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
    from test_callback import TinyData, TinyLM

    from pl_actsparse.core.layer import is_sparsified
    from pl_actsparse.lightning.callback import ActivationSparsityCallback

    warnings.filterwarnings("ignore")
    pl.seed_everything(0)
    cb = ActivationSparsityCallback(
        scopes=[{"patterns": [r".*mlp\.(gate|up|down)_proj"], "sparsity": 0.5}],
        input_key=0,
        recalibrate_every_n_epochs=1,
        track=False,
        calibration={"progress": False},
        verbose=False,
    )
    trainer = pl.Trainer(
        strategy="ddp_spawn",
        devices=WORLD,
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=0,
        callbacks=[cb, _Probe(str(out))],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = TinyLM(lr=0.5)
    trainer.fit(model, datamodule=TinyData())
    state = model.state_dict()
    torch.save(
        {
            "thresholds": {k: v.clone() for k, v in state.items() if k.endswith("activation_threshold")},
            "extra": {k: v for k, v in state.items() if k.endswith("_extra_state")},
            "params": {k: v.clone() for k, v in state.items() if not k.endswith(("activation_threshold", "_extra_state"))},
            "history": cb.history,
            "callback_state": cb.state_dict(),
            "sparsified": sorted(n for n, m in model.named_modules() if is_sparsified(m)),
        },
        out / "main.pt",
    )


class _Probe(pl.Callback):
    """Saves what a worker holds at the end of fit."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_fit_end(self, trainer, pl_module):
        state = pl_module.state_dict()
        torch.save(
            {
                "thresholds": {k: v.clone() for k, v in state.items() if k.endswith("activation_threshold")},
                "params": {k: v.clone() for k, v in state.items() if not k.endswith(("activation_threshold", "_extra_state"))},
                "history": next(c for c in trainer.callbacks if type(c).__name__ == "ActivationSparsityCallback").history,
            },
            Path(self.out) / f"worker{trainer.global_rank}.pt",
        )


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    out = tmp_path_factory.mktemp("spawn")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(out)], cwd=root, env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {
        "main": torch.load(out / "main.pt", weights_only=False),
        "workers": [torch.load(out / f"worker{r}.pt", weights_only=False) for r in range(WORLD)],
    }


def test_main_process_holds_the_workers_sparsified_model(spawned):
    main, (w0, w1) = spawned["main"], spawned["workers"]
    assert len(main["sparsified"]) == 9 and len(main["thresholds"]) == 9
    assert main["thresholds"].keys() == w0["thresholds"].keys() == w1["thresholds"].keys()
    for key, value in main["thresholds"].items():
        assert torch.equal(value, w0["thresholds"][key]) and torch.equal(value, w1["thresholds"][key])
        assert float(value) > 0  # calibrated, not the pass-through -inf
    from pl_actsparse.core.layer import decode_sparsifier_state

    states = [decode_sparsifier_state(v) for v in main["extra"].values()]
    assert len(states) == 9 and all(s["calibrated"] and s["target"] == 0.5 for s in states)
    for key, value in main["params"].items():
        assert torch.equal(value, w0["params"][key])


def test_main_process_callback_state_equals_the_workers(spawned):
    main, (w0, w1) = spawned["main"], spawned["workers"]
    assert [h["reason"] for h in main["history"]] == ["start of fit", "every 1 epoch(s)", "every 1 epoch(s)"]
    assert main["history"] == w0["history"] == w1["history"]
    assert main["callback_state"]["last_calibration_step"] == main["history"][-1]["step"] == 4
    last = {f"model.{k}" if not k.startswith("model.") else k: v for k, v in main["history"][-1]["thresholds"].items()}
    assert {k[: -len(".activation_threshold")]: float(v) for k, v in main["thresholds"].items()} == last


if __name__ == "__main__":  # pragma: no cover
    _script(Path(sys.argv[1]))
