"""The package layout: public names and the import rules."""

import ast
import importlib
import pathlib

import pytest

import pl_actsparse

def test_every_public_name_resolves():
    missing = [n for n in pl_actsparse.__all__ if getattr(pl_actsparse, n, None) is None]
    assert missing == []


def _imports(path: pathlib.Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


PKG = pathlib.Path(pl_actsparse.__file__).parent


def _modules(sub: str):
    return list((PKG / sub).rglob("*.py"))


def test_kernels_import_nothing_from_the_package():
    bad = {str(p.relative_to(PKG)): sorted(i for i in _imports(p) if i.startswith("pl_actsparse") and not i.startswith("pl_actsparse.kernels"))
           for p in _modules("kernels")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_only_the_lightning_and_demos_packages_import_lightning():
    offenders = []
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG).parts
        if rel[0] in ("lightning", "demos"):
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
