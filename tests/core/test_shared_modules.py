"""A module called several times per forward (weight tying, shared blocks) is calibrated over every call."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings, strategies as st
from torch import nn

from pl_actsparse.core.layer import sparsifier_state
from pl_actsparse import TargetScope, activation_sparsity_report, calibrate_activation_sparsity, sparsify_activations
from pl_actsparse.errors import CalibrationConvergenceError

from tiny_models import best_reachable

pytestmark = pytest.mark.usefixtures("one_thread")


def all_call_inputs(model, names, batches, call=lambda m, b: m(b)):
    """Every call's input (before zeroing) of each named layer, flattened to [tokens, features]."""
    modules = dict(model.named_modules())
    seen = {n: [] for n in names}
    hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach())) for n in names]
    with torch.no_grad():
        for b in batches:
            call(model, b)
    for h in hooks:
        h.remove()
    return {n: [x.reshape(-1, x.shape[-1]) for x in v] for n, v in seen.items()}


def achieved_over_all(module, xs):
    x = torch.cat(xs)
    return float((x.abs() <= module.activation_threshold).double().mean()), x


def test_issue_case_every_call_counts():
    """lin used twice: 0.5 of ALL its inputs are zeroed, not 0.25/0.71 with only the first call calibrated."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    net = nn.Sequential(lin, nn.GELU(), lin)
    data = [torch.randn(32, 8)]
    sparsify_activations(net, data, {TargetScope(names=["0"]): 0.5}, calibration={"progress": False})
    xs = all_call_inputs(net, ["0"], data)["0"]
    assert len(xs) == 2
    achieved, x = achieved_over_all(lin, xs)
    assert achieved == pytest.approx(best_reachable(x.abs(), 0.5), abs=1e-12)
    assert achieved == pytest.approx(0.5, abs=1 / 512)
    assert sparsifier_state(lin).calibration_elements == 512  # both calls, every element
    assert lin._actsparse.calibration_sparsity == pytest.approx(achieved, abs=1e-12)
    report = calibrate_activation_sparsity(net, data, calibration={"progress": False})
    st_ = report.statistics["0"]
    assert (st_.calls, st_.elements, st_.zeroed) == (2, 512, 256)
    assert st_.rounds >= 2
    row = activation_sparsity_report(net).layers[0]
    assert row.calibration_sparsity == pytest.approx(0.5)


def test_repeated_layer_with_other_layers_sparsified_in_between():
    """All layers sparsified: the shared one over its 3 calls, the one in between over its inputs."""
    torch.manual_seed(1)
    shared, mid = nn.Linear(16, 16), nn.Linear(16, 16)
    net = nn.Sequential(shared, nn.GELU(), mid, nn.Tanh(), shared, nn.GELU(), shared)
    data = [torch.randn(24, 16) for _ in range(3)]
    sparsify_activations(net, data, {TargetScope(names=["0"]): 0.4, TargetScope(names=["2"]): 0.6}, calibration={"progress": False})
    seen = all_call_inputs(net, ["0", "2"], data)
    assert len(seen["0"]) == 9 and len(seen["2"]) == 3
    for name, target, module in (("0", 0.4, shared), ("2", 0.6, mid)):
        achieved, x = achieved_over_all(module, seen[name])
        assert achieved == pytest.approx(best_reachable(x.abs(), target), abs=1e-12), name
        assert sparsifier_state(module).calibration_elements == x.numel()


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    calls=st.integers(1, 4),
    target=st.floats(0.05, 0.95),
    dtype=st.sampled_from(["float32", "bfloat16"]),
)
@example(seed=0, calls=4, target=0.662109375, dtype="float32")  # count jumps 317 -> 320 over 318 of 480: used to run out of passes and raise
def test_property_every_call_counts(seed, calls, target, dtype):
    """Any number of calls, any target, fp32 and bf16: the achieved fraction over all calls is the reachable
    fraction closest to the target, or a warning says that the fraction jumps over the target there."""
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    torch.manual_seed(seed)
    lin = nn.Linear(6, 6).to(dt)
    net = nn.Sequential(*([lin, nn.Tanh()] * calls))
    data = [torch.randn(10, 6, generator=g).to(dt) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsify_activations(net, data, {TargetScope(names=["0"]): target}, calibration={"progress": False})
    achieved, x = achieved_over_all(lin, all_call_inputs(net, ["0"], data)["0"])
    assert sparsifier_state(lin).calibration_elements == x.numel() == 2 * 10 * 6 * calls
    assert sparsifier_state(lin).calibration_sparsity == pytest.approx(achieved, abs=1e-12)
    exact = achieved == pytest.approx(best_reachable(x.abs(), target), abs=1e-12)
    jumped = any("jumps over the target" in str(w.message) and "'0'" in str(w.message) for w in caught)
    assert exact or jumped


def _tiny_albert():
    import transformers

    config = transformers.AlbertConfig(
        hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=3, embedding_size=16,
        vocab_size=128,
    )
    torch.manual_seed(0)
    return transformers.AlbertModel(config).eval()


def _albert_batches(all_lengths=([10, 6], [8, 3])):
    g = torch.Generator().manual_seed(2)
    batches = []
    for lengths in all_lengths:
        ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
        mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
        for i, n in enumerate(lengths):
            ids[i, :n] = torch.randint(1, 128, (n,), generator=g)
            mask[i, :n] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


ALBERT = "encoder.albert_layer_groups.0.albert_layers.0."
ALBERT_NAMES = [ALBERT + "ffn", ALBERT + "ffn_output", ALBERT + "attention.query"]
ALBERT_RECIPE = {TargetScope(names=ALBERT_NAMES[:2]): 0.5, TargetScope(names=ALBERT_NAMES[2:]): 0.3}


def test_tied_albert_layers_with_padding():
    """ALBERT shares one layer across depth (3 calls per forward); padded batches count real tokens only."""
    pytest.importorskip("transformers")
    model = _tiny_albert()
    batches = _albert_batches()
    names = ALBERT_NAMES
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact: no fallback warning
        sparsify_activations(model, batches, ALBERT_RECIPE, calibration={"progress": False})
    seen = all_call_inputs(model, names, batches, call=lambda m, b: m(**b))
    modules = dict(model.named_modules())
    for name in names:
        real = [x[b["attention_mask"].bool().reshape(-1)] for x, b in zip(seen[name], [b for b in batches for _ in range(3)])]
        achieved, x = achieved_over_all(modules[name], real)
        target = 0.3 if name.endswith("query") else 0.5
        assert len(seen[name]) == 6  # 3 calls x 2 batches
        assert x.shape[0] == 3 * (10 + 6 + 8 + 3)
        assert achieved == pytest.approx(best_reachable(x.abs(), target), abs=1e-12), name
        assert sparsifier_state(modules[name]).calibration_elements == x.numel()


DDP_LENGTHS = ([10, 6], [8, 3], [5, 9], [7, 2])


class SharedBlockLM(nn.Module):
    """Token ids -> features through one block applied 3 times (weights tied across depth)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(128, 16)
        self.block = nn.Linear(16, 16)
        self.mid = nn.Linear(16, 16)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        for _ in range(3):
            h = h + self.mid(torch.tanh(self.block(h)))
        return h


