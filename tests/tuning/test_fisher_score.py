"""``score="fisher"``: per-channel scales ``E[(dL/dx_i)^2] ** (1/4)`` from one gradient pass, the zeroing rule
``|x_i| * c_i <= tau`` at exact per-layer levels, with ``allocation="auto"`` on a Hugging Face Llama, and equal on
2 gloo ranks to one process reading both shards."""

from __future__ import annotations

import os
import subprocess
import logging
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pl_actsparse import TargetScope, remove_activation_sparsity
from pl_actsparse.calibrate.allocation import gradient_scales
from pl_actsparse.config import CalibrationConfig
from pl_actsparse.core.layer import sparsified_layers, sparsifier_state
from pl_actsparse.errors import InvalidOptionError
from pl_actsparse.measure.metric import SparsityCounter
from pl_actsparse.tuning.weight_aware import is_weight_aware, sparsify_activations_weight_aware

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = {"progress": False}


def _sum_loss(out, inputs, mask):
    return out.sum(), 1


def test_gradient_scales_of_a_linear_map_are_its_weights_fourth_root():
    # y = W x, L = sum(y): dL/dx = W^T 1 for every token, so E[g_i^2] = (sum_j W_ji)^2 and c_i = |sum_j W_ji| ** 0.5
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 3))
    data = [torch.randn(5, 6), torch.randn(7, 6)]
    c = gradient_scales(net, [("0", net[0])], data, CalibrationConfig(token_mask=None), _sum_loss)
    expected = net[0].weight.detach().double().sum(0).abs().sqrt().float()
    torch.testing.assert_close(c["0"], expected, rtol=1e-5, atol=0)
    assert net[0].weight.grad is None  # parameters' gradients untouched


