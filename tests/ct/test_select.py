"""Series selection on the real fixtures plus rule-by-rule checks on their headers."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pancls.config import from_dict
from pancls.ct.scan import Series, scan
from pancls.ct.select import SelectionRules, select_series
from pancls.errors import UserError


@pytest.fixture(scope="module")
def series_ct(ct_data: Path):
    return scan([ct_data / "series_ct"], progress=False).series


def _by_number(decisions):
    return {d.series.first.series_number: d for d in decisions}


def test_series_ct_keeps_only_the_axial_series(series_ct):
    d = _by_number(select_series(series_ct))
    assert [n for n, x in d.items() if x.kept] == [201]
    assert "localizer" in d[100].reason.lower()
    assert "secondary capture" in d[401].reason.lower()


def test_single_slice_scout_without_localizer_flag_is_excluded(series_ct):
    # strip LOCALIZER from the scout: its single sagittal slice is still recognised by its orientation
    scout = next(s for s in series_ct if s.first.series_number == 100)
    scout.instances = [dataclasses.replace(i, image_type=("ORIGINAL", "PRIMARY")) for i in scout.instances]
    d = _by_number(select_series(series_ct))
    assert not d[100].kept and "90 deg" in d[100].reason and d[201].kept


def _variant(series: Series, series_hash: str, **changes) -> Series:
    return Series(series.study_hash, series_hash, series.patient_key,
                  [dataclasses.replace(i, **changes) for i in series.instances])


def test_preferences_phase_then_original_then_tie_break(series_ct):
    axial = next(s for s in series_ct if s.first.series_number == 201)
    arterial = _variant(axial, "a", series_description="ARTERIAL 5mm", series_number=5)
    venous_derived = _variant(axial, "v", series_description="venous MPR", series_number=6, image_type=("DERIVED", "SECONDARY"))
    venous = _variant(axial, "w", series_description="Portal Venous", series_number=7)
    venous_thin = _variant(axial, "x", series_description="Portal Venous thin", series_number=8, pixel_spacing=(0.3, 0.3))
    candidates = [arterial, venous_derived, venous, venous_thin]

    def kept(rules=None):
        return [d.series.series_hash for d in select_series(candidates, rules or SelectionRules()) if d.kept]

    assert kept() == ["x"]  # venous, ORIGINAL, thinnest pixels
    assert kept(SelectionRules(phase_preference=["arterial", "venous"])) == ["a"]
    assert kept(SelectionRules(exclude_description="thin")) == ["w"]
    assert kept(SelectionRules(include_description="mpr")) == ["v"]
    assert set(kept(SelectionRules(one_per_study=False))) == {"a", "v", "w", "x"}
    losers = [d for d in select_series(candidates) if not d.kept]
    assert all("x S8 chosen" in d.reason for d in losers)
    assert not any("Portal" in d.reason for d in losers)  # no header free text in reasons


def test_most_slices_tie_break(ct_data: Path, series_ct):
    axial = next(s for s in series_ct if s.first.series_number == 201)
    short = Series(axial.study_hash, "short", axial.patient_key,
                   [dataclasses.replace(i, pixel_spacing=(0.3, 0.3)) for i in axial.instances[:4]])
    thinnest = [d.series.series_hash for d in select_series([axial, short]) if d.kept]
    most = [d.series.series_hash for d in select_series([axial, short], SelectionRules(tie_break="most_slices")) if d.kept]
    assert thinnest == ["short"] and most == [axial.series_hash]


def test_min_slices_and_non_ct(ct_data: Path):
    found = scan([ct_data / "jpeg2000", ct_data / "enhanced"], progress=False).series
    assert all(d.kept for d in select_series(found))  # the documented default keeps short stacks
    strict = select_series(found, SelectionRules(min_slices=5))
    assert not any(d.kept for d in strict)
    assert {d.reason.split(" (")[0] for d in strict} == {"1 slice(s), fewer than min_slices=5",
                                                         "2 slice(s), fewer than min_slices=5"}
    assert all("lower selection.min_slices to keep it" in d.reason for d in strict)
    mr = [_variant(found[0], "mr", modality="MR", sop_class_uid="1.2.840.10008.5.1.4.1.1.4")]
    (decision,) = select_series(mr)
    assert not decision.kept and "MR Image Storage" in decision.reason


def test_rules_from_yaml_mapping_are_strict():
    rules = from_dict(SelectionRules, {"phase_preference": ["arterial"], "min_slices": 20}, "selection")
    assert rules.phase_preference == ["arterial"] and rules.min_slices == 20
    with pytest.raises(UserError, match="unknown key"):
        from_dict(SelectionRules, {"min_slice": 3}, "selection")
    with pytest.raises(UserError, match="tie_break"):
        from_dict(SelectionRules, {"tie_break": "biggest"}, "selection")
    with pytest.raises(UserError, match="include_description"):
        SelectionRules(include_description="(unclosed")
    with pytest.raises(UserError, match="min_slices"):
        SelectionRules(min_slices=0)
