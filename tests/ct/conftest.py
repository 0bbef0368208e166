"""Helpers to write damaged copies of the real DICOM fixtures (used by test_bad_inputs and test_fuzz).

Values are written as raw bytes (``RawDataElement``), so that a test can store what pydicom itself
refuses to build -- a DS "abc", a US with two values, an IS "-1" -- exactly as a broken exporter would.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Callable, Optional, Sequence

import pydicom
import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

STRING_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
BINARY_FORMATS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}


def tag_of(keyword) -> Tag:
    return Tag(tag_for_keyword(keyword) if isinstance(keyword, str) else keyword)


def encode(values, vr: str) -> bytes:
    """DICOM little-endian bytes of ``values`` (one value or a list) for ``vr``; strings are written as
    given (no validation), padded to even length."""
    values = values if isinstance(values, (list, tuple)) else [values]
    if vr in BINARY_FORMATS:
        return b"".join(struct.pack("<" + BINARY_FORMATS[vr], v) for v in values)
    if isinstance(values[0], (bytes, bytearray)):
        data = b"".join(values)
    else:
        data = "\\".join(str(v) for v in values).encode("latin-1")
    if len(data) % 2:
        data += b"\0" if vr == "UI" else b" "
    return data


def set_raw(ds: pydicom.Dataset, keyword, value: bytes, vr: Optional[str] = None) -> None:
    """Store ``value`` (bytes) as element ``keyword`` of ``ds`` without pydicom converting it."""
    tag = tag_of(keyword)
    vr = vr or dictionary_VR(tag)
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


def set_value(ds: pydicom.Dataset, keyword, values, vr: Optional[str] = None) -> None:
    tag = tag_of(keyword)
    vr = vr or dictionary_VR(tag)
    set_raw(ds, tag, encode(values, vr), vr)


def save(ds: pydicom.Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=False)
    return path


def write_series(files: Sequence[Path], folder: Path,
                 mutate: Optional[Callable[[pydicom.Dataset, int, int], None]] = None) -> Path:
    """Copy ``files`` into ``folder`` through pydicom, calling ``mutate(ds, index, n)`` on each first."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        if mutate is not None:
            mutate(ds, i, len(files))
        save(ds, folder / f.name)
    return folder


SHORT_FORM_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN", b"SH",
                  b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}


def unknown_vr(path: Path, tag: int) -> None:
    """Give the first element ``tag`` of the explicit-VR file ``path`` (top level or in an item) the unknown
    VR bytes ``ZZ``; its 2-byte length stays. ValueError when there is no such short-form element."""
    raw = path.read_bytes()
    marker = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    at = raw.find(marker, 132)
    while at != -1 and raw[at + 4:at + 6] not in SHORT_FORM_VRS:
        at = raw.find(marker, at + 1)
    if at == -1:
        raise ValueError(f"no short-form element {tag:08X} in {path}")
    path.write_bytes(raw[:at + 4] + b"ZZ" + raw[at + 6:])


@pytest.fixture(scope="session")
def s2010(ct_data: Path):
    """The 10 slices of the Philips series in slice order (I10, I20, ..., I100): any prefix is contiguous."""
    return sorted((ct_data / "series_ct" / "S21570" / "S2010").iterdir(), key=lambda p: int(p.name[1:]))


@pytest.fixture(scope="session")
def enhanced_file(ct_data: Path) -> Path:
    return ct_data / "enhanced" / "eCT_Supplemental.dcm"
