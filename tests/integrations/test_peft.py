"""peft LoRA/DoRA adapters and activation sparsity (issue 12 item 2).

The seed patterns on a peft model mean "the input of the adapted projection": the base layer and every adapter
branch receive the same thresholded input, ``merge_and_unload()`` gives a plain sparsified Linear whose outputs
equal the trained model's, and export to the sparse kernels works after merging.
"""

from __future__ import annotations

import copy

import pytest
import torch

from pl_actsparse import TargetScope, calibrate_activation_sparsity, remove_activation_sparsity, sparsify_activations
from pl_actsparse.core.layer import sparsified_layers, sparsifier_state
from pl_actsparse.api import load_activation_sparsity, plan_activation_sparsity
from pl_actsparse.integrations.peft import AdapterInputHook, adapter_map
from pl_actsparse.core.layer import SparseActivationLinear
from pl_actsparse.errors import UnsupportedModuleError
from pl_actsparse.export.linear import SparseInferenceLinear
from pl_actsparse.export.convert import export_for_inference
from pl_actsparse.measure.metric import ActivationSparsity
from tiny_models import tiny_hf_llama, worst_achieved_miss

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

SEED = {TargetScope(patterns=[".*up_proj", ".*gate_proj"]): 0.3, TargetScope(patterns=[".*down_proj"]): 0.5}
PREFIX = "base_model.model.model.layers"


def _data(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 16), generator=g) for _ in range(n)]


def _lora(model=None, *, dora=False, random_b=True, targets=("up_proj", "down_proj")):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=list(targets), use_dora=dora, init_lora_weights=not random_b
    )
    return peft.get_peft_model(model if model is not None else tiny_hf_llama(), config)


def _closest_reachable_miss(x, target):
    """Smallest |fraction - target| over the zeroed fractions a threshold can give on ``x``: 0, and
    ``#{|x| <= v} / n`` for each value ``v`` (ties, e.g. exact zeros after an activation, move together)."""
    a = x.abs().flatten().sort().values
    _, counts = torch.unique_consecutive(a, return_counts=True)
    fractions = torch.cat([torch.zeros(1, dtype=torch.float64), counts.cumsum(0).double() / a.numel()])
    return float((fractions - target).abs().min())


def _inputs_of(modules, run):
    """The token inputs ``[batch, seq, features]`` each module received while ``run()`` ran (DoRA also calls
    ``lora_A`` on an identity matrix to form its weight norm: not a token input, left out)."""
    seen = {id(m): [] for m in modules}

    def record(mod, args):
        if args[0].dim() == 3:
            seen[id(mod)].append(args[0].detach())

    handles = [m.register_forward_pre_hook(record) for m in modules]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return [torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[id(m)]]) for m in modules]


def _logits(model, batches):
    with torch.no_grad():
        return [model(input_ids=b).logits for b in batches]


def _zero_fraction(t: torch.Tensor) -> float:
    return float(t.eq(0).double().mean())


def test_lora_branches_receive_the_thresholded_input_at_the_target():
    model = _lora()
    data = _data()
    sparsify_activations(model, data, SEED, calibration={"progress": False})
    names = [n for n, _ in sparsified_layers(model)]
    assert f"{PREFIX}.0.mlp.up_proj.base_layer" in names and f"{PREFIX}.0.mlp.gate_proj" in names
    assert not any("lora_" in n for n in names) and len(names) == 6

    up = model.base_model.model.model.layers[0].mlp.up_proj
    down = model.base_model.model.model.layers[1].mlp.down_proj
    base_in, a_in, down_a_in = _inputs_of(
        [up.base_layer, up.lora_A["default"], down.lora_A["default"]], lambda: _logits(model, data)
    )
    # base layer and LoRA branch get the very same thresholded input, at the target on the calibration data
    assert torch.equal(base_in, a_in)
    n = a_in.numel()
    assert _zero_fraction(a_in) == pytest.approx(0.3, abs=1.0 / n + 1e-9)
    assert _zero_fraction(down_a_in) == pytest.approx(0.5, abs=1.0 / down_a_in.numel() + 1e-9)

    # the tracked metric sees each adapted projection once, on its raw input
    metric = ActivationSparsity.from_model(model)
    with metric.observe(model):
        _logits(model, data)
    values = metric.compute()
    assert float(values[f"{PREFIX}.0.mlp.up_proj.base_layer/sparsity"]) == pytest.approx(0.3, abs=1e-3)
    assert int(metric.elements[metric.layers.index(f"{PREFIX}.0.mlp.up_proj.base_layer")]) == n


