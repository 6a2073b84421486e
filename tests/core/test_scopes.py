import pytest
from torch import nn

from pl_actsparse import IgnoredScope, TargetScope
from pl_actsparse.errors import InvalidScopeError


def test_scopes_are_hashable_and_order_insensitive():
    a = TargetScope(patterns=[".*up_proj.*", ".*gate_proj.*"])
    b = TargetScope(patterns=(".*gate_proj.*", ".*up_proj.*"))
    assert a == b and hash(a) == hash(b)
    assert {a: 0.3}[b] == 0.3
    assert TargetScope(names=["x"]) != IgnoredScope(names=["x"])
    assert TargetScope(names=["x"]) != TargetScope(names=["x"], validate=False)


def test_bare_string_is_one_entry():
    assert TargetScope(names="layers.0.mlp.up_proj").names == frozenset({"layers.0.mlp.up_proj"})
    assert TargetScope(patterns=".*proj").patterns == frozenset({".*proj"})


def test_patterns_use_fullmatch(tiny):
    named = list(tiny.named_modules())
    assert TargetScope(patterns=["up_proj"]).match(named).by_pattern["up_proj"] == []
    hits = TargetScope(patterns=[".*up_proj"]).match(named).by_pattern[".*up_proj"]
    assert hits == ["layers.0.mlp.up_proj", "layers.1.mlp.up_proj", "layers.2.mlp.up_proj"]


def test_types_by_class_and_by_name(tiny):
    named = list(tiny.named_modules())
    by_class = TargetScope(types=[nn.Linear]).match(named).all_names()
    by_name = TargetScope(types=["Linear"]).match(named).all_names()
    by_qualname = TargetScope(types=["torch.nn.modules.linear.Linear"]).match(named).all_names()
    assert by_class == by_name == by_qualname
    assert len(by_class) == 3 * 7 + 1  # 7 projections per block + lm_head


def test_invalid_entries_are_rejected():
    with pytest.raises(InvalidScopeError, match=r"pattern '\(' is not a valid regular expression"):
        TargetScope(patterns=["("])
    with pytest.raises(InvalidScopeError, match="types must be nn.Module subclasses or class names, got 3"):
        TargetScope(types=[3])
    with pytest.raises(InvalidScopeError, match="names must be strings"):
        TargetScope(names=[1])


def test_scopes_are_immutable_and_picklable():
    import pickle

    s = TargetScope(names=["a"], patterns=[".*b"], types=[nn.Linear])
    with pytest.raises(AttributeError):
        s.names = frozenset()
    assert pickle.loads(pickle.dumps(s)) == s
    assert "patterns=['.*b']" in repr(s)
