"""DDP on 2 CPU processes (gloo) with ``allocation="auto"``: each rank reads its own calibration batches, and both
allocate the same levels, equal to one process allocating on the union of their batches (the loss curves are
summed over ranks before the allocation), with identical thresholds.

Run as tests/lightning/test_ddp.py runs: this file is launched as a script in a subprocess with a timeout, and
Lightning's DDP launcher starts the second rank by running the same command again.
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
CALIBRATION_BATCHES = 8  # of 2 windows: rank 0 gets batches 0, 2, 4, 6 and rank 1 gets 1, 3, 5, 7
# (an even count per rank: the real-loss search scores every second item of each rank, which is then every second
# item of the union read rank after rank, as the single-process comparison below reads it)
ALL = [{"patterns": [r".*_proj"], "sparsity": 0.5}]


def _data():
    from pl_actsparse.demos.lightning_models import TinyStoriesDataModule

    return TinyStoriesDataModule(seq_len=32, batch_size=2, eval_batch_size=2, calibration_batch_size=2, max_train_windows=4,
                                 max_eval_windows=4, max_calibration_windows=2 * CALIBRATION_BATCHES)


def _worker(out: Path) -> None:  # pragma: no cover - runs in the subprocesses
    import warnings

    import lightning.pytorch as pl

    from pl_actsparse.core.layer import sparsified_layers, sparsifier_state
    from pl_actsparse.demos.lightning_models import TinyStoriesLM
    from pl_actsparse.lightning.callback import ActivationSparsityCallback

    warnings.filterwarnings("ignore")
    pl.seed_everything(0)
    seen: list[torch.Tensor] = []
    lock = threading.Lock()

    def inputs(batch):  # records which batches this rank ran (allocation and calibration both read them)
        with lock:
            seen.append(batch[0].clone())
        return batch[0]

    cb = ActivationSparsityCallback(scopes=ALL, calibration={"transform_fn": inputs, "progress": False}, allocation="auto", verbose=False)
    trainer = pl.Trainer(strategy="ddp", devices=WORLD, accelerator="cpu", callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    model = TinyStoriesLM(learning_rate=1e-3)
    trainer.validate(model, datamodule=_data(), verbose=False)
    torch.save({
        "levels": {n: sparsifier_state(m).target for n, m in sparsified_layers(model.model)},
        "thresholds": {n: m.activation_threshold.clone() for n, m in sparsified_layers(model.model)},
        "allocated": cb.allocated, "batches": seen, "world": trainer.world_size,
    }, out / f"rank{trainer.global_rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_allocation")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(out)], cwd=root, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_ranks_allocate_identical_levels_on_their_own_shards(ranks):
    a, b = ranks
    assert a["world"] == WORLD and len(a["levels"]) == 35
    assert a["levels"] == b["levels"] and a["allocated"] == b["allocated"]  # identical, not merely close
    assert max(a["levels"].values()) - min(a["levels"].values()) > 0.1
    assert all(torch.equal(a["thresholds"][n], b["thresholds"][n]) for n in a["thresholds"])
    # each rank ran its own half of the batches (twice: the allocation's pass, then calibration)
    mine = lambda r: {tuple(x.flatten().tolist()) for x in r["batches"]}  # noqa: E731
    assert len(mine(a)) == len(mine(b)) == CALIBRATION_BATCHES // WORLD and not mine(a) & mine(b)


def test_ddp_levels_equal_one_process_allocating_on_the_union(ranks):
    from pl_actsparse import TargetScope, sparsify_activations
    from pl_actsparse.core.layer import sparsified_layers, sparsifier_state
    from pl_actsparse.demos.llama2c import load_llama2c_checkpoint

    a, b = ranks
    union = list({tuple(x.flatten().tolist()): x for x in a["batches"] + b["batches"]}.values())
    assert len(union) == CALIBRATION_BATCHES
    model = sparsify_activations(load_llama2c_checkpoint(), union, {TargetScope(patterns=ALL[0]["patterns"]): 0.5},
                                 calibration={"progress": False}, allocation="auto")
    single = {n: sparsifier_state(m).target for n, m in sparsified_layers(model)}
    assert single.keys() == a["levels"].keys()
    # the same curves summed in another order: equal up to float64 rounding
    assert max(abs(single[n] - a["levels"][n]) for n in single) < 1e-6


if __name__ == "__main__":  # pragma: no cover
    _worker(Path(sys.argv[1]))
