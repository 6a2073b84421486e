"""The decode demo: ``python -m pl_actsparse.demos generate`` and :func:`pl_actsparse.demos.generate.compare_decoding`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from pl_actsparse import TargetScope, sparsify_activations
from pl_actsparse.demos.__main__ import main
from pl_actsparse.demos.generate import DecodeComparison, compare_decoding
from pl_actsparse.measure.metric import DecodeSparsity
from pl_actsparse.export.linear import SparseInferenceLinear
from pl_actsparse.export.convert import export_for_inference
from pl_actsparse.kernels import cpu as kcpu
from pl_actsparse.demos.llama2c import Llama2cTokenizer, load_llama2c_checkpoint

RECIPE = str(Path(__file__).resolve().parents[2] / "recipes" / "stories260k_training_free.yaml")
SMALL = ["data.init_args.calibration_stories=[500,504]", "trainer.logger=false"]


@pytest.fixture(scope="module")
def tokenizer():
    return Llama2cTokenizer.from_file()


@pytest.fixture(scope="module")
def calibration(tokenizer):
    from pl_actsparse.demos.tinystories import TokenWindows, load_stories

    windows = TokenWindows(load_stories(None, 500, 504), tokenizer, seq_len=64)
    return [windows[i][None] for i in range(len(windows))]


def _exported(calibration, sparsity_by_pattern):
    model = load_llama2c_checkpoint()
    recipe = {TargetScope(patterns=[p]): s for p, s in sparsity_by_pattern.items()}
    sparsify_activations(model, calibration, recipe, calibration={"progress": False})
    return export_for_inference(model)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_sparsity_zero_gives_the_dense_text(tokenizer, calibration, backend):
    kcpu.set_backend(backend)
    try:
        dense = load_llama2c_checkpoint()
        sparse = _exported(calibration, {r".*_proj": 0.0})
        res = compare_decoding(dense, sparse, tokenizer, "Once upon a time", 60, repeats=1)
    finally:
        kcpu.set_backend(None)
    assert res.identical and res.first_difference is None
    assert res.dense.text == res.sparse.text and res.dense.text.startswith("Once upon a time")
    assert res.dense.new_tokens == len(res.dense.token_ids) > 10
    assert res.exported_layers == 35 and res.sparse.decode_sparsity == pytest.approx(0.0, abs=1e-3)
    assert len(res.dense.seconds) == 1 and res.speedup > 0
    assert "identical to the dense text" in str(res)


def test_recipe_sparsity_is_achieved_while_decoding(tokenizer, calibration):
    dense = load_llama2c_checkpoint()
    sparse = _exported(calibration, {r".*mlp\.(gate|up)_proj": 0.3, r".*down_proj": 0.5})
    res = compare_decoding(dense, sparse, tokenizer, "Lily and Ben", 80, repeats=2)
    # 10 layers of 64 inputs at 30%, 5 of 172 at 50%: the input-weighted mean target is 0.40
    assert res.sparse.decode_sparsity == pytest.approx(0.40, abs=0.06)
    assert res.dense.decode_sparsity is None and len(res.sparse.seconds) == 2
    d = res.to_dict()
    assert json.loads(json.dumps(d))["sparse"]["new_tokens"] == res.sparse.new_tokens
    assert d["identical"] == (res.dense.token_ids == res.sparse.token_ids)
    if not res.identical:
        i = res.first_difference
        assert res.dense.token_ids[:i] == res.sparse.token_ids[:i]


def test_decode_sparsity_probe_counts_single_token_calls_only(calibration):
    model = _exported(calibration, {r".*down_proj": 0.5})
    layers = [m for m in model.modules() if isinstance(m, SparseInferenceLinear)]
    with DecodeSparsity(model) as probe:
        with torch.inference_mode():
            model(torch.tensor([[1, 20, 30]]))  # prefill: 3 tokens, not counted
    assert probe.fraction is None and len(probe.layers) == len(layers) == 5
    with DecodeSparsity(model) as probe:
        model.generate(torch.tensor([[1]]), 5)
    assert probe.total == 5 * 5 * 172 and 0.3 < probe.fraction < 0.7
    assert all(not m._forward_pre_hooks for m in layers)  # hooks removed


def test_compare_decoding_rejects_bad_arguments(tokenizer):
    m = load_llama2c_checkpoint()
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int, got 0"):
        compare_decoding(m, m, tokenizer, "x", 0)
    with pytest.raises(ValueError, match="repeats must be a positive int, got 0"):
        compare_decoding(m, m, tokenizer, "x", 5, repeats=0)
    with pytest.raises(TypeError, match="sparse_model .*Linear.* has no generate"):
        compare_decoding(m, torch.nn.Linear(2, 2), tokenizer, "x", 5)


def test_datamodule_tokenizer_is_the_data_folders(tokenizer):
    from pl_actsparse.demos.lightning_models import TinyStoriesDataModule

    dm = TinyStoriesDataModule(calibration_stories=(500, 502))
    assert dm.tokenizer is dm.tokenizer  # loaded once
    assert dm.tokenizer.encode("Once upon a time") == tokenizer.encode("Once upon a time")
    assert dm.tokenizer.decode(dm.tokenizer.encode("Tom had a dog.")) == "Tom had a dog."


def test_cli_generate_at_sparsity_zero_and_at_the_recipe(capsys):
    main(["generate", "--config", RECIPE, "--sparsity", "0", "--max-new-tokens", "40", "--repeats", "1", "--json", *SMALL])
    zero = json.loads(capsys.readouterr().out)
    assert zero["identical"] and zero["dense"]["text"] == zero["sparse"]["text"]
    assert zero["exported_layers"] == 15 and zero["sparse"]["decode_sparsity"] == pytest.approx(0.0, abs=1e-3)

    main(["generate", "--config", RECIPE, "--prompt", "Tom had a dog", "--max-new-tokens", "40", "--repeats", "1", *SMALL])
    out = capsys.readouterr().out
    assert "prompt: 'Tom had a dog'" in out and "--- dense:" in out and "--- sparse:" in out
    assert "tokens/s" in out and "of sparse-layer inputs zero" in out and "x dense (15 exported layers" in out


def test_generate_calibrates_with_the_recipes_calibration_options(monkeypatch, capsys):
    """The demo builds its CalibrationConfig from the recipe, as validate does: no option is dropped."""
    import pl_actsparse.api as api

    seen = {}
    real = api.sparsify_activations
    monkeypatch.setattr(api, "sparsify_activations", lambda *a, **k: seen.update(k) or real(*a, **k))
    options = '{"method": "sequential", "offload": "cpu", "token_mask": null, "num_batches": 1, "max_batches_in_flight": 1}'
    main(["generate", "--config", RECIPE, "--max-new-tokens", "4", "--repeats", "1", "--json", *SMALL,
          f"--trainer.callbacks.init_args.calibration={options}"])
    assert json.loads(capsys.readouterr().out)["exported_layers"] == 15
    config = seen["calibration"]
    assert (config.method, config.offload, config.token_mask, config.max_batches_in_flight) == ("sequential", "cpu", None, 1)
    assert config.num_batches == 1 and callable(config.transform_fn)


def test_cli_generate_errors(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["generate", "--config", RECIPE, "--sparsity", "1.5"])
    assert "--sparsity must be in [0, 1], got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x"])
    assert "--config" in capsys.readouterr().err
    bare = tmp_path / "no_callback.yaml"
    bare.write_text(
        "model:\n  class_path: pl_actsparse.demos.lightning_models.TinyStoriesLM\n"
        "data:\n  class_path: pl_actsparse.demos.lightning_models.TinyStoriesDataModule\n"
    )
    with pytest.raises(SystemExit, match="must configure one ActivationSparsityCallback, found 0"):
        main(["generate", "--config", str(bare), "trainer.logger=false"])


@pytest.mark.parametrize(
    "argv, line",
    [  # bad values and missing files: one line naming the demo, the value and what is valid, status 2
        (["bogus"], "python -m pl_actsparse.demos: error: unknown demo 'bogus'; choose run, generate, sweep or report"),
        (["run", "--data", "/nonexistent"], "python -m pl_actsparse.demos run: error: pl_actsparse data directory not found: /nonexistent"),
        (["sweep", "--targets", "0.5", "1.5", "--plot", "", "--json", "-"],
         "python -m pl_actsparse.demos sweep: error: target sparsity for a sweep point must be in [0, 1], got 1.5"),
        (["sweep", "--patterns", ".*nothing", "--targets", "0.5", "--plot", "", "--json", "-"],
         "python -m pl_actsparse.demos sweep: error: these scope entries match no nn.Linear"),
    ],
)
def test_demo_errors_are_one_line_with_status_2(capsys, argv, line):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1].startswith(line), err


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_hugging_face_llama_export_and_generate(backend):
    """The export is not tied to our llama2.c model: a transformers LlamaForCausalLM, sparsified with
    the seed patterns and exported, decodes through HF's own generate() (KV cache, one token per step)."""
    from tiny_models import tiny_hf_llama

    dense = tiny_hf_llama(vocab=96, hidden=64, intermediate=160)
    calib = [{"input_ids": torch.randint(0, 96, (2, 32))} for _ in range(2)]
    prompt = torch.randint(0, 96, (1, 6))
    kcpu.set_backend(backend)
    try:
        for sparsity in (0.0, 0.5):
            model = copy.deepcopy(dense)
            recipe = {TargetScope(patterns=[r".*mlp\.(gate|up|down)_proj"]): sparsity}
            sparsify_activations(model, calib, recipe, calibration={"progress": False})
            with torch.no_grad():
                ref_logits = model(prompt).logits
            export_for_inference(model)
            assert sum(isinstance(m, SparseInferenceLinear) for m in model.modules()) == 6
            with torch.no_grad():
                torch.testing.assert_close(model(prompt).logits, ref_logits, rtol=1e-4, atol=1e-4)
                kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
                out = model.generate(prompt, **kw)
                want = dense.generate(prompt, **kw)
            assert out.shape == (1, 18)
            if sparsity == 0.0:
                assert torch.equal(out, want)
            else:
                with DecodeSparsity(model) as probe, torch.no_grad():
                    model.generate(prompt, **kw)
                assert probe.fraction == pytest.approx(0.5, abs=0.15)
    finally:
        kcpu.set_backend(None)


@pytest.mark.parametrize("threads, words", [(1, "1 thread)"), (4, "4 threads)")])
def test_demo_summary_says_thread_or_threads(threads, words):
    from pl_actsparse.demos.generate import DecodeRun

    run = DecodeRun(label="dense", text="x", token_ids=[1], new_tokens=1, seconds=[0.5])
    text = str(DecodeComparison(prompt="p", dense=run, sparse=run, exported_layers=3, threads=threads))
    assert text.endswith(f"speed 1.00x dense (3 exported layers, {words}")
