"""CalibrationConfig: every field validated once, with an error naming it; built from a config, a mapping (YAML),
a method name or None; the same thresholds whichever spelling reaches the verbs."""

import dataclasses

import pytest
import torch
from torch import nn

from pl_actsparse import TargetScope
from pl_actsparse.api import calibrate_activation_sparsity, prepare_activation_sparsity, sparsify_activations
from pl_actsparse.config import CalibrationConfig
from pl_actsparse.core.layer import sparsified_layers
from pl_actsparse.errors import InvalidOptionError, TokenMaskError


@pytest.mark.parametrize(
    "field, value, valid",
    [
        ("method", "blockwise", "'auto', 'lockstep', 'sequential'"),
        ("method", None, "'auto', 'lockstep', 'sequential'"),
        ("offload", "gpu", "None, 'cpu', 'disk'"),
        ("in_block", "threads", "'levels', 'lockstep'"),
        ("num_batches", 0, "a positive integer or None"),
        ("num_batches", 2.5, "a positive integer or None"),
        ("num_batches", True, "a positive integer or None"),
        ("max_batches_in_flight", -1, "a positive integer or None"),
        ("transform_fn", "ids", "callable or None"),
        ("loss_fn", 0.5, "callable or None"),
        ("progress", 1, "a bool"),
        ("sync_across_processes", "yes", "a bool or None"),
    ],
)
def test_each_bad_field_raises_naming_the_field(field, value, valid):
    with pytest.raises(InvalidOptionError, match=rf"CalibrationConfig\.{field} must be .*{valid}.*got {value!r}"):
        CalibrationConfig(**{field: value})


def test_bad_token_mask_raises_token_mask_error():
    with pytest.raises(TokenMaskError, match=r"CalibrationConfig\.token_mask must be 'auto', None or a callable, got 'pad'"):
        CalibrationConfig(token_mask="pad")


def test_valid_values_are_kept():
    fn = lambda item: item  # noqa: E731
    c = CalibrationConfig(method="sequential", num_batches=3, transform_fn=fn, token_mask=None, offload="disk",
                          max_batches_in_flight=2, in_block="lockstep", progress=False, sync_across_processes=False, loss_fn=fn)
    assert (c.method, c.num_batches, c.transform_fn, c.token_mask, c.offload) == ("sequential", 3, fn, None, "disk")
    assert (c.max_batches_in_flight, c.in_block, c.progress, c.sync_across_processes, c.loss_fn) == (2, "lockstep", False, False, fn)
    assert c.replace(num_batches=None).num_batches is None and c.num_batches == 3  # frozen: a new object
    with pytest.raises(InvalidOptionError, match="num_batches"):
        c.replace(num_batches=0)


def test_unknown_field_names_it_and_the_valid_fields_closest_first():
    with pytest.raises(InvalidOptionError, match=r"unknown CalibrationConfig field\(s\) \['num_batchs'\]; "
                       r"valid fields, closest first: num_batches, ") as err:
        CalibrationConfig(num_batchs=3)
    valid = str(err.value).split("closest first: ")[1].split(", ")
    assert sorted(valid) == sorted(f.name for f in dataclasses.fields(CalibrationConfig))
    with pytest.raises(InvalidOptionError, match=r"\['ofload'\]; valid fields, closest first: offload, "):
        CalibrationConfig().replace(ofload="cpu")


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_offload_with_the_lockstep_method_is_refused(offload):
    with pytest.raises(InvalidOptionError, match=rf"CalibrationConfig\.offload='{offload}' needs method='sequential' "
                       r"\(or 'auto'\): method='lockstep' keeps no cache"):
        CalibrationConfig(method="lockstep", offload=offload)
    assert CalibrationConfig(method="sequential", offload=offload).offload == offload


def test_from_value():
    default = CalibrationConfig()
    assert CalibrationConfig.from_value(None) == default
    assert CalibrationConfig.from_value(default) is default
    assert CalibrationConfig.from_value("lockstep") == CalibrationConfig(method="lockstep")
    assert CalibrationConfig.from_value({"num_batches": 4, "offload": "cpu"}) == CalibrationConfig(num_batches=4, offload="cpu")
    with pytest.raises(InvalidOptionError, match=r"unknown CalibrationConfig field\(s\) \['num_calibration_batches'\]"):
        CalibrationConfig.from_value({"num_calibration_batches": 4})
    with pytest.raises(InvalidOptionError, match="CalibrationConfig.method must be one of"):
        CalibrationConfig.from_value("blockwise")
    with pytest.raises(InvalidOptionError, match="got int"):
        CalibrationConfig.from_value(4)


def test_a_config_from_yaml_works():
    """A ``calibration:`` section of a YAML recipe, read by omegaconf (DictConfig -> dict), builds the config."""
    omegaconf = pytest.importorskip("omegaconf")
    section = omegaconf.OmegaConf.create("calibration:\n  method: lockstep\n  num_batches: 2\n  token_mask: null\n  progress: false\n")
    config = CalibrationConfig.from_value(omegaconf.OmegaConf.to_container(section.calibration))
    assert config == CalibrationConfig(method="lockstep", num_batches=2, token_mask=None, progress=False)
    with pytest.raises(InvalidOptionError, match="offload"):
        CalibrationConfig.from_value(omegaconf.OmegaConf.to_container(omegaconf.OmegaConf.create({"offload": "gpu"})))


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_every_spelling_gives_the_same_thresholds():
    data = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    scope = {TargetScope(types=[nn.Linear]): 0.5}
    got = []
    for calibration in (CalibrationConfig(progress=False, num_batches=2), {"progress": False, "num_batches": 2}):
        net = sparsify_activations(_net(), data, scope, calibration=calibration)
        got.append([m.activation_threshold.clone() for _, m in sparsified_layers(net)])
    net = _net()
    prepare_activation_sparsity(net, scope)
    report = calibrate_activation_sparsity(net, data[:2], calibration={"progress": False, "method": "lockstep"})
    got.append([m.activation_threshold.clone() for _, m in sparsified_layers(net)])
    assert all(torch.equal(a, b) for other in got[1:] for a, b in zip(got[0], other))
    assert report.statistics["0"].elements == 2 * 4 * 8  # num_batches=2 of the 3 items


def test_invalid_config_changes_nothing():
    net = _net()
    with pytest.raises(InvalidOptionError, match="max_batches_in_flight"):
        sparsify_activations(net, [torch.randn(2, 8)], {TargetScope(types=[nn.Linear]): 0.5},
                             calibration={"max_batches_in_flight": 0})
    assert not list(sparsified_layers(net))