DDP_RECIPE = {TargetScope(names=["block"]): 0.5, TargetScope(names=["mid"]): 0.3}


def _ddp_rank(rank: int, out: str) -> None:  # pragma: no cover - runs in spawned processes
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        model = SharedBlockLM()
        mine = _albert_batches(DDP_LENGTHS)[rank::2]
        report = calibrate_activation_sparsity(
            sparsify_activations(model, mine, DDP_RECIPE, calibration={"progress": False}), mine, calibration={"progress": False}
        )
        torch.save({n: (m.activation_threshold.clone(), report.statistics[n].elements, report.statistics[n].zeroed)
                    for n, m in model.named_modules() if hasattr(m, "_actsparse")}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_padded_repeated_layers_agree_with_one_process(tmp_path):
    """2 gloo ranks, each with half of the padded batches, solve the repeated layers together: identical
    thresholds and statistics on both ranks, equal to one process calibrating on the union."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), str(Path(__file__).parent), str(Path(__file__).resolve().parents[1])]))
    code = (
        "import torch.multiprocessing as mp, test_shared_modules as t;"
        f"mp.spawn(t._ddp_rank, args=({str(tmp_path)!r},), nprocs=2, join=True)"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    single = SharedBlockLM()
    batches = _albert_batches(DDP_LENGTHS)
    report = calibrate_activation_sparsity(sparsify_activations(single, batches, DDP_RECIPE, calibration={"progress": False}), batches, calibration={"progress": False})
    assert sorted(r0) == ["block", "mid"]
    modules = dict(single.named_modules())
    real_tokens = sum(map(sum, DDP_LENGTHS))
    for n in ("block", "mid"):
        assert torch.equal(r0[n][0], r1[n][0]) and r0[n][1:] == r1[n][1:], n
        assert torch.equal(r0[n][0], modules[n].activation_threshold), n
        assert r0[n][1:] == (report.statistics[n].elements, report.statistics[n].zeroed) == (3 * real_tokens * 16, r0[n][2])
        assert report.statistics[n].calls == 3


def test_no_fixed_point_within_the_passes_raises_and_restores(monkeypatch):
    import pl_actsparse.calibrate.fixed_point as fixed_point
    import pl_actsparse.calibrate.lockstep as cal

    monkeypatch.setitem(cal.calibrate_layers.__kwdefaults__, "max_rounds", 1)
    monkeypatch.setattr(fixed_point, "COUPLED_TOLERANCE", 0.0)  # any miss is an error
    torch.manual_seed(0)
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    net = nn.Sequential(a, nn.GELU(), b, nn.GELU(), a, nn.GELU(), b)
    data = [torch.randn(64, 8)]
    with pytest.raises(CalibrationConvergenceError, match="called several times per forward"):
        sparsify_activations(net, data, {TargetScope(names=["0", "2"]): 0.5}, calibration={"progress": False})
    assert type(a) is nn.Linear and type(b) is nn.Linear  # restored, nothing left installed
    assert "activation_threshold" not in a._buffers


def _zeroed_over_all_calls(net, lin, data, tau):
    """Pin ``lin`` at ``tau`` and count the zeroed elements over every call (inputs produced under tau)."""
    saved = lin.activation_threshold.clone()
    lin.activation_threshold.fill_(tau)
    try:
        xs = all_call_inputs(net, ["0"], data)["0"]
        x = torch.cat(xs)
        return int((x.abs() <= lin.activation_threshold).sum()), x
    finally:
        lin.activation_threshold.copy_(saved)


def test_a_jump_over_the_target_is_warned_and_the_closer_side_kept():
    """A layer that moves its own later inputs can make the zeroed count jump over the target: no threshold
    is a fixed point; the closer side is kept and a warning gives the figures (never a silent miss)."""
    g = torch.Generator().manual_seed(17)
    torch.manual_seed(17)
    lin = nn.Linear(6, 6)
    net = nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh())
    data = [torch.randn(10, 6, generator=g) for _ in range(2)]
    with pytest.warns(UserWarning, match=r"'0' is called 2 times per forward; its zeroed fraction over all calls jumps"):
        sparsify_activations(net, data, {TargetScope(names=["0"]): 0.37}, calibration={"progress": False})
    tau = float(lin.activation_threshold)
    want = 0.37 * 240
    z, x = _zeroed_over_all_calls(net, lin, data, tau)
    assert z == round(sparsifier_state(lin).calibration_sparsity * 240)
    assert best_reachable(x.abs(), 0.37) * 240 != z  # not a fixed point: its own inputs would want another tau
    above = float(torch.nextafter(torch.tensor(tau), torch.tensor(float("inf"))))
    below = float(torch.nextafter(torch.tensor(tau), torch.tensor(0.0)))
    for neighbour in (above, below):  # the adjacent thresholds land no closer to the target
        zn, _ = _zeroed_over_all_calls(net, lin, data, neighbour)
        assert abs(zn - want) >= abs(z - want)


def test_coupled_layers_without_exact_fixed_point_keep_the_closest_pass_with_a_warning(monkeypatch):
    """Same coupled pair (exact after 5 passes), 4 passes allowed: the last one misses the fixed points by 1 and
    2 of 1024 elements; it is kept and the warning gives each layer's achieved and best reachable fraction."""
    import pl_actsparse.calibrate.fixed_point as fixed_point
    import pl_actsparse.calibrate.lockstep as cal

    monkeypatch.setitem(cal.calibrate_layers.__kwdefaults__, "max_rounds", 3)
    torch.manual_seed(0)
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    net = nn.Sequential(a, nn.GELU(), b, nn.GELU(), a, nn.GELU(), b)
    data = [torch.randn(64, 8)]
    with pytest.warns(UserWarning, match=r"no pass hit every fixed point exactly.*'0': achieved 0\.\d+ over 1024 elements"):
        sparsify_activations(net, data, {TargetScope(names=["0", "2"]): 0.5}, calibration={"progress": False})
    seen = all_call_inputs(net, ["0", "2"], data)
    for name, m in (("0", a), ("2", b)):
        achieved, x = achieved_over_all(m, seen[name])
        assert sparsifier_state(m).calibration_sparsity == pytest.approx(achieved, abs=1e-12)  # the kept pass is the real one
        assert abs(achieved - best_reachable(x.abs(), 0.5)) <= fixed_point.COUPLED_TOLERANCE
