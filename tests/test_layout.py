"""The package layout: public names, the deprecated module paths of 0.1, and the import rules."""

import ast
import importlib
import pathlib
import warnings

import pytest

import pl_actsparse

OLD_PATHS = {
    "functional": "api",
    "scopes": "core.scopes",
    "modules": "core.layer",
    "groups": "core.groups",
    "quantization": "core.int8",
    "metrics": "measure.metric",
    "tracking": "measure.metric",
    "report": "measure.report",
    "reporting": "measure.report",
    "sweep": "tuning.sweep",
    "allocation": "tuning.allocation",
    "evaluation": "tuning.objectives",
    "scoring": "tuning.weight_aware",
    "inference": "export",
    "callback": "lightning.callback",
    "cli": "lightning.cli",
    "llama2c": "demos.llama2c",
    "data": "demos.tinystories",
    "lightning_models": "demos.lightning_models",
    "generation": "demos.generate",
    "demo": "demos.run",
    "kernels.int8": "kernels.int8_cpu",
    "kernels.triton_gemv": "kernels.cuda",
}


def test_every_public_name_resolves():
    missing = [n for n in pl_actsparse.__all__ if getattr(pl_actsparse, n, None) is None]
    assert missing == []


@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_old_module_path_is_a_deprecated_alias_of_the_new_one(old):
    import sys

    sys.modules.pop(f"pl_actsparse.{old}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod = importlib.import_module(f"pl_actsparse.{old}")
    assert mod is importlib.import_module(f"pl_actsparse.{OLD_PATHS[old]}")
    assert any(issubclass(w.category, DeprecationWarning) and OLD_PATHS[old] in str(w.message) for w in caught)


def _imports(path: pathlib.Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


PKG = pathlib.Path(pl_actsparse.__file__).parent
SHIMS = {PKG / (old.replace(".", "/") + ".py") for old in OLD_PATHS}


def _modules(sub: str):
    return [p for p in (PKG / sub).rglob("*.py") if p not in SHIMS]


def test_kernels_import_nothing_from_the_package():
    bad = {str(p.relative_to(PKG)): sorted(i for i in _imports(p) if i.startswith("pl_actsparse") and not i.startswith("pl_actsparse.kernels"))
           for p in _modules("kernels")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_only_the_lightning_and_demos_packages_import_lightning():
    offenders = []
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG).parts
        if rel[0] in ("lightning", "demos") or p in SHIMS:
            continue
        if any(i == "lightning" or i.startswith("lightning.") for i in _imports(p)):
            offenders.append(str(p.relative_to(PKG)))
    assert offenders == []


@pytest.mark.parametrize("lower, higher", [("core", "measure"), ("core", "tuning"), ("core", "export"),
                                           ("core", "lightning"), ("core", "demos"), ("measure", "export"),
                                           ("measure", "lightning"), ("measure", "demos"),
                                           ("tuning", "lightning"), ("tuning", "demos"),
                                           ("export", "lightning"), ("export", "demos")])
def test_no_upward_imports(lower, higher):
    offenders = [str(p.relative_to(PKG)) for p in _modules(lower)
                 if any(i == f"pl_actsparse.{higher}" or i.startswith(f"pl_actsparse.{higher}.") for i in _imports(p))]
    assert offenders == []
