"""The package layout: public names and the import rules between subpackages (lazy imports included)."""

import ast
import itertools
import pathlib

import pytest

import pl_actsparse


def test_every_public_name_resolves():
    missing = [n for n in pl_actsparse.__all__ if getattr(pl_actsparse, n, None) is None]
    assert missing == []


def test_at_most_25_public_names_one_verb_per_step():
    assert len(pl_actsparse.__all__) <= 25 and len(set(pl_actsparse.__all__)) == len(pl_actsparse.__all__)


PKG = pathlib.Path(pl_actsparse.__file__).parent
SUBPACKAGES = sorted(p.name for p in PKG.iterdir() if (p / "__init__.py").exists())


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _import_froms(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every import in the file, lazy ones (inside functions) included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def _imports(path: pathlib.Path) -> set[str]:
    """Imported modules; ``from pl_actsparse.x import y`` counts as ``pl_actsparse.x.y`` when that is a module."""
    out = set()
    for module, names in _import_froms(path):
        out.add(module)
        out.update(f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES)
    return out


def _modules(sub: str):
    return list((PKG / sub).rglob("*.py"))


def _package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _package_imports(sub: str) -> set[str]:
    return {_package_of(i) for p in _modules(sub) for i in _imports(p) if i.startswith("pl_actsparse.")} - {sub}


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
                                           ("core", "lightning"), ("core", "demos"), ("core", "integrations"),
                                           ("measure", "export"), ("measure", "lightning"), ("measure", "demos"),
                                           ("tuning", "lightning"), ("tuning", "demos"),
                                           ("export", "lightning"), ("export", "demos")])
def test_no_upward_imports(lower, higher):
    offenders = [str(p.relative_to(PKG)) for p in _modules(lower)
                 if any(i == f"pl_actsparse.{higher}" or i.startswith(f"pl_actsparse.{higher}.") for i in _imports(p))]
    assert offenders == []


@pytest.mark.parametrize("a, b", list(itertools.combinations(SUBPACKAGES, 2)))
def test_no_import_cycle_between_subpackages(a, b):
    assert not (b in _package_imports(a) and a in _package_imports(b)), f"{a} and {b} import each other"


def test_no_import_cycle_between_modules_of_one_subpackage():
    graph = {m: {i for i in _imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}
    cycles = []
    for m in graph:  # a path back to m through modules of m's own subpackage
        seen, todo = set(), [d for d in graph[m] if _package_of(d) == _package_of(m)]
        while todo:
            d = todo.pop()
            if d == m:
                cycles.append(m)
                break
            if d not in seen:
                seen.add(d)
                todo += [e for e in graph[d] if _package_of(e) == _package_of(m)]
    assert cycles == []


@pytest.mark.parametrize("sub", [s for s in SUBPACKAGES if s != "demos"])
def test_nothing_outside_demos_imports_demos(sub):
    offenders = [str(p.relative_to(PKG)) for p in _modules(sub)
                 if any(i == "pl_actsparse.demos" or i.startswith("pl_actsparse.demos.") for i in _imports(p))]
    assert offenders == []


@pytest.mark.parametrize("sub", SUBPACKAGES + [""])
def test_no_module_imports_a_private_name_of_another(sub):
    paths = _modules(sub) if sub else [p for p in PKG.glob("*.py")]
    offenders = [f"{p.relative_to(PKG)} <- {module}.{name}" for p in paths for module, names in _import_froms(p)
                 if module.startswith("pl_actsparse") for name in names if name.startswith("_") and not name.startswith("__")]
    assert offenders == []


@pytest.mark.parametrize("sub", [s for s in SUBPACKAGES if s != "kernels"] + [""])
def test_only_errors_defines_public_exception_classes(sub):
    offenders = []
    for p in _modules(sub) if sub else PKG.glob("*.py"):
        if p == PKG / "errors.py":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                bases = [getattr(b, "id", getattr(b, "attr", "")) for b in node.bases]
                if any(b.endswith(("Error", "Exception")) for b in bases):
                    offenders.append(f"{p.relative_to(PKG)}:{node.name}")
    assert offenders == []


def test_nothing_imports_an_integration_module_but_through_the_dispatch_point():
    offenders = [f"{p.relative_to(PKG)} <- {i}" for p in PKG.rglob("*.py") if p.relative_to(PKG).parts[0] != "integrations"
                 for i in _imports(p) if i.startswith("pl_actsparse.integrations.")]
    assert offenders == []
