from dataclasses import dataclass, field
from typing import List, Optional

import pytest

from pancls.config import apply_overrides, dump_yaml, from_dict, load_yaml
from pancls.errors import UserError


@dataclass
class Inner:
    lr: float = 0.1
    milestones: List[int] = field(default_factory=lambda: [160, 180])


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    maybe: Optional[int] = None


def test_nested_and_defaults():
    cfg = from_dict(Outer, {"inner": {"lr": 1}, "maybe": 3})
    assert cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)
    assert cfg.inner.milestones == [160, 180] and cfg.maybe == 3 and cfg.name == "x"


def test_unknown_key_names_its_path():
    with pytest.raises(UserError, match=r"config\.inner.*'lrr'"):
        from_dict(Outer, {"inner": {"lrr": 1}})


def test_wrong_type_names_its_path():
    with pytest.raises(UserError, match=r"config\.inner\.milestones\[1\]"):
        from_dict(Outer, {"inner": {"milestones": [1, "a"]}})
    with pytest.raises(UserError, match="true or false|integer|number|string"):
        from_dict(Outer, {"name": 3})


def test_overrides_and_yaml_roundtrip(tmp_path):
    data = apply_overrides({}, ["inner.lr=0.5", "inner.milestones=[1, 2]", "maybe=null"])
    cfg = from_dict(Outer, data)
    dump_yaml(cfg, tmp_path / "c.yaml")
    assert from_dict(Outer, load_yaml(tmp_path / "c.yaml")) == cfg
    with pytest.raises(UserError, match="key=value"):
        apply_overrides({}, ["nonsense"])


def test_bad_yaml_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        load_yaml(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1,\n")
    with pytest.raises(UserError, match="cannot read config"):
        load_yaml(tmp_path / "broken.yaml")


def test_yaml_off_is_the_word_off_where_a_choice_expects_it():
    from typing import Literal

    @dataclass
    class Amp:
        amp: Literal["auto", "off"] = "auto"

    assert from_dict(Amp, apply_overrides({}, ["amp=off"])).amp == "off"
    with pytest.raises(UserError, match=r"^config\.amp: unknown amp True; choose one of: auto, off$"):
        from_dict(Amp, {"amp": True})