def test_fisher_score_takes_the_calibration_loss_fn():
    """calibration={"loss_fn": ...} reaches the gradient pass: on a linear map with L = sum(y) the scales are
    |sum_j W_ji| ** 0.5, so threshold * scale is one tau; the default loss refuses feature vectors."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 3))
    data = [torch.randn(16, 6), torch.randn(16, 6)]
    c = net[0].weight.detach().double().sum(0).abs().sqrt().float()
    with pytest.raises(InvalidOptionError, match=r"not token ids: give the model's loss as calibration=\{'loss_fn': f\}"):
        sparsify_activations_weight_aware(net, data, {TargetScope(names=["0"]): 0.5}, score="fisher", calibration=QUIET)
    assert not list(sparsified_layers(net))
    sparsify_activations_weight_aware(net, data, {TargetScope(names=["0"]): 0.5}, score="fisher", calibration={**QUIET, "loss_fn": _sum_loss})
    tau = net[0].activation_threshold * c
    torch.testing.assert_close(tau, tau[:1].expand(6), rtol=1e-5, atol=0)


def test_unknown_score_is_refused_before_any_change():
    from tiny_models import tiny_hf_llama, token_batches

    model = tiny_hf_llama()
    with pytest.raises(InvalidOptionError, match="score must be one of 'weight', 'fisher', got 'grad'"):
        sparsify_activations_weight_aware(model, token_batches(), {TargetScope(patterns=[r".*_proj"]): 0.5}, score="grad")
    assert not list(sparsified_layers(model))


def test_fisher_score_refuses_inference_mode_parameters_before_any_change():
    from tiny_models import tiny_hf_llama, token_batches

    with torch.inference_mode():
        model = tiny_hf_llama()
    with pytest.raises(InvalidOptionError, match=r"score='fisher' needs a gradient pass.*inference_mode.*or use score='weight'"):
        sparsify_activations_weight_aware(model, token_batches(), {TargetScope(patterns=[r".*_proj"]): 0.5}, score="fisher", calibration=QUIET)
    assert not list(sparsified_layers(model)) and not any(m._forward_pre_hooks for m in model.modules())


def test_fisher_score_with_auto_allocation_on_hf_llama():
    from tiny_models import tiny_hf_llama, token_batches

    model = tiny_hf_llama().eval()
    data = token_batches(n=6, batch=2, seq=16)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    scope = TargetScope(patterns=[r".*_proj"])
    layers = [(n, m) for n, m in model.named_modules() if scope.matches(n, m)]
    hf_loss = lambda out, ids, mask: (torch.nn.functional.cross_entropy(  # noqa: E731
        out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"), ids[:, 1:].numel())
    scales = gradient_scales(model, layers, data, CalibrationConfig(), hf_loss)
    sparsify_activations_weight_aware(model, data, {scope: 0.5}, score="fisher", calibration=QUIET, allocation="auto")
    levels = {n: sparsifier_state(m).target for n, m in sparsified_layers(model)}
    assert len(levels) == 14 and max(levels.values()) - min(levels.values()) > 0.05  # allocated, not uniform
    nbytes = {n: m.weight.numel() for n, m in sparsified_layers(model)}
    assert sum(nbytes[n] * s for n, s in levels.items()) / sum(nbytes.values()) == pytest.approx(0.5, abs=1e-3)
    for n, m in sparsified_layers(model):
        assert is_weight_aware(m)
        finite = scales[n] > 0
        tau = m.activation_threshold * scales[n]  # the rule |x_i| * c_i <= tau: one tau per layer
        torch.testing.assert_close(tau[finite], tau[finite][:1].expand(int(finite.sum())), rtol=1e-5, atol=0)
    with SparsityCounter(model) as counter, torch.no_grad():
        for b in data:
            model(b)
    achieved = counter.sparsity()
    assert all(abs(achieved[n] - levels[n]) < 0.02 for n in levels)  # each layer at its allocated level
    # exported, the per-channel thresholds go to the sparse kernel: one token reads only the kept rows
    from pl_actsparse.export.convert import export_for_inference, exported_layers

    with torch.no_grad():
        before = model(data[0][:1, :1]).logits
    export_for_inference(model)
    assert len(exported_layers(model)) == 14
    with torch.no_grad():
        torch.testing.assert_close(model(data[0][:1, :1]).logits, before, rtol=1e-4, atol=1e-5)
    remove_activation_sparsity(model)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_block_wise_gradient_pass_gives_the_whole_model_scales(caplog):
    from tiny_models import tiny_hf_llama, token_batches

    model = tiny_hf_llama().eval()
    layers = [(n, m) for n, m in model.named_modules() if n.endswith("_proj")]
    loss = lambda o, ids, mask: (torch.nn.functional.cross_entropy(o.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"), 1)  # noqa: E731
    whole = gradient_scales(model, layers, token_batches(n=3), CalibrationConfig(method="lockstep"), loss)
    with caplog.at_level(logging.WARNING, logger="pl_actsparse"):
        blocks = gradient_scales(model, layers, token_batches(n=3), CalibrationConfig(method="sequential"), loss)
    assert not [r for r in caplog.records if r.name.startswith("pl_actsparse")]  # no fallback to the whole model: the pass really went block by block
    for n in whole:
        torch.testing.assert_close(blocks[n], whole[n], rtol=1e-4, atol=1e-7)


def _worker(out: Path, rank: int) -> None:  # pragma: no cover - runs in the subprocesses
    import torch.distributed as dist

    from tiny_models import tiny_hf_llama, token_batches

    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"file://{out / 'rendezvous'}")
    model = tiny_hf_llama().eval()
    mine = token_batches(n=4, batch=2, seq=16)[rank::2]
    layers = [(n, m) for n, m in model.named_modules() if n.endswith("_proj")]
    loss = lambda o, ids, mask: (torch.nn.functional.cross_entropy(o.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"), 1)  # noqa: E731
    torch.save(gradient_scales(model, layers, mine, CalibrationConfig(), loss), out / f"rank{rank}.pt")
    # the whole call on each rank's own shard: scales, allocation and calibration all summed over the ranks
    sparsify_activations_weight_aware(model, mine, {TargetScope(patterns=[r".*_proj"]): 0.5}, score="fisher", calibration=QUIET, allocation="auto")
    torch.save({n: (sparsifier_state(m).target, m.activation_threshold.clone()) for n, m in sparsified_layers(model)}, out / f"call{rank}.pt")
    dist.destroy_process_group()


def test_two_gloo_ranks_get_the_scales_of_the_union(tmp_path):
    from tiny_models import tiny_hf_llama, token_batches

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    procs = [subprocess.Popen([sys.executable, __file__, str(tmp_path), str(r)], env=env, cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    model = tiny_hf_llama().eval()
    layers = [(n, m) for n, m in model.named_modules() if n.endswith("_proj")]
    loss = lambda o, ids, mask: (torch.nn.functional.cross_entropy(o.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"), 1)  # noqa: E731
    union = gradient_scales(model, layers, token_batches(n=4, batch=2, seq=16), CalibrationConfig(), loss)
    assert a.keys() == union.keys()
    for n in union:
        assert torch.equal(a[n], b[n])  # every rank the same scales
        torch.testing.assert_close(a[n], union[n], rtol=1e-5, atol=0)
    ca, cb = (torch.load(tmp_path / f"call{r}.pt") for r in range(2))
    assert len(ca) == 14 and ca.keys() == cb.keys()
    assert all(ca[n][0] == cb[n][0] and torch.equal(ca[n][1], cb[n][1]) for n in ca)  # same levels, same threshold vectors
    assert len({round(v[0], 3) for v in ca.values()}) > 1 and all(v[1].shape == (v[1].numel(),) and v[1].numel() > 1 for v in ca.values())



def _achieved(model, data) -> dict[str, float]:
    with SparsityCounter(model) as counter, torch.no_grad():
        for b in data:
            model(b)
    return counter.sparsity()


@pytest.mark.parametrize("score", ["weight", "fisher"])
def test_weight_aware_refuses_layers_it_cannot_rescale_and_scores_them_in_the_right_order(score):
    """The score rescales x by c and W by 1/c during calibration. A peft LoRA adapter reads the unscaled x and an
    Int8WeightLinear's weight is a property (the assignment was lost): both gave thresholds far off the target
    (0.97 and 0.05 achieved for 0.5) without a word. Now both are refused before any change, and the orders that
    work (merge the adapter; score, then quantize) reach the target on every layer."""
    peft = pytest.importorskip("peft")
    from pl_actsparse.core.int8 import quantize_weights_int8
    from pl_actsparse.errors import UnsupportedModuleError
    from tiny_models import tiny_hf_llama, token_batches

    data, recipe = token_batches(n=4), {TargetScope(patterns=[r".*(v|o|down)_proj"]): 0.5}
    lora = peft.get_peft_model(tiny_hf_llama(), peft.LoraConfig(r=4, target_modules=["down_proj"], init_lora_weights=False)).eval()
    int8 = tiny_hf_llama()
    quantize_weights_int8(int8)
    for model, match in ((lora, r"'base_model\.model\.model\.layers\.0\.mlp\.down_proj\.base_layer'.*peft adapter.*merge_and_unload"),
                         (int8, r"'model\.layers\.0\.self_attn\.v_proj' \(Int8WeightLinear\).*quantized.*then quantize")):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(UnsupportedModuleError, match=match):
            sparsify_activations_weight_aware(model, data, recipe, score=score, calibration=QUIET)
        assert not list(sparsified_layers(model))
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    merged = sparsify_activations_weight_aware(lora.merge_and_unload(), data, recipe, score=score, calibration=QUIET)
    scored_then_quantized = sparsify_activations_weight_aware(tiny_hf_llama(), data, recipe, score=score, calibration=QUIET)
    quantize_weights_int8(scored_then_quantized)
    for model in (merged, scored_then_quantized):
        achieved = _achieved(model, data)
        assert len(achieved) == 6 and all(is_weight_aware(m) for _, m in sparsified_layers(model))
        assert all(abs(s - 0.5) < 0.01 for s in achieved.values()), achieved


def test_loss_fn_results_other_than_a_summed_loss_and_a_count_are_refused():
    """A scalar alone was an IndexError; a per-sample loss of a batch of 2 was read as (loss of sample 0, count = loss
    of sample 1) by the search, silently. Both are an InvalidOptionError naming what came back, for the allocation
    and for the fisher score, and nothing is changed; a BERT classifier without loss_fn is told to give one."""
    from pl_actsparse import sparsify_activations

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))
    data, recipe = [torch.randn(2, 6) for _ in range(4)], {TargetScope(types=[nn.Linear]): 0.5}
    bad = {r"got Tensor\[\]": lambda out, x, mask: out.pow(2).sum(),
           r"got Tensor\[2\]": lambda out, x, mask: out.pow(2).sum(1),
           r"got \(Tensor\[\], -2\)": lambda out, x, mask: (out.pow(2).sum(), -2)}
    for got, loss_fn in bad.items():
        for run in (lambda c: sparsify_activations(net, data, recipe, allocation="auto", calibration=c),
                    lambda c: sparsify_activations_weight_aware(net, data, recipe, score="fisher", calibration=c)):
            with pytest.raises(InvalidOptionError, match=r"loss_fn must return \(summed loss as a 0-dim tensor, count >= 0\), " + got):
                run({**QUIET, "loss_fn": loss_fn})
            assert not list(sparsified_layers(net))
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, num_labels=3)).eval()
    ids = [{"input_ids": torch.randint(0, 64, (4, 12)), "labels": torch.randint(0, 3, (4,))} for _ in range(2)]
    with pytest.raises(InvalidOptionError, match=r"logits \(4, 3\) do not match token ids \(4, 12\): give the model's loss as "
                                                 r"calibration=\{'loss_fn': f\}"):
        sparsify_activations_weight_aware(bert, ids, {TargetScope(patterns=[r".*dense"]): 0.5}, score="fisher", calibration=QUIET)
    assert not list(sparsified_layers(bert))


def test_loss_fn_gets_the_batch_with_its_targets_for_a_regression():
    """(x, y) batches, the model called with transform_fn(batch) = x: loss_fn gets the batch, so a regression's loss
    can read y (it got x alone, and a naive F.mse_loss(out, batch[1]) broadcast a row of x against the output).
    y_hat = w.x + b, L = sum (y_hat - y)^2: dL/dx = 2 (y_hat - y) w, so c_i = (4 w_i^2 E[(y_hat - y)^2]) ** (1/4)."""
    from pl_actsparse import sparsify_activations

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 1))
    batches = [(torch.randn(8, 6), torch.randn(8, 1)) for _ in range(3)]
    seen = []

    def mse(out, batch, mask):
        seen.append(type(batch).__name__)
        return torch.nn.functional.mse_loss(out, batch[1], reduction="sum"), len(batch[1])

    config = CalibrationConfig(transform_fn=lambda b: b[0], loss_fn=mse, token_mask=None, progress=False)
    c = gradient_scales(net, [("0", net[0])], batches, config, mse)
    with torch.no_grad():
        r2 = torch.cat([(net(x) - y).pow(2) for x, y in batches]).double().mean()
    torch.testing.assert_close(c["0"], (4 * net[0].weight.detach().double()[0] ** 2 * r2).pow(0.25).float(), rtol=1e-5, atol=0)
    assert set(seen) == {"tuple"}
    mlp = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
    sparsify_activations(mlp, batches, {TargetScope(types=[nn.Linear]): 0.5}, allocation="auto", calibration=config)
    levels = {n: sparsifier_state(m).target for n, m in sparsified_layers(mlp)}
    assert (96 * levels["0"] + 16 * levels["2"]) / 112 == pytest.approx(0.5, abs=1e-3)  # weight elements: a byte budget


def test_plain_recalibration_of_a_weight_aware_model_warns_that_the_score_is_gone():
    """calibrate_activation_sparsity (what the callback's recalibrations and the sweep call) replaces a per-channel
    threshold by one value, i.e. the score by plain |x|: it did so silently; now a UserWarning names the layers. The
    layers then sit at their targets by |x|, and a second recalibration (nothing per-channel left) is silent."""
    import warnings

    from pl_actsparse import calibrate_activation_sparsity

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    data = [torch.randn(64, 16) for _ in range(2)]
    sparsify_activations_weight_aware(net, data, {TargetScope(names=["0", "2"]): 0.5}, calibration=QUIET)
    with pytest.warns(UserWarning, match=r"per-channel \(weight-aware\) thresholds of \['0', '2'\] are now one value each \(plain \|x\|\)"):
        calibrate_activation_sparsity(net, data, calibration=QUIET)
    for i in (0, 2):
        t = net[i].activation_threshold
        assert bool((t == t[0]).all())
    assert all(abs(s - 0.5) < 0.01 for s in _achieved(net, data).values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate_activation_sparsity(net, data, calibration=QUIET)


@pytest.mark.parametrize("score", ["weight", "fisher"])
def test_weight_aware_on_a_tied_lm_head_keeps_the_embedding_and_every_target(score):
    """GPT-2 ties lm_head.weight to the token embedding: rescaling it in place for the score rescaled the embedding
    too during calibration, so every layer missed its target (0.49-0.57 for 0.5) silently. Each selected layer now
    gets its own scaled Parameter meanwhile; afterwards the tie and every weight are as they were."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    sparsify_activations_weight_aware(model, data, {TargetScope(patterns=[r".*(c_fc|c_proj|lm_head)"]): 0.5}, score=score, calibration=QUIET)
    achieved = _achieved(model, data)
    assert len(achieved) == 7 and all(abs(s - 0.5) < 0.005 for s in achieved.values()), achieved
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)


if __name__ == "__main__":  # pragma: no cover
    _worker(Path(sys.argv[1]), int(sys.argv[2]))
