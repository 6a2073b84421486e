"""Recipes in data form: the one strict parser of scope specs, and their YAML.

A *recipe* is ``{TargetScope: target sparsity}`` plus an optional :class:`~pl_actsparse.IgnoredScope`. In YAML
(the callback's ``scopes:`` argument, a recipe written by :func:`dump_scopes_yaml`) each scope is one mapping::

    scopes:
    - patterns: ['.*up_proj', '.*gate_proj']
      sparsity: 0.3
    - names: [layers.0.mlp.down_proj]
      sparsity: 0.5

Every reader of such entries goes through :func:`parse_scope_spec` (and :func:`parse_ignored_scope_spec`), so
the same input gives the same error wherever it is read: a key that is not one of ``sparsity``, ``names``,
``patterns``, ``types``, ``validate`` (e.g. the typo ``pattern:``) raises :class:`ScopeSpecError` naming the
key and the valid ones, instead of silently becoming an empty scope.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from pl_actsparse.core.scopes import IgnoredScope, TargetScope
from pl_actsparse.errors import InvalidScopeError, InvalidTargetError, ScopeSpecError

__all__ = [
    "ScopeSpec", "IgnoredScopeSpec", "SCOPE_SPEC_KEYS", "IGNORED_SCOPE_SPEC_KEYS", "validate_target",
    "parse_scope_spec", "parse_ignored_scope_spec", "scopes_from_list", "scopes_to_list", "load_scopes_yaml",
    "dump_scopes_yaml",
]

#: The keys of one ``scopes:`` entry.
SCOPE_SPEC_KEYS = ("sparsity", "names", "patterns", "types", "validate")
#: The keys of an ``ignored_scope:`` mapping.
IGNORED_SCOPE_SPEC_KEYS = ("names", "patterns", "types", "validate")


def validate_target(value: Any, where: str) -> float:
    """A target sparsity as a float, checked to be a real number in ``[0, 1]``.

    Raises:
        InvalidTargetError: ``value`` is not a real number (bools are refused) or lies outside ``[0, 1]``
            (NaN included); the message names ``where``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidTargetError(f"target sparsity for {where} must be a number in [0, 1], got {value!r}")
    v = float(value)
    if math.isnan(v) or not 0.0 <= v <= 1.0:
        raise InvalidTargetError(f"target sparsity for {where} must be in [0, 1], got {value!r}")
    return v


@dataclass(frozen=True)
class ScopeSpec:
    """One entry of the YAML-friendly ``scopes`` list: which layers, and their (final) target sparsity.

    ``names`` are exact qualified module names, ``patterns`` regular expressions matched with ``re.fullmatch``,
    ``types`` class names (``Linear``) or classes; see ``docs/scopes.md``.
    """

    sparsity: float
    names: list[str] | str = field(default_factory=list)  # one string is one entry, as in TargetScope
    patterns: list[str] | str = field(default_factory=list)
    types: list[str] | str = field(default_factory=list)
    validate: bool = True

    def to_scope(self) -> TargetScope:
        """The :class:`~pl_actsparse.TargetScope` (raises InvalidScopeError for a bad regex or type)."""
        return TargetScope(names=self.names, patterns=self.patterns, types=self.types, validate=self.validate)


@dataclass(frozen=True)
class IgnoredScopeSpec:
    """YAML-friendly form of :class:`~pl_actsparse.IgnoredScope`."""

    names: list[str] | str = field(default_factory=list)  # one string is one entry, as in TargetScope
    patterns: list[str] | str = field(default_factory=list)
    types: list[str] | str = field(default_factory=list)
    validate: bool = True

    def to_scope(self) -> IgnoredScope:
        """The :class:`~pl_actsparse.IgnoredScope`."""
        return IgnoredScope(names=self.names, patterns=self.patterns, types=self.types, validate=self.validate)