@pytest.mark.parametrize(
    "patterns",
    [
        [".*up_proj"],  # the seed pattern: the wrapper
        [r".*up_proj\.base_layer"],  # the base layer, as in the issue
        [".*up_proj.*"],  # the NNCF-style pattern: the wrapper's whole subtree
    ],
)
def test_patterns_on_a_peft_model_all_mean_the_adapted_projection(patterns):
    model = _lora()
    plan = plan_activation_sparsity(model, {TargetScope(patterns=patterns): 0.3})
    assert list(plan.targets) == [f"{PREFIX}.{i}.mlp.up_proj.base_layer" for i in range(2)]
    if patterns == [".*up_proj.*"]:  # lora_A/lora_B matched too: listed as skipped, with the reason
        skipped = dict(plan.skipped)
        for branch in ("lora_A.default", "lora_B.default"):
            assert "branch of the adapter" in skipped[f"{PREFIX}.0.mlp.up_proj.{branch}"]
    # the same thresholds as the seed pattern on the same model
    a, b = _lora(), _lora()
    sparsify_activations(a, _data(), {TargetScope(patterns=patterns): 0.3}, calibration={"progress": False})
    sparsify_activations(b, _data(), {TargetScope(patterns=[".*up_proj"]): 0.3}, calibration={"progress": False})
    assert {n: float(m.activation_threshold) for n, m in sparsified_layers(a)} == {
        n: float(m.activation_threshold) for n, m in sparsified_layers(b)
    }


def test_exact_name_of_a_lora_branch_is_refused_with_the_projection_to_name():
    model = _lora()
    with pytest.raises(UnsupportedModuleError, match=r"branch of the adapter .*0\.mlp\.up_proj'"):
        plan_activation_sparsity(model, {TargetScope(names=[f"{PREFIX}.0.mlp.up_proj.lora_A.default"]): 0.3})
    # an exact wrapper name is the adapted projection
    plan = plan_activation_sparsity(model, {TargetScope(names=[f"{PREFIX}.0.mlp.up_proj"]): 0.3})
    assert list(plan.targets) == [f"{PREFIX}.0.mlp.up_proj.base_layer"]


def test_other_adapter_types_are_refused_not_silently_half_sparsified():
    config = peft.IA3Config(target_modules=["up_proj", "down_proj"], feedforward_modules=["down_proj"])
    model = peft.get_peft_model(tiny_hf_llama(), config)
    with pytest.raises(UnsupportedModuleError, match="only LoRA/DoRA"):
        plan_activation_sparsity(model, {TargetScope(patterns=[".*down_proj"]): 0.5})


def _train_lora(model, data, steps=3):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for i in range(steps):
        loss = model(input_ids=data[i % len(data)]).logits.float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("dora", [False, True])
