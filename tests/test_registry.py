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
    with pytest.raises(UserError, match=r"^y: not an option of thing 'a' \(and 'z'\); accepted: x$") as info:
        reg.create("a", y=3, z=4)
    assert info.value.where == "y"
    with pytest.raises(UserError, match="did you mean 'a'"):
        reg.get("aa")
    with pytest.raises(UserError, match=r"^model\.thing: unknown thing 'b'; choose one of: a$") as info:
        reg.get("b", "model.thing")
    assert isinstance(info.value, ValueError)  # an InvalidParameter: what a Python caller expects too
    with pytest.raises(ValueError):
        reg.register("a")(make_a)


def test_a_type_error_inside_a_factory_is_a_bug_not_a_config_mistake():
    reg = Registry("thing")

    @reg.register("broken")
    def make_broken(x=1):
        return len(x)  # TypeError raised by the factory's own code

    with pytest.raises(TypeError, match="has no len"):
        reg.create("broken", x=2)


def test_head_keyword_errors_list_the_accepted_keywords():
    from pancls.heads import HEADS

    with pytest.raises(UserError, match=r"^kapa: not an option of head 'tsp' \(did you mean 'kappa'\?\).*accepted:.*kappa"):
        HEADS.create("tsp", in_features=8, num_classes=3, kapa=4.0)