def _check_keys(spec: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    unknown = sorted(str(k) for k in set(spec) - set(allowed))
    if unknown:
        raise ScopeSpecError(f"{where} has unknown key(s) {unknown}; allowed: {', '.join(allowed)}")


def parse_scope_spec(spec: ScopeSpec | Mapping[str, Any], where: str = "scopes[0]") -> tuple[TargetScope, float]:
    """One ``{names, patterns, types, sparsity, validate}`` entry (or a :class:`ScopeSpec`) as ``(scope, target)``.

    ``where`` names the entry in messages (``"scopes[2]"``).

    Raises:
        ScopeSpecError: not a mapping or ScopeSpec, an unknown key, or no ``sparsity``.
        InvalidTargetError: ``sparsity`` is not a number in ``[0, 1]``.
        InvalidScopeError: a bad regex or type, or the entry selects nothing (no names, patterns or types).

    >>> parse_scope_spec({"patterns": [".*up_proj"], "sparsity": 0.3})
    (TargetScope(patterns=['.*up_proj']), 0.3)
    >>> parse_scope_spec({"pattern": [".*up_proj"], "sparsity": 0.3})
    Traceback (most recent call last):
    ...
    pl_actsparse.errors.ScopeSpecError: scopes[0] has unknown key(s) ['pattern']; allowed: sparsity, names, patterns, types, validate
    """
    if isinstance(spec, Mapping):
        _check_keys(spec, SCOPE_SPEC_KEYS, where)
        if "sparsity" not in spec:
            raise ScopeSpecError(f"{where} needs a 'sparsity' (the target fraction in [0, 1])")
        spec = ScopeSpec(**spec)
    if not isinstance(spec, ScopeSpec):
        raise ScopeSpecError(f"{where} must be a mapping {{names, patterns, types, sparsity}} or a ScopeSpec, got {spec!r}")
    try:
        scope = spec.to_scope()
        target = validate_target(spec.sparsity, where)
    except InvalidScopeError as exc:
        raise InvalidScopeError(f"{where}: {exc}") from None
    if scope.is_empty():
        raise InvalidScopeError(f"{where} has no names, patterns or types, so it selects nothing")
    return scope, target


def parse_ignored_scope_spec(spec: IgnoredScopeSpec | IgnoredScope | Mapping[str, Any] | None, where: str = "ignored_scope") -> IgnoredScope | None:
    """An ``ignored_scope`` given as ``None``, an :class:`~pl_actsparse.IgnoredScope`, an :class:`IgnoredScopeSpec`
    or a ``{names, patterns, types, validate}`` mapping, as an ``IgnoredScope`` (or ``None``).

    Raises:
        ScopeSpecError: an unknown key.
        InvalidScopeError: anything else (e.g. a TargetScope), or a bad regex or type.
    """
    if spec is None or isinstance(spec, IgnoredScope):
        return spec
    if isinstance(spec, IgnoredScopeSpec):
        return spec.to_scope()
    if isinstance(spec, Mapping):
        _check_keys(spec, IGNORED_SCOPE_SPEC_KEYS, where)
        return IgnoredScopeSpec(**spec).to_scope()
    raise InvalidScopeError(f"{where} must be an IgnoredScope or {{names, patterns, types}}, got {spec!r}")


def scopes_from_list(entries: Sequence[ScopeSpec | Mapping[str, Any]]) -> dict[TargetScope, float]:
    """``[{names|patterns|types: [...], sparsity: s}, ...]`` -> ``{TargetScope: s}`` (each entry through
    :func:`parse_scope_spec`).

    Raises:
        ScopeSpecError / InvalidTargetError / InvalidScopeError: as :func:`parse_scope_spec`, naming the entry;
        InvalidScopeError also when ``entries`` is not a list or two entries are the same scope.
    """
    if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Sequence):
        raise InvalidScopeError(f"scopes must be a list of {{names, patterns, types, sparsity}} entries, got {entries!r}")
    out: dict[TargetScope, float] = {}
    for i, entry in enumerate(entries):
        scope, target = parse_scope_spec(entry, f"scopes[{i}]")
        if scope in out:
            raise InvalidScopeError(f"scopes[{i}] repeats an earlier entry: {scope!r}")
        out[scope] = target
    return out


def scopes_to_list(target_sparsity_by_scope: Mapping[TargetScope, float]) -> list[dict[str, Any]]:
    """The inverse of :func:`scopes_from_list`: plain lists and floats, ready for ``yaml.safe_dump``/JSON.

    Types given as classes are written by ``__name__`` (class names match, see ``docs/scopes.md``).
    """
    out = []
    for scope, target in target_sparsity_by_scope.items():
        entry: dict[str, Any] = {key: list(values) for key, values in (("names", sorted(scope.names)), ("patterns", sorted(scope.patterns)),
                                 ("types", sorted(t if isinstance(t, str) else t.__name__ for t in scope.types))) if values}
        if not scope.validate:
            entry["validate"] = False
        entry["sparsity"] = float(target)
        out.append(entry)
    return out


def dump_scopes_yaml(entries: Sequence[Mapping[str, Any]] | Mapping[TargetScope, float], path: str | Path | None = None, *, comment: str | None = None) -> str:
    """A ``scopes:`` YAML document (``yaml.safe_dump``), with an optional leading ``# comment``; written to
    ``path`` if given. ``entries`` is a ``scopes`` list or a ``{TargetScope: sparsity}`` recipe."""
    import yaml

    if isinstance(entries, Mapping):
        entries = scopes_to_list(entries)
    body = yaml.safe_dump({"scopes": [dict(e) for e in entries]}, sort_keys=False, default_flow_style=False)
    head = "".join(f"# {line}\n" for line in comment.splitlines()) if comment else ""
    text = head + body
    if path is not None:
        Path(path).write_text(text)
    return text


def load_scopes_yaml(text_or_path: str | Path) -> dict[TargetScope, float]:
    """Read a ``scopes:`` YAML (a path or the text itself; as written by :func:`dump_scopes_yaml`) into a recipe.

    Raises:
        InvalidScopeError: the document holds no ``scopes:`` list; otherwise as :func:`scopes_from_list`.
    """
    import yaml

    text = str(text_or_path)
    if isinstance(text_or_path, Path) or ("\n" not in text and Path(text).exists()):
        text = Path(text).read_text()
    doc = yaml.safe_load(text)
    entries = doc.get("scopes") if isinstance(doc, Mapping) else doc
    if not isinstance(entries, list):
        raise ScopeSpecError("expected a 'scopes:' list of {names, patterns, types, sparsity} entries")
    return scopes_from_list(entries)