def test_merge_and_unload_gives_a_plain_sparsified_linear_with_the_trained_outputs(dora):
    model = _lora(dora=dora, random_b=False)  # peft's default init: lora_B = 0, trained below
    data, held_out = _data(), _data(seed=5)
    sparsify_activations(model, data, SEED, calibration={"progress": False})
    _train_lora(model, data)
    up = model.base_model.model.model.layers[0].mlp.up_proj
    assert float(up.lora_B["default"].weight.detach().abs().max()) > 0  # the adapters learned something
    # the LoRA (and DoRA) branch sees the thresholded input during training too
    (a_in,) = _inputs_of([up.lora_A["default"]], lambda: _logits(model, data))
    assert _zero_fraction(a_in) == pytest.approx(0.3, abs=1e-3)
    trained = _logits(model, held_out)
    thresholds = {n.replace("base_model.model.", "").replace(".base_layer", ""): float(m.activation_threshold) for n, m in sparsified_layers(model)}

    merged = model.merge_and_unload()
    layers = dict(sparsified_layers(merged))
    assert {n: float(m.activation_threshold) for n, m in layers.items()} == thresholds
    assert all(type(m) is SparseActivationLinear for m in layers.values())
    assert not adapter_map(merged.named_modules())
    for got, want in zip(_logits(merged, held_out), trained):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    # without sparsity the merged model would differ: the check above is not vacuous
    dense_merged = copy.deepcopy(merged)
    remove_activation_sparsity(dense_merged)
    assert max(float((a - b).abs().max()) for a, b in zip(_logits(dense_merged, held_out), trained)) > 1e-3

    # export to the sparse kernels after merging
    export_for_inference(merged)
    assert isinstance(merged.model.layers[0].mlp.up_proj, SparseInferenceLinear)
    for got, want in zip(_logits(merged, held_out), trained):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_export_before_merging_is_refused():
    model = _lora()
    sparsify_activations(model, _data(), SEED, calibration={"progress": False})
    with pytest.raises(ValueError, match="merge_and_unload"):
        export_for_inference(model)


def test_removal_gives_the_peft_model_back_bit_for_bit():
    model = _lora()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = {n: type(m) for n, m in model.named_modules()}
    held_out = _data(seed=5)
    dense = _logits(model, held_out)
    sparsify_activations(model, _data(), SEED, calibration={"progress": False})
    assert sum(isinstance(h, AdapterInputHook) for m in model.modules() for h in m._forward_pre_hooks.values()) == 4
    assert max(float((a - b).abs().max()) for a, b in zip(_logits(model, held_out), dense)) > 1e-3
    remove_activation_sparsity(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert not any(isinstance(h, AdapterInputHook) for m in model.modules() for h in m._forward_pre_hooks.values())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(torch.equal(a, b) for a, b in zip(_logits(model, held_out), dense))


def test_remove_by_the_wrapper_pattern_and_load_into_a_fresh_peft_model():
    model = _lora()
    data, held_out = _data(), _data(seed=5)
    sparsify_activations(model, data, SEED, calibration={"progress": False})
    expected = _logits(model, held_out)
    state = model.state_dict()
    assert f"{PREFIX}.0.mlp.up_proj.base_layer.activation_threshold" in state

    fresh = _lora()
    load_activation_sparsity(fresh, state)
    for got, want in zip(_logits(fresh, held_out), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    (a_in,) = _inputs_of([fresh.base_model.model.model.layers[0].mlp.up_proj.lora_A["default"]], lambda: _logits(fresh, data))
    assert _zero_fraction(a_in) == pytest.approx(0.3, abs=1e-3)

    remove_activation_sparsity(fresh, TargetScope(patterns=[".*up_proj"]))
    left = [n for n, _ in sparsified_layers(fresh)]
    assert not any("up_proj" in n for n in left) and len(left) == 4


def test_peft_applied_after_sparsification_is_hooked_at_the_next_calibration():
    base = tiny_hf_llama()
    data = _data()
    sparsify_activations(base, data, SEED, calibration={"progress": False})
    model = _lora(base)  # wraps the already-sparsified Linear layers
    calibrate_activation_sparsity(model, data, calibration={"progress": False})
    up = model.base_model.model.model.layers[1].mlp.up_proj
    base_in, a_in = _inputs_of([up.base_layer, up.lora_A["default"]], lambda: _logits(model, data))
    assert torch.equal(base_in, a_in) and _zero_fraction(a_in) == pytest.approx(0.3, abs=1e-3)


def test_compiled_lora_model_has_no_graph_break():
    dynamo = pytest.importorskip("torch._dynamo")
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    dynamo.reset()
    counters.clear()
    model = _lora()
    data = _data()
    sparsify_activations(model, data, SEED, calibration={"progress": False})
    expected = _logits(model, data)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for _ in range(2):
        for got, want in zip(_logits(compiled, data), expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1 and sum(counters["graph_break"].values()) == 0
    dynamo.reset()


def test_lora_recipe_runs_and_merges_to_the_trained_sparse_model(tmp_path):
    from pathlib import Path

    from pl_actsparse.lightning.callback import ActivationSparsityCallback
    from pl_actsparse.lightning.cli import run

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "stories260k_lora.yaml"
    cli = run(
        [
            "fit",
            "--config",
            str(recipe),
            "trainer.max_steps=3",
            "trainer.log_every_n_steps=1",
            f"trainer.logger.init_args.save_dir={tmp_path}",
            "data.init_args.seq_len=32",
            "data.init_args.batch_size=4",
            "data.init_args.max_calibration_windows=8",
        ]
    )
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, ActivationSparsityCallback))
    assert [h["reason"] for h in cb.history] == ["start of fit", "end of training (make permanent)"]
    assert all(h["sparsity_after"] == pytest.approx(0.5, abs=1e-3) for h in cb.history)
    module = cli.model
    names = [n for n, _ in sparsified_layers(module)]
    assert len(names) == 15 and all(n.endswith("_proj.base_layer") for n in names)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)  # only the adapters trained

    batches = [x for x, _ in cli.datamodule.calibration_dataloader()]
    mlp = module.model.base_model.model.layers[2].mlp
    base_in, a_in = _inputs_of([mlp.down_proj.base_layer, mlp.down_proj.lora_A["default"]], lambda: [module(b) for b in batches])
    assert torch.equal(base_in, a_in) and _zero_fraction(a_in) == pytest.approx(0.5, abs=2e-3)

    held_out = [torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(3))]
    with torch.no_grad():
        trained = [module(b) for b in held_out]
        merged = module.merged_model()
        assert len(list(sparsified_layers(merged))) == 15 and not adapter_map(merged.named_modules())
        for got, want in zip([merged(b) for b in held_out], trained):
            torch.testing.assert_close(getattr(got, "logits", got), want, rtol=1e-5, atol=1e-5)


