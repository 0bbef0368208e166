"""Where a DICOM image keeps an attribute of one frame: the functional groups, else the top level.

Enhanced (multi-frame) objects store per-frame attributes in functional group macros (DICOM PS3.3
C.7.6.16): a macro sequence (PlanePositionSequence, PixelMeasuresSequence, PixelValueTransformationSequence,
CTXRayDetailsSequence, ...) with one item, inside item ``f`` of the PerFrameFunctionalGroupsSequence when it
varies per frame, or inside the single item of the SharedFunctionalGroupsSequence when every frame shares it
(a macro is in one of the two, never both). Classic single-frame objects keep the same attributes at the top
level. :func:`functional_value` is the one lookup the scan, the volume builder and the sidecar use.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

from pydicom.dataset import Dataset

PER_FRAME = "PerFrameFunctionalGroupsSequence"
SHARED = "SharedFunctionalGroupsSequence"


def _group_items(ds: Dataset, frame: int) -> Iterator[Dataset]:
    """The functional group items that apply to ``frame``: its per-frame item, then the shared item."""
    for groups, index in ((PER_FRAME, frame), (SHARED, 0)):
        items = ds.get(groups)
        if items and 0 <= index < len(items) and isinstance(items[index], Dataset):  # not a retyped element
            yield items[index]


def functional_value(ds: Dataset, keyword: str, sequence: Optional[str] = None, frame: int = 0) -> Any:
    """The value of ``keyword`` for frame ``frame`` (0-based) of ``ds``; None when it is nowhere.

    Looked up in order: the per-frame functional group item of ``frame`` > ``sequence`` > its first item, the
    shared item > ``sequence`` > its first item, then the top level of ``ds``. ``sequence`` None searches every
    macro sequence of a group item (for the acquisition attributes whose macro is not fixed in advance,
    e.g. KVP in CTXRayDetailsSequence). The first place where the element is *present* wins, also when its
    value is empty (a present but empty element is a damaged header, not a reason to look elsewhere).

    Values are converted by pydicom as they are read, so a damaged element raises here (whatever pydicom
    raises); callers turn that into a refusal naming the file.
    """
    for group in _group_items(ds, frame):
        macros = [group.get(sequence)] if sequence is not None else [e.value for e in group if e.VR == "SQ"]
        for macro in macros:
            for item in (macro or [])[:1] if sequence is not None else (macro or []):
                if isinstance(item, Dataset) and keyword in item:
                    return item.get(keyword)
    return ds.get(keyword)
