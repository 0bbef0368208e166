"""Choose, per study, the one CT series to convert; every other series gets a reason.

Decision order
--------------
1. **Exclusions** (a series is never used, whatever else the study holds):
   not a CT SOP class (Secondary Capture is excluded even when Modality says CT -- scanners save
   dose sheets and exam summaries that way), Modality not CT, ImageType LOCALIZER, a single-slice
   series whose slice normal is more than ``localizer_angle_deg`` away from the study's largest
   series (an unlabelled scout), fewer than ``min_slices`` slices, and the description
   include/exclude regexes.
2. **Preference** among the remaining series of a study, lexicographically:
   contrast phase (position of the first keyword of ``phase_preference`` found in the
   description; no keyword ranks last), ORIGINAL before DERIVED, axial before other orientations,
   then the tie-break: ``"thinnest"`` (smallest in-plane pixel area, then most slices) or
   ``"most_slices"``; finally the lowest series number, so the choice is deterministic.
   The winner is kept; the others are skipped as "not preferred: <winner> chosen".

``min_slices`` unset (None) means 1 in :func:`select_series` itself (the library reads what it is
given). ``pancls ingest`` and ``pancls predict`` fill an unset value with :data:`MIN_SLICES` (20,
:func:`with_default_min_slices`): a 1-slice or 10-slice series is not a volume to train on or to
classify (a model trained on whole abdominal stacks gives a confident answer on a single slice).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np

from pancls.ct.geometry import iop_normal
from pancls.ct.scan import CT_SOP_CLASSES, SECONDARY_CAPTURE_PREFIX, Series, sop_class_name
from pancls.errors import UserError

#: The fewest slices of a series ``pancls ingest`` and ``pancls predict`` use when ``selection.min_slices`` is
#: unset: a shorter series is a scout, a single image or a partial series, not a volume to train on or classify.
MIN_SLICES = 20


@dataclass
class SelectionRules:
    """Series selection rules (YAML section ``selection``; see the module docstring)."""

    include_description: Optional[str] = None  # regex; when set a series must match (search, case-insensitive)
    exclude_description: Optional[str] = None  # regex; a matching series is excluded
    phase_preference: List[str] = field(default_factory=lambda: ["venous", "portal", "arterial"])
    min_slices: Optional[int] = None  # None: the caller's default (1 here; ingest and predict: MIN_SLICES)
    tie_break: Literal["thinnest", "most_slices"] = "thinnest"
    localizer_angle_deg: float = 45.0
    one_per_study: bool = True  # False keeps every eligible series
    nifti_exclude: Optional[str] = r"seg|mask|label"  # regex on NIfTI file names found in folders

    def __post_init__(self) -> None:
        for name in ("include_description", "exclude_description", "nifti_exclude"):
            pattern = getattr(self, name)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise UserError(f"bad regular expression {pattern!r}: {exc}", f"selection.{name}") from None
        if self.min_slices is not None and self.min_slices < 1:
            raise UserError(f"must be >= 1, got {self.min_slices}", "selection.min_slices")
        if not 0 < self.localizer_angle_deg <= 90:
            raise UserError(f"must be in (0, 90], got {self.localizer_angle_deg}", "selection.localizer_angle_deg")


def with_default_min_slices(rules: Optional[SelectionRules]) -> SelectionRules:
    """``rules`` (default ones when None) with an unset ``min_slices`` filled with :data:`MIN_SLICES`: the
    minimum ``pancls ingest`` and ``pancls predict`` apply."""
    rules = rules if rules is not None else SelectionRules()
    return rules if rules.min_slices is not None else replace(rules, min_slices=MIN_SLICES)


def check_stack(volume, where, min_slices: Optional[int] = None) -> None:
    """Refuse (:class:`UserError` naming ``where``) a volume with fewer than ``min_slices`` (default
    :data:`MIN_SLICES`) voxels along its third axis (superior in RAS order): the rule :func:`select_series`
    applies to a DICOM series, for a volume that came as one file (NIfTI, NRRD, MetaImage), where there is no
    series to select. A single axial slice saved as NIfTI was classified with status ok."""
    need = MIN_SLICES if min_slices is None else min_slices
    depth = int(volume.array.shape[2]) if volume.array.ndim >= 3 else 1
    if depth < need:
        raise UserError(f"{depth} slice(s), fewer than min_slices={need} (too short a stack to classify: a single "
                        "image or a partial volume; lower selection.min_slices or --min-slices to keep it)", where)


@dataclass(frozen=True)
class Decision:
    series: Series
    kept: bool
    reason: str


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    # slice normals have no sign: a stack can run either way
    return float(np.degrees(np.arccos(min(1.0, abs(float(np.dot(a, b)))))))


def exclusion_reason(series: Series, rules: SelectionRules, reference: Optional[Series]) -> Optional[str]:
    """Why ``series`` can never be used (None when eligible); ``reference`` is the study's largest series."""
    first = series.first
    if first.sop_class_uid.startswith(SECONDARY_CAPTURE_PREFIX):
        return f"secondary capture ({sop_class_name(first.sop_class_uid)}), not a CT acquisition"
    if first.sop_class_uid not in CT_SOP_CLASSES:
        return f"not a CT image SOP class ({sop_class_name(first.sop_class_uid)})"
    if first.modality != "CT":
        return f"modality {first.modality or 'missing'}, not CT"
    if first.is_localizer:
        return "localizer/scout (ImageType LOCALIZER)"
    if series.n_slices == 1 and reference is not None and reference is not series:
        n, ref = iop_normal(series.first.orientation), iop_normal(reference.first.orientation)
        if n is not None and ref is not None and _angle_deg(n, ref) > rules.localizer_angle_deg:
            return f"localizer/scout (single {series.orientation_label} slice, {_angle_deg(n, ref):.0f} deg off the study's main series)"
    if series.n_slices < (rules.min_slices or 1):
        return (f"{series.n_slices} slice(s), fewer than min_slices={rules.min_slices} (too short a stack to "
                "classify: a scout, a single image or a partial series; lower selection.min_slices to keep it: "
                "--min-slices N)")
    desc = first.series_description
    # the description itself is not repeated: reasons go into the inventory, free text only with --keep-descriptions
    if rules.include_description and not re.search(rules.include_description, desc, re.IGNORECASE):
        return "SeriesDescription does not match selection.include_description"
    if rules.exclude_description and re.search(rules.exclude_description, desc, re.IGNORECASE):
        return "SeriesDescription matches selection.exclude_description"
    return None


