"""Which layers a recipe sparsifies.

A scope selects modules of ``model.named_modules()`` by their *qualified module name*
(``layers.0.mlp.up_proj``), never by traced op names, so what you see in ``print(model)`` is what you match.

Matching rules, each documented in ``docs/scopes.md``:

* ``names``: exact qualified names.
* ``patterns``: Python regular expressions matched with :func:`re.fullmatch` against the whole qualified
  name (``".*up_proj"`` matches ``layers.0.mlp.up_proj``; ``"up_proj"`` alone does not). NNCF-style patterns
  such as ``".*up_proj.*"`` keep working.
* ``types``: module classes or class names; a module matches when any class in its MRO is one of them
  (a class name matches either ``__name__`` or ``module.qualname``), so ``nn.Linear`` matches subclasses too.

Scopes are immutable and hashable: the order of entries does not matter, so they can be dictionary keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Union

from torch import nn

from pl_actsparse.core.layer import original_module_class
from pl_actsparse.errors import InvalidScopeError

__all__ = ["TargetScope", "IgnoredScope", "ScopeMatch"]

TypeSpec = Union[type, str]


def _as_frozenset(value: object, what: str) -> frozenset:
    if value is None:
        return frozenset()
    if isinstance(value, (str, type)):
        # A bare string is one entry, not an iterable of characters.
        return frozenset([value])
    try:
        return frozenset(value)  # type: ignore[arg-type]
    except TypeError as exc:
        raise InvalidScopeError(f"{what} must be a string or an iterable of strings, got {value!r}") from exc


@dataclass(frozen=True)
class ScopeMatch:
    """What each entry of a scope matched: module names per entry, in model order."""

    by_name: dict[str, list[str]] = field(default_factory=dict)
    by_pattern: dict[str, list[str]] = field(default_factory=dict)
    by_type: dict[str, list[str]] = field(default_factory=dict)

    def _groups(self) -> tuple[tuple[str, dict[str, list[str]]], ...]:
        return ("name", self.by_name), ("pattern", self.by_pattern), ("type", self.by_type)

    def all_names(self) -> list[str]:
        return list(dict.fromkeys(n for _, group in self._groups() for names in group.values() for n in names))

    def unmatched(self) -> list[str]:
        """Entries that matched no module, formatted for an error message."""
        return [f"{kind} {k!r}" for kind, group in self._groups() for k, v in group.items() if not v]


class _Scope:
    """Shared implementation of :class:`TargetScope` and :class:`IgnoredScope`."""

    __slots__ = ("names", "patterns", "types", "validate", "_compiled")

    def __init__(
        self,
        names: Iterable[str] | str = (),
        patterns: Iterable[str] | str = (),
        types: Iterable[TypeSpec] | TypeSpec = (),
        validate: bool = True,
        **unknown: object,
    ) -> None:
        if unknown:  # a typo such as pattern= gets a suggestion rather than Python's bare TypeError
            key = next(iter(unknown))  # the usual typo is a singular: pattern= for patterns=
            raise InvalidScopeError(f"{type(self).__name__} got an unexpected argument {key!r}{f'; did you mean {key}s=?' if key in ('name', 'pattern', 'type') else ''}; "
                                    "its arguments are names, patterns, types and validate")
        names_set = _as_frozenset(names, "names")
        patterns_set = _as_frozenset(patterns, "patterns")
        types_set = _as_frozenset(types, "types")
        for n in names_set:
            if not isinstance(n, str):
                raise InvalidScopeError(f"names must be strings (qualified module names), got {n!r}")
        compiled = {}
        for p in patterns_set:
            if not isinstance(p, str):
                raise InvalidScopeError(f"patterns must be regular-expression strings, got {p!r}")
            try:
                compiled[p] = re.compile(p)
            except re.error as exc:
                raise InvalidScopeError(f"pattern {p!r} is not a valid regular expression: {exc}") from exc
        for t in types_set:
            if not (isinstance(t, str) or (isinstance(t, type) and issubclass(t, nn.Module))):
                raise InvalidScopeError(
                    f"types must be nn.Module subclasses or class names, got {t!r}"
                )
        if not isinstance(validate, bool):
            raise InvalidScopeError(f"validate must be True or False, got {validate!r}")
        for key, value in zip(self.__slots__, (names_set, patterns_set, types_set, validate, compiled)):
            object.__setattr__(self, key, value)

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _key(self) -> tuple:
        return (type(self), self.names, self.patterns, self.types, self.validate)

    def __hash__(self) -> int:
        return hash(self._key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Scope) and self._key() == other._key()

    def __repr__(self) -> str:
        entries = (("names", self.names), ("patterns", self.patterns), ("types", [_type_label(t) for t in self.types]))
        parts = [f"{key}={sorted(values)!r}" for key, values in entries if values] + ([] if self.validate else ["validate=False"])
        return f"{type(self).__name__}({', '.join(parts)})"

    def __reduce__(self):
        return (type(self), (tuple(self.names), tuple(self.patterns), tuple(self.types), self.validate))

    def is_empty(self) -> bool:
        return not (self.names or self.patterns or self.types)

    def matches(self, name: str, module: nn.Module) -> bool:
        """Whether one module falls in this scope."""
        return name in self.names or any(rx.fullmatch(name) for rx in self._compiled.values()) or bool(self._types_hit(module))

    def _types_hit(self, module: nn.Module) -> list[str]:
        """Labels of the ``types`` entries the module's original class is (a subclass of, or named as)."""
        if not self.types:
            return []
        cls = original_module_class(module)  # scopes match the same way before and after sparsification
        labels = {n for base in cls.__mro__ for n in (base.__name__, f"{base.__module__}.{base.__qualname__}")}
        return [_type_label(t) for t in self.types
                if (isinstance(t, str) and t in labels) or (isinstance(t, type) and issubclass(cls, t))]

    def match(self, named_modules: Iterable[tuple[str, nn.Module]]) -> ScopeMatch:
        """Resolve every entry against the model, so unmatched entries can be reported all at once."""
        result = ScopeMatch(
            by_name={n: [] for n in sorted(self.names)},
            by_pattern={p: [] for p in sorted(self.patterns)},
            by_type={_type_label(t): [] for t in self.types},
        )
        for name, module in named_modules:
            if name in result.by_name:
                result.by_name[name].append(name)
            for p, rx in self._compiled.items():
                if name and rx.fullmatch(name):
                    result.by_pattern[p].append(name)
            for label in self._types_hit(module):
                result.by_type[label].append(name)
        return result


def _type_label(t: TypeSpec) -> str:
    return t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}"


class TargetScope(_Scope):
    """Layers that get one target sparsity.

    With ``validate=True`` (default) every name, pattern and type must match at least one module; an exact
    name must be an ``nn.Linear``. Patterns and types may also hit unsupported modules: those are skipped
    and listed in the report instead of failing.

    >>> TargetScope(patterns=[".*up_proj", ".*gate_proj"]) == TargetScope(patterns=[".*gate_proj", ".*up_proj"])
    True
    >>> TargetScope(names="layers.0.mlp.down_proj").names
    frozenset({'layers.0.mlp.down_proj'})
    """


class IgnoredScope(_Scope):
    """Layers never sparsified, even when a target scope matches them.

    >>> IgnoredScope(patterns=[r"layers\\.0\\..*"]).matches("layers.0.mlp.up_proj", nn.Linear(1, 1))
    True
    """

