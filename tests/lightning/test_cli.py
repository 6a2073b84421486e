"""The ``pl-actsparse`` console script and the recipes in recipes/, run as CI would: the YAML as it is, plus
command-line overrides that shrink the run to a few batches."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pl_actsparse import TargetScope, sparsify_activations
from pl_actsparse.core.layer import sparsified_layers, sparsifier_state
from pl_actsparse.lightning.callback import ActivationSparsityCallback
from pl_actsparse.lightning.cli import ActSparseCLI, main, run
from pl_actsparse.demos.llama2c import load_llama2c_checkpoint

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
TRAINING_FREE = str(RECIPES / "stories260k_training_free.yaml")
FINETUNE = str(RECIPES / "stories260k_finetune.yaml")
HF = str(RECIPES / "hf_llama_seed_patterns.yaml")


def _callback(cli) -> ActivationSparsityCallback:
    return next(c for c in cli.trainer.callbacks if isinstance(c, ActivationSparsityCallback))


def _thresholds(module) -> dict[str, float]:
    return {n: float(m.activation_threshold) for n, m in sparsified_layers(module)}


def test_recipes_are_valid_yaml_with_the_documented_targets():
    a = yaml.safe_load(Path(TRAINING_FREE).read_text())
    scopes = a["trainer"]["callbacks"][0]["init_args"]["scopes"]
    assert scopes == [{"patterns": [".*up_proj", ".*gate_proj"], "sparsity": 0.3}, {"patterns": [".*down_proj"], "sparsity": 0.5}]
    assert a["data"]["init_args"]["calibration_stories"] == [500, 600] and a["data"]["init_args"]["val_stories"] == [0, 150]
    b = yaml.safe_load(Path(FINETUNE).read_text())
    init = b["trainer"]["callbacks"][0]["init_args"]
    assert init["scopes"] == [{"patterns": [r".*mlp\.(gate|up|down)_proj"], "sparsity": 0.5}]
    assert init["recalibrate_every_n_epochs"] == 1
    train, calib, val = (b["data"]["init_args"][k] for k in ("train_stories", "calibration_stories", "val_stories"))
    assert val[1] <= calib[0] and calib[1] <= train[0]  # disjoint stories
    c = yaml.safe_load(Path(HF).read_text())
    assert c["model"]["class_path"] == "pl_actsparse.demos.lightning_models.HFLlamaLM"
    assert c["trainer"]["callbacks"][0]["init_args"]["scopes"] == scopes


def test_recipe_a_training_free_validation(caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="pl_actsparse")
    cli = run(
        [
            "validate",
            "--config",
            TRAINING_FREE,
            "trainer.logger=false",
            f"trainer.default_root_dir={tmp_path}",  # where LightningCLI saves config.yaml
            "trainer.limit_val_batches=2",
            "data.init_args.calibration_stories=[500,510]",
        ]
    )
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert metrics["val/ppl"] > metrics["val/ppl_dense"] > 1.0
    assert metrics["actsparse/calibration/sparsity"] == pytest.approx((10 * 0.3 + 5 * 0.5 * 172 / 64) / (10 + 5 * 172 / 64), abs=1e-4)
    assert 0.35 < metrics["actsparse/val/sparsity"] < 0.47
    # the callback reproduces the functional core exactly on the same calibration batches
    model = load_llama2c_checkpoint()
    batches = [x for x, _ in cli.datamodule.calibration_dataloader()]
    sparsify_activations(
        model,
        batches,
        {TargetScope(patterns=[".*up_proj", ".*gate_proj"]): 0.3, TargetScope(patterns=[".*down_proj"]): 0.5},
        calibration={"progress": False},
    )
    assert _thresholds(cli.model.model) == _thresholds(model)
    # the tables go to the pl_actsparse logger (rank 0), not to print
    out = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("pl_actsparse"))
    assert "activation sparsity calibrated" in out and "model.layers.4.mlp.down_proj" in out
    assert "achieved activation sparsity on the val data" in out


def test_recipe_b_finetune_then_test_from_checkpoint(tmp_path):
    small = [
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        f"trainer.logger.init_args.save_dir={tmp_path}",
        "data.init_args.seq_len=32",
        "data.init_args.batch_size=4",
        "data.init_args.eval_batch_size=4",
        "data.init_args.max_calibration_windows=8",
    ]
    cli = run(["fit", "--config", FINETUNE, *small])
    cb = _callback(cli)
    assert [h["reason"] for h in cb.history] == ["start of fit", "every 1 epoch(s)", "every 1 epoch(s)"]
    assert all(h["sparsity_after"] == pytest.approx(0.5, abs=1e-3) for h in cb.history)
    assert cb.history[1]["sparsity_before"] is not None
    assert {sparsifier_state(m).gradient_mode.value for _, m in sparsified_layers(cli.model)} == {"ste"}
    metrics = cli.trainer.callback_metrics
    assert "actsparse/train/distill_loss" in metrics and "actsparse/train/sparsity" in metrics and "actsparse/val/sparsity" in metrics
    last = next(tmp_path.rglob("last.ckpt"))
    thresholds = _thresholds(cli.model)

    tested = run(["test", "--config", FINETUNE, *small, "trainer.limit_test_batches=1", f"--ckpt_path={last}"])
    assert _thresholds(tested.model) == thresholds
    assert len(_callback(tested).history) == len(cb.history)  # restored, and nothing recalibrated
    assert "test/ppl" in tested.trainer.callback_metrics and "actsparse/test/sparsity" in tested.trainer.callback_metrics


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="recipe (c) needs the hf extra (transformers)")
def test_recipe_c_hugging_face_llama(tmp_path):
    cli = run(
        [
            "validate",
            "--config",
            HF,
            "trainer.logger=false",
            f"trainer.default_root_dir={tmp_path}",  # where LightningCLI saves config.yaml
            "trainer.limit_val_batches=1",
            "data.init_args.calibration_stories=[500,505]",
        ]
    )
    assert cli.datamodule.seq_len == 512  # ${model.init_args.config.max_position_embeddings}, resolved by omegaconf
    names = list(_thresholds(cli.model))
    assert names == [f"model.model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")]
    report = {n: sparsifier_state(m).calibration_sparsity for n, m in sparsified_layers(cli.model)}
    assert all(v == pytest.approx(0.3 if "down" not in n else 0.5, abs=1e-3) for n, v in report.items())
    assert "actsparse/val/sparsity" in cli.trainer.callback_metrics


def test_predict_subcommand_calibrates_first(tmp_path):
    cli = run(
        [
            "predict",
            "--config",
            TRAINING_FREE,
            "trainer.logger=false",
            f"trainer.default_root_dir={tmp_path}",
            "trainer.limit_predict_batches=1",
            "data.init_args.calibration_stories=[500,505]",
        ]
    )
    assert _callback(cli).history[0]["reason"] == "start of predict"
    predictions = cli.trainer.predict_loop.predictions
    assert len(predictions) == 1 and predictions[0]["nll"].shape == (len(cli.datamodule.dataset("predict")),)
    assert predictions[0]["next_tokens"].shape == (len(cli.datamodule.dataset("predict")), 256)


def _bad_recipe(tmp_path, edit) -> str:
    recipe = yaml.safe_load(Path(TRAINING_FREE).read_text())
    edit(recipe["trainer"]["callbacks"][0]["init_args"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(recipe))
    return str(bad)


def _set(key, value):
    return lambda init: init.__setitem__(key, value)


@pytest.mark.parametrize(
    "edit, key, message",
    [
        (lambda i: i["scopes"][1].__setitem__("sparsity", 1.5), "trainer.callbacks[0].init_args.scopes[1].sparsity",
         "target sparsity for scopes[1] must be in [0, 1], got 1.5"),
        (lambda i: i["scopes"].__setitem__(1, {"patterns": [".*down_proj"], "sparsty": 0.5}),
         "trainer.callbacks[0].init_args.scopes[1].sparsty", "scopes[1] has unknown key(s) ['sparsty']"),
        (_set("recalibrate_every_n_epoch", 1), "trainer.callbacks[0].init_args.recalibrate_every_n_epoch",
         "has no argument 'recalibrate_every_n_epoch' (did you mean 'recalibrate_every_n_epochs'?)"),
        (_set("calibration", {"num_batches": 0}), "trainer.callbacks[0].init_args.calibration.num_batches",
         "CalibrationConfig.num_batches must be a positive integer or None, got 0"),
        (_set("calibration", {"num_batch": 2}), "trainer.callbacks[0].init_args.calibration.num_batch",
         "unknown CalibrationConfig field(s) ['num_batch']"),
        (_set("calibration_source", "val"), "trainer.callbacks[0].init_args.calibration",
         "calibration_source='val' needs calibration.num_batches"),
        (lambda i: i["scopes"][0].__setitem__("patterns", ["("]), "trainer.callbacks[0].init_args.scopes[0]",
         "not a valid regular expression"),
    ],
)
def test_bad_recipe_values_fail_in_one_line_naming_the_yaml_key(tmp_path, capsys, edit, key, message):
    bad = _bad_recipe(tmp_path, edit)
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", bad, "trainer.logger=false", f"trainer.default_root_dir={tmp_path}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"pl-actsparse validate: error: {key}: ") and message in err[0]


@pytest.mark.parametrize(
    "edit, env, line",
    [  # errors only the built model or data can show: one line, status 2, before any calibration
        (lambda i: i["scopes"][1].__setitem__("patterns", [".*nothing_proj"]), None,
         "pl-actsparse validate: error: trainer.callbacks[0].init_args: these scope entries match no nn.Linear of the model"),
        (lambda i: None, "missing", "pl-actsparse validate: error: pl_actsparse data directory not found: "),
    ],
)
def test_recipe_errors_found_on_the_model_or_data_are_one_line(tmp_path, capsys, monkeypatch, edit, env, line):
    if env:
        monkeypatch.setenv("PL_ACTSPARSE_DATA", str(tmp_path / env))
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", _bad_recipe(tmp_path, edit), "trainer.logger=false", f"trainer.default_root_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1].startswith(line), err
    if env is None:  # what would be valid: the model's Linear layers
        assert "pattern '.*nothing_proj'; the model's nn.Linear layers (36): model.layers.0.self_attn.q_proj, " in err[-1]
    else:
        assert f"{tmp_path / env} ($PL_ACTSPARSE_DATA)" in err[-1]


def test_a_recipe_pattern_may_be_one_string_as_in_target_scope(tmp_path):
    bad = _bad_recipe(tmp_path, lambda i: i["scopes"][1].__setitem__("patterns", ".*down_proj"))
    cli = run(["--config", bad, "trainer.logger=false", f"trainer.default_root_dir={tmp_path}"], subcommand=False)
    assert list(_callback(cli).targets.items())[1] == (TargetScope(patterns=[".*down_proj"]), 0.5)


def test_instantiation_errors_of_the_callback_from_overrides_are_one_line_too(tmp_path, capsys):
    """A value given on the command line (not in the YAML) is caught when jsonargparse builds the callback."""
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", TRAINING_FREE, "trainer.logger=false", f"trainer.default_root_dir={tmp_path}",
              '--trainer.callbacks.init_args.calibration={"num_batches": 0}'])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert err == [
        "pl-actsparse validate: error: trainer.callbacks[0].init_args.calibration.num_batches: "
        "CalibrationConfig.num_batches must be a positive integer or None, got 0"
    ]


@pytest.mark.parametrize(
    "init_args, line",
    [
        ({"scopes": [{"class_path": "pl_actsparse.core.recipe.ScopeSpec", "init_args": {"patterns": ["x"], "sparsity": 1.5}}]},
         "error: trainer.callbacks[1].init_args.scopes[0].sparsity: target sparsity for scopes[0] must be in [0, 1], got 1.5"),
        ({"scopes": [{"patterns": ["x"], "sparsity": 0.5}], "on_train_end": "delete"},
         "error: trainer.callbacks[1].init_args.on_train_end: on_train_end must be one of 'keep', 'make_permanent', 'remove', got 'delete'"),
        ({"scopes": [{"patterns": ["x"], "sparsity": 0.5}], "calibration": {"transform_fn": "os.getcwd"}}, None),  # jsonargparse imports it
        ({"scopes": [{"patterns": ["x"], "sparsity": 0.5}], "schedule": {"class_path": "pl_actsparse.lightning.schedule.LinearRamp",
                                                                          "init_args": {"epochs": 2}}}, None),
        ({"scopes": [{"names": ["encoder.fc"], "sparsity": 0.5}], "on_train_end": "delete"},  # a dotted name is no import path
         "error: trainer.callbacks[1].init_args.on_train_end: on_train_end must be one of 'keep', 'make_permanent', 'remove', got 'delete'"),
        ({"scopes": [{"patterns": ["x"], "sparsity": 0.5}], "calibration": {"offload": "ssd"}}, "error: trainer.callbacks[1].init_args.calibration.offload: "
         "CalibrationConfig.offload must be one of None, 'cpu', 'disk', got 'ssd'"),
        ({"calibration_source": "val"}, None),  # scopes (and calibration) may come from another file or the command line
    ],
)
def test_check_callback_configuration_table(tmp_path, capsys, init_args, line):
    from pl_actsparse.lightning.cli import check_callback_configuration

    recipe = {"trainer": {"callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"},
                                        {"class_path": "pl_actsparse.lightning.callback.ActivationSparsityCallback", "init_args": init_args}]}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    if line is None:
        check_callback_configuration(["fit", "--config", str(path)], prog="pl-actsparse fit")
        assert capsys.readouterr().err == ""
        return
    with pytest.raises(SystemExit) as exit_info:
        check_callback_configuration(["fit", f"--config={path}"], prog="pl-actsparse fit")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"pl-actsparse fit: {line}"


def test_console_script_exits_2_with_the_key_on_a_bad_sparsity(tmp_path):
    bad = _bad_recipe(tmp_path, lambda i: i["scopes"][1].__setitem__("sparsity", 1.5))
    script = Path(sys.executable).with_name("pl-actsparse")
    if not script.exists():
        pytest.skip("the pl-actsparse console script is not installed in this environment")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([str(script), "fit", "--config", bad], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        "pl-actsparse fit: error: trainer.callbacks[0].init_args.scopes[1].sparsity: "
        "target sparsity for scopes[1] must be in [0, 1], got 1.5"
    ]


def test_bare_overrides_become_options():
    class Parser:  # what LightningCLI hands to parse_arguments: here it returns the rewritten arguments
        def parse_args(self, args):
            return args

    cli = ActSparseCLI.__new__(ActSparseCLI)
    cli.parse_arguments(Parser(), ["fit", "trainer.max_steps=5", "--trainer.max_epochs=1", "recipes/a=b.yaml"])
    assert cli.config == ["fit", "--trainer.max_steps=5", "--trainer.max_epochs=1", "recipes/a=b.yaml"]


def test_importing_the_package_configures_no_logging():
    """A library adds a NullHandler at most: the application's logger level, handlers and propagation stay."""
    code = ("import logging; import pl_actsparse.lightning, pl_actsparse.lightning.callback; "
            "log = logging.getLogger('pl_actsparse'); "
            "print(log.level, log.propagate, [type(h).__name__ for h in log.handlers], logging.getLogger().handlers)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.split("\n")[-2]
    assert out == "0 True ['NullHandler'] []"


def test_console_script_is_declared_and_answers(capsys):
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="pl-actsparse")
    assert script.value == "pl_actsparse.lightning.cli:main"
    with pytest.raises(SystemExit) as exit_info:
        script.load()(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(s in out for s in ("fit", "validate", "test", "predict", "report CHECKPOINT", "build-kernels"))
    with pytest.raises(SystemExit) as exit_info:
        script.load()(["reprot", "x.ckpt"])  # an unknown subcommand: jsonargparse's error, after the list of all of them
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert "report CHECKPOINT" in out and "build-kernels" in out and "reprot" in err


def test_nothing_outside_demos_imports_demos():
    """The library's subpackages (lightning/ included) never import the demos: the demo commands live in demos/.
    (Top-level modules are left out: the 0.1 alias modules there re-export demo names until they are deleted.)"""
    import ast

    offenders = []
    for path in (ROOT / "pl_actsparse").rglob("*.py"):
        parts = path.relative_to(ROOT / "pl_actsparse").parts
        if len(parts) == 1 or parts[0] == "demos":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.startswith("pl_actsparse.demos")]
    assert offenders == []


def test_show_library_logs_prints_lightning_lines_once_and_library_tables():
    """The console script and the demos show the library's INFO records without doubling Lightning's own lines
    (its ``lightning`` logger has a handler and propagates: a root handler printed each line twice)."""
    code = ("import logging; from pl_actsparse.lightning.cli import show_library_logs; show_library_logs(); "
            "import lightning.pytorch as pl; pl.seed_everything(3); logging.getLogger('pl_actsparse.x').info('table row')")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stderr
    assert err.count("Seed set to 3") == 1, err
    assert err.count("table row") == 1, err