def preference_key(series: Series, rules: SelectionRules) -> Tuple:
    """Sort key: smaller is preferred (see the module docstring)."""
    first = series.first
    desc = first.series_description.lower()
    phase = next((i for i, word in enumerate(rules.phase_preference) if word.lower() in desc), len(rules.phase_preference))
    derived = "DERIVED" in first.image_type
    not_axial = series.orientation_label != "axial"
    spacing = first.pixel_spacing or (np.inf, np.inf)
    thinnest = (spacing[0] * spacing[1], -series.n_slices)
    most = (-series.n_slices, spacing[0] * spacing[1])
    tie = thinnest if rules.tie_break == "thinnest" else most
    number = first.series_number if first.series_number is not None else np.inf
    return (phase, derived, not_axial, *tie, number, series.series_hash)


def select_series(series: Sequence[Series], rules: SelectionRules | None = None) -> List[Decision]:
    """One :class:`Decision` per series, in input order; at most one kept per study by default."""
    rules = rules if rules is not None else SelectionRules()
    by_study: Dict[str, List[Series]] = {}
    for s in series:
        by_study.setdefault(s.study_hash, []).append(s)
    decisions: Dict[int, Decision] = {}
    for members in by_study.values():
        reference = max(members, key=lambda s: (s.n_slices, s.series_hash))
        eligible = []
        for s in members:
            reason = exclusion_reason(s, rules, reference)
            if reason is None:
                eligible.append(s)
            else:
                decisions[id(s)] = Decision(s, False, reason)
        eligible.sort(key=lambda s: preference_key(s, rules))
        for rank, s in enumerate(eligible):
            if rank == 0 or not rules.one_per_study:
                decisions[id(s)] = Decision(s, True, "selected")
            else:
                decisions[id(s)] = Decision(s, False, f"not preferred: {eligible[0].name} chosen for this study")
    return [decisions[id(s)] for s in series]