class _MLP(torch.nn.Module):
    def __init__(self, dim=16, hidden=24):
        super().__init__()
        self.up_proj = torch.nn.Linear(dim, hidden)
        self.down_proj = torch.nn.Linear(hidden, dim)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.gelu(self.up_proj(x)))


from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=20, deadline=None)
@given(
    # up < 1: at up = 1 every input of down_proj is the same per feature (up's bias only), a tie no threshold
    # splits, so down reaches only the closest fraction the ties allow (covered by the exactness tests)
    up=st.floats(0.0, 0.9),
    down=st.floats(0.0, 1.0),
    rank=st.integers(1, 4),
    dora=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(up=0.0, down=0.0, rank=1, dora=False, seed=15732)  # down_proj's input holds an exact zero of its own
def test_property_adapter_branches_and_merge_on_any_target_rank_and_variant(up, down, rank, dora, seed):
    torch.manual_seed(seed)
    model = peft.get_peft_model(
        _MLP(), peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["up_proj", "down_proj"], use_dora=dora, init_lora_weights=False)
    )
    calib = [torch.randn(4, 5, 16) for _ in range(3)]
    held_out = [torch.randn(4, 5, 16)]
    sparsify_activations(
        model, calib, {TargetScope(patterns=[".*up_proj"]): up, TargetScope(patterns=[".*down_proj.*"]): down}, calibration={"progress": False}
    )
    inner = model.base_model.model
    ins = _inputs_of(
        [inner.up_proj.base_layer, inner.up_proj.lora_A["default"], inner.down_proj.base_layer, inner.down_proj.lora_A["default"]],
        lambda: [model(x) for x in calib],
    )
    assert torch.equal(ins[0], ins[1]) and torch.equal(ins[2], ins[3])
    for x, target, name in ((ins[0], up, "up_proj"), (ins[2], down, "down_proj")):
        # exactly the calibrated fraction, which is the closest reachable to the target (continuous data: 1/n)
        calibrated = sparsifier_state(getattr(inner, name).base_layer).calibration_sparsity
        if target == 0.0:  # nothing is zeroed (threshold -inf); exact zeros of the input itself (gelu) stay
            assert float(getattr(inner, name).base_layer.activation_threshold) == float("-inf") and calibrated == 0.0
        else:
            assert _zero_fraction(x) == pytest.approx(calibrated, abs=1e-12)
        assert abs(calibrated - target) <= _closest_reachable_miss(x, target) + 1e-12
    with torch.no_grad():
        trained = [model(x) for x in held_out]
        merged = model.merge_and_unload()
        assert [n for n, _ in sparsified_layers(merged)] == ["up_proj", "down_proj"]
        torch.testing.assert_close(merged(held_out[0]), trained[0], rtol=1e-5, atol=1e-5)


