import pytest

from pancls.errors import UserError
from pancls.registry import Registry


def test_create_and_unknown_name_lists_choices():
    reg = Registry("thing")

    @reg.register("a")
    def make_a(x=1):
        return ("a", x)

    assert reg.create("a", x=2) == ("a", 2)
    assert "a" in reg and reg.names() == ["a"]
    with pytest.raises(UserError, match="unknown thing 'b'; choose one of: a"):
        reg.create("b")
    with pytest.raises(UserError, match="thing 'a'"):
        reg.create("a", y=3)
    with pytest.raises(ValueError):
        reg.register("a")(make_a)
