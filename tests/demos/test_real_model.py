"""The seed recipe on the real stories260K model (calibration guarantee on real activations)."""

import pytest
import torch

from pl_actsparse import activation_sparsity_report, remove_activation_sparsity, sparsify_activations
from pl_actsparse.demos import SEED_RECIPE, calibration_batches
from pl_actsparse.demos.tinystories import TokenWindows, load_stories
from pl_actsparse.tuning.objectives import perplexity
from pl_actsparse.demos.llama2c import Llama2cTokenizer, load_llama2c_checkpoint
from pl_actsparse.measure.metric import SparsityCounter



@pytest.fixture(scope="module")
def setup():
    tok = Llama2cTokenizer.from_file()
    held = TokenWindows(load_stories(start=0, stop=30), tok, seq_len=256)
    return calibration_batches(500, 540, tokenizer=tok), held


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seed_recipe_on_stories260k(setup, dtype):
    batches, held = setup
    model = load_llama2c_checkpoint(dtype=dtype)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    dense = perplexity(model, held)
    sparsify_activations(model, batches, SEED_RECIPE, calibration={"progress": False})
    report = activation_sparsity_report(model)
    assert len(report.layers) == 15
    with SparsityCounter(model) as on_calib, torch.no_grad():
        for b in batches:
            model(b)
    for row in report.layers:
        target = 0.5 if "down_proj" in row.name else 0.3
        assert row.target == target
        assert on_calib.sparsity()[row.name] == pytest.approx(target, abs=0.002), row.name
        assert row.calibration_sparsity == pytest.approx(on_calib.sparsity()[row.name], abs=1e-9)
    with SparsityCounter(model) as on_held:
        sparse = perplexity(model, held)
    assert all(abs(v - (0.5 if "down" in n else 0.3)) < 0.03 for n, v in on_held.sparsity().items())
    assert dense < sparse < dense * 1.15  # sparsity costs some perplexity, not a collapse
    remove_activation_sparsity(model)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert perplexity(model, held) == pytest.approx(dense, rel=1e-6)