def test_lora_on_gpt2_conv1d_thresholds_the_adapted_input_merges_and_exports():
    # GPT-2's c_fc is a Conv1D (a registered Linear-like type); its LoRA branches are Linear and must never be
    # picked alone: the seed pattern means the input of the adapted Conv1D, which lora_A receives thresholded
    transformers = pytest.importorskip("transformers")
    from pl_actsparse import export_for_inference

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).eval()
    model = peft.get_peft_model(gpt2, peft.LoraConfig(r=2, target_modules=["c_fc"], fan_in_fan_out=True, init_lora_weights=False)).eval()
    plan = plan_activation_sparsity(model, {TargetScope(patterns=[".*c_fc.*"]): 0.5})
    assert list(plan.targets) == ["base_model.model.transformer.h.0.mlp.c_fc.base_layer"]
    assert "branch of the adapter" in dict(plan.skipped)["base_model.model.transformer.h.0.mlp.c_fc.lora_A.default"]
    x = torch.randint(0, 64, (4, 16))
    sparsify_activations(model, [x], {TargetScope(patterns=[".*c_fc.*"]): 0.5}, calibration={"progress": False})
    wrapper = model.base_model.model.transformer.h[0].mlp.c_fc
    ins = _inputs_of([wrapper.base_layer, wrapper.lora_A["default"]], lambda: model(x))
    assert torch.equal(ins[0], ins[1])
    assert abs(_zero_fraction(ins[1]) - 0.5) <= 1.0 / ins[1].numel() + 1e-12
    with torch.no_grad():
        trained = model(x).logits
        merged = model.merge_and_unload().eval()
        assert torch.allclose(merged(x).logits, trained, atol=2e-6)
        export_for_inference(merged)
        assert torch.allclose(merged(x).logits, trained, atol=2e-6)

def test_lora_adapters_share_the_base_threshold_and_set_adapter_needs_a_recalibration():
    # docs/integrations.md: the threshold is calibrated with the adapters active then; another adapter moves it off
    lora = lambda: peft.LoraConfig(r=4, target_modules=["up_proj", "down_proj", "gate_proj"], init_lora_weights=False)  # noqa: E731
    model = peft.get_peft_model(tiny_hf_llama(), lora(), adapter_name="a")
    model.add_adapter("b", lora())
    data = _data()
    sparsify_activations(model, data, {TargetScope(patterns=[r".*mlp\..*"]): 0.5}, calibration={"progress": False})

    worst = lambda: worst_achieved_miss(model, data)  # noqa: E731

    assert worst() == 0.0
    model.set_adapter("b")
    assert worst() == pytest.approx(0.016, abs=0.005)
    calibrate_activation_sparsity(model, data, calibration={"progress": False})
    assert worst() == 0.0
