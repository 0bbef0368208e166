"""The pancreatic lesion classes and their fixed order (class index = position in the list).

The order is part of every trained model: logits, confusion matrices and per-class metrics are indexed by
it, so it is configured once (``classes:`` in the data config) and never re-sorted.

PDAC pancreatic ductal adenocarcinoma, IPMN intraductal papillary mucinous neoplasm, NET neuroendocrine
tumour, SCN serous cystic neoplasm, ASC adenosquamous carcinoma, CP chronic pancreatitis.
"""
from __future__ import annotations

from typing import Sequence, Tuple

from pancls.errors import UserError

#: Default order: the six diagnoses of the tSP paper's pancreatic CT task (AAAI 2023), as pancls indexes them.
DEFAULT_CLASSES: Tuple[str, ...] = ("PDAC", "IPMN", "NET", "SCN", "ASC", "CP")


def check_classes(classes: Sequence[str], where: str = "classes") -> Tuple[str, ...]:
    """Return ``classes`` as a tuple after checking it is a non-empty list of distinct, non-blank names."""
    if isinstance(classes, str) or not isinstance(classes, Sequence):
        raise UserError(f"expected a list of class names, got {classes!r}", where)
    names = tuple(classes)
    if not names:
        raise UserError("the class list is empty", where)
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise UserError(f"class {i} ({name!r}) must be a non-empty name without surrounding spaces", where)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"class name(s) listed twice: {', '.join(duplicates)}", where)
    return names
