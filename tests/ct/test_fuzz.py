"""Seeded header-mutation fuzzing of the real DICOM fixtures through the whole ingest (issue 14).

Each case takes one fixture series, applies 1-3 seeded mutations to its pydicom datasets or files --
change, delete or retype an element, NaN/inf/huge/zero/negative/empty/text values, the wrong number of
values, an unknown VR byte, a truncated or empty file, a duplicated file, UIDs swapped across slices or
made equal, pixel data of another length, functional-group items changed or removed -- writes the files,
runs :func:`pancls.ingest.ingest` on them and classifies the outcome:

* ``refused``: no volume; every problem is a one-line reason (a refused series/file, or a skip saying why);
* ``identical``: the volume equals the unmutated one (same voxels at the same world positions);
* ``explained``: it differs, and the inventory row says so (``notes``, or flags unlike the unmutated
  volume's) -- or it is an exact sub-stack of the unmutated volume and the inventory shows where the rest
  went (the mutated files now describe more series than before, or an unreadable file beside it is noted);
* ``crash``: an exception out of ``ingest``, a ``failed`` row, a traceback on stderr -- never allowed;
* ``unexplained``: a different volume with no word about it -- never allowed.

Value classes are chosen to be *invalid* for the element they hit (a RescaleSlope of 0, a position of
1e308), so that accepting one must be explained. Valid values with another meaning -- an intercept of 0, a
PixelRepresentation of 0, a slice moved to another valid position, an ImageOrientationPatient cosine of 1
turned into -1 (a mirrored image) -- are not generated: the files would then legitimately describe another
volume and no reader can tell.

The default run does ``FUZZ_CASES`` cases (seed ``FUZZ_SEED``); ``-m slow`` runs ``FUZZ_CASES_SLOW``.
Outcome counts are printed (``-s``) for the README.
"""
from __future__ import annotations

import collections
import copy
import csv
import io
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset

from pancls.ct.select import SelectionRules
from pancls.ingest import IngestConfig, ingest

from .conftest import encode, save, set_raw, tag_of, unknown_vr

FUZZ_SEED = 20240614
FUZZ_CASES = int(os.environ.get("PANCLS_FUZZ_CASES", 300))
FUZZ_CASES_SLOW = int(os.environ.get("PANCLS_FUZZ_CASES_SLOW", 5000))

#: the fixture series mutated (a contiguous prefix of each is enough to test sorting and gaps)
BASES = {
    "philips_native": ("series_ct/S21570/S2010", ["I10", "I20", "I30", "I40"]),
    "enhanced_2_frames": ("enhanced", ["eCT_Supplemental.dcm"]),
    "single_slice_native": ("jpeg2000", ["693_UNCR.dcm"]),
    "single_slice_j2k": ("jpeg2000", ["693_J2KR.dcm"]),
    "siemens_j2k_blank_uids": ("abdomen/dicom_series", None),  # first 3 files
}

# Top-level elements and the value classes that are invalid for them (see the module docstring).
ALL = ("nan", "inf", "-inf", "huge", "hugeint", "zero", "negative", "empty", "text", "fewer", "more", "delete",
       "retype", "unknown_vr")
NOT_ZERO_OR_NEGATIVE = tuple(c for c in ALL if c not in ("zero", "negative"))
ELEMENTS = {
    "Rows": ALL, "Columns": ALL, "BitsAllocated": ALL, "BitsStored": ALL, "HighBit": ALL,
    "PixelRepresentation": tuple(c for c in ALL if c != "zero"), "SamplesPerPixel": ALL, "NumberOfFrames": ALL,
    "RescaleSlope": ALL, "RescaleIntercept": NOT_ZERO_OR_NEGATIVE, "RescaleType": ALL,
    "ImagePositionPatient": NOT_ZERO_OR_NEGATIVE, "ImageOrientationPatient": ALL, "PixelSpacing": ALL,
    "SliceThickness": ALL, "SpacingBetweenSlices": ALL, "SOPInstanceUID": ALL, "SeriesInstanceUID": ALL,
    "StudyInstanceUID": ALL, "FrameOfReferenceUID": ALL, "SOPClassUID": ALL, "Modality": ALL, "ImageType": ALL,
    "SeriesNumber": ALL, "InstanceNumber": ALL, "AcquisitionNumber": ALL, "KVP": ALL, "PatientID": ALL,
    "SeriesDescription": ALL, "PhotometricInterpretation": ALL, "WindowCenter": ALL, "GantryDetectorTilt": ALL,
    "StudyDate": ALL, "ConvolutionKernel": ALL,
}
# Elements inside the functional groups of the enhanced object (sequence, element, classes).
GROUP_ELEMENTS = [
    ("PlanePositionSequence", "ImagePositionPatient", NOT_ZERO_OR_NEGATIVE),
    ("PlaneOrientationSequence", "ImageOrientationPatient", ALL),
    ("PixelMeasuresSequence", "PixelSpacing", ALL),
    ("PixelMeasuresSequence", "SliceThickness", ALL),
    ("PixelValueTransformationSequence", "RescaleSlope", ALL),
    ("PixelValueTransformationSequence", "RescaleIntercept", NOT_ZERO_OR_NEGATIVE),
    ("PixelValueTransformationSequence", "RescaleType", ALL),
]
SWAPPABLE = ("SOPInstanceUID", "InstanceNumber", "AcquisitionNumber", "SeriesNumber", "RescaleIntercept")
BINARY_MAX = {"US": 65535, "UL": 2 ** 32 - 1, "SS": 32767, "SL": 2 ** 31 - 1}


# ------------------------------------------------------------------------------------------------ mutator
@dataclass
class Case:
    base: str
    datasets: List[Dataset]
    names: List[str]
    steps: List[str]
    file_edits: List[Tuple[str, str, int]]  # (op, file name, parameter) applied after writing


def _current_values(elem) -> list:
    value = elem.value
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return list(value)
    return [] if value in (None, "") else [value]


def _bad_value(rng: random.Random, ds: Dataset, keyword: str, cls: str) -> Optional[bytes]:
    """Raw bytes of value class ``cls`` for ``keyword`` (None: delete); the VR stays the dictionary's."""
    tag = tag_of(keyword)
    vr = dictionary_VR(tag)
    try:
        old = _current_values(ds[tag]) if tag in ds else []
    except Exception:  # noqa: BLE001 - an earlier step of this case left a value pydicom cannot convert
        old = []
    n = max(1, len(old))
    if vr in BINARY_MAX:
        top = BINARY_MAX[vr]
        numbers = {"nan": [top] * n, "inf": [top] * n, "-inf": [top] * n, "huge": [top] * n, "hugeint": [top] * n,
                   "zero": [0] * n, "negative": [top] * n}  # US cannot be negative: all-ones bits
        if cls in numbers:
            return encode(numbers[cls], vr)
        if cls == "text":
            return b"abc\0"
        if cls == "fewer":
            return encode([int(v) for v in old[:-1]] or [], vr) if old else b""
        if cls == "more":
            return encode([int(v) for v in old] + [int(old[-1]) if old else 1], vr)
        return b""  # empty
    texts = {"nan": "nan", "inf": "inf", "-inf": "-inf", "huge": "1e308", "hugeint": "2147483647", "zero": "0",
             "negative": "-1", "empty": "", "text": "abc"}
    if cls in texts:
        value = texts[cls]
        if cls in ("nan", "inf", "-inf", "huge", "hugeint", "zero", "negative") and n > 1:
            values = [str(v) for v in old]
            at = rng.randrange(n)  # one component of a multi-valued element
            if keyword == "ImageOrientationPatient" and cls == "negative":
                # -1 for a cosine of +-1 is a valid mirrored orientation (a valid value with another meaning,
                # see the module docstring): put it where it makes the cosines no unit vector
                at = rng.choice([i for i, v in enumerate(old) if abs(float(v)) < 0.5] or [at])
            values[at] = value
            return encode(values, vr)
        return encode(value, vr) if value else b""
    strings = [str(v) for v in old] or ["1"]
    if cls == "fewer":
        return encode(strings[:-1], vr) if len(strings) > 1 else b""
    if cls == "more":
        return encode(strings + [strings[-1]], vr)
    raise AssertionError(cls)


def _mutate_element(rng: random.Random, ds: Dataset, keyword: str, classes, steps: List[str], where: str
                    ) -> Optional[int]:
    """Apply one value class to ``keyword``; returns the tag when the file must get an unknown VR there."""
    cls = rng.choice(classes)
    tag = tag_of(keyword)
    if cls == "delete":
        if tag in ds:
            del ds[tag]
        steps.append(f"{where}: delete {keyword}")
        return None
    if cls == "unknown_vr":
        steps.append(f"{where}: unknown VR on {keyword}")
        if tag not in ds:
            set_raw(ds, tag, encode("1", "DS"), "DS")
        return int(tag)
    if cls == "retype":
        if tag not in ds:
            return
        raw = ds.get_item(tag)
        value = raw.value if isinstance(raw, pydicom.dataelem.RawDataElement) else None
        if value is None:
            try:
                elem = ds[tag]
                _current_values(elem)
            except Exception:  # noqa: BLE001 - already damaged by an earlier step of this case
                return None
            value = encode([str(v) for v in _current_values(elem)] or [""], "LO") \
                if elem.VR not in BINARY_MAX and elem.VR != "SQ" else None
        if value is None:
            return
        new_vr = rng.choice(["LO", "SH", "UN", "UT"])
        set_raw(ds, tag, value, new_vr)
        steps.append(f"{where}: retype {keyword} as {new_vr}")
        return None
    value = _bad_value(rng, ds, keyword, cls)
    set_raw(ds, tag, value)
    steps.append(f"{where}: {keyword} <- {cls} {value[:24]!r}")
    return None


def make_case(rng: random.Random, base: str, datasets: List[Dataset], names: List[str]) -> Case:
    datasets = [copy.deepcopy(ds) for ds in datasets]
    case = Case(base, datasets, list(names), [], [])
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        op = rng.choices(["element", "group", "file", "swap", "same_uid", "pixels"],
                         weights=[60, 10 if base == "enhanced_2_frames" else 0, 12, 6, 4, 8])[0]
        targets = list(range(len(datasets)))
        chosen = targets if rng.random() < 0.4 else [rng.choice(targets)]
        if op == "element":
            keyword = rng.choice(sorted(ELEMENTS))
            state = rng.getstate()
            for i in chosen:  # the same mutation on each chosen file
                rng.setstate(state)
                tag = _mutate_element(rng, datasets[i], keyword, ELEMENTS[keyword], case.steps, names[i])
                if tag is not None:
                    case.file_edits.insert(0, ("unknown_vr", names[i], tag))
        elif op == "group":
            ds = datasets[0]
            kind = rng.choice(["shared", "frame", "frame", "drop_item", "drop_shared"])
            if kind == "drop_item":
                del ds.PerFrameFunctionalGroupsSequence[rng.randrange(len(ds.PerFrameFunctionalGroupsSequence))]
                case.steps.append("drop a per-frame functional group item")
            elif kind == "drop_shared":
                del ds.SharedFunctionalGroupsSequence
                case.steps.append("drop the shared functional groups")
            else:
                sequence, keyword, classes = rng.choice(GROUP_ELEMENTS)
                groups = (ds.SharedFunctionalGroupsSequence if kind == "shared"
                          else [rng.choice(ds.PerFrameFunctionalGroupsSequence)])
                for item in groups:
                    if sequence in item and item[sequence].value:
                        tag = _mutate_element(rng, item[sequence].value[0], keyword, classes, case.steps,
                                              f"{kind} {sequence}")
                        if tag is not None:
                            case.file_edits.insert(0, ("unknown_vr", names[0], tag))
        elif op == "file":
            i = rng.choice(targets)
            kind = rng.choice(["truncate", "truncate_header", "empty", "duplicate", "extra_empty"])
            case.file_edits.append((kind, names[i], rng.randrange(1, 10 ** 6)))
            case.steps.append(f"{names[i]}: {kind}")
        elif op == "swap" and len(datasets) > 1:
            i, j = rng.sample(targets, 2)
            keyword = rng.choice(SWAPPABLE)
            a, b = datasets[i].get(keyword), datasets[j].get(keyword)
            if a is not None and b is not None:
                setattr(datasets[i], keyword, b)
                setattr(datasets[j], keyword, a)
                case.steps.append(f"swap {keyword} of {names[i]} and {names[j]}")
        elif op == "same_uid":
            keyword = rng.choice(["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"])
            value = rng.choice(["", "1.2.826.0.1.3680043.2.1125.99"])
            for i in chosen:
                setattr(datasets[i], keyword, value)
            case.steps.append(f"{keyword} <- {value!r} on {len(chosen)} file(s)")
        elif op == "pixels":
            i = rng.choice(targets)
            ds = datasets[i]
            if any(step.startswith(f"{names[i]}: pixel data") for step in case.steps):
                continue  # a second change could restore the length: pixel values are not header facts
            if ds.file_meta.TransferSyntaxUID.is_encapsulated:
                case.file_edits.append(("truncate", names[i], rng.randrange(1, 10 ** 6)))
                case.steps.append(f"{names[i]}: truncate (compressed pixels)")
            else:
                extra = rng.choice([-2, -1024, 2, 1024, len(ds.PixelData) // 2])
                data = ds.PixelData
                ds.PixelData = data[:extra] if extra < 0 else data + bytes(extra)
                case.steps.append(f"{names[i]}: pixel data {extra:+d} bytes")
    return case


def write_case(case: Case, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for ds, name in zip(case.datasets, case.names, strict=True):
        save(ds, folder / name)
    for kind, name, parameter in case.file_edits:
        path = folder / name
        raw = path.read_bytes()
        if kind == "unknown_vr":
            try:
                unknown_vr(path, parameter)
            except ValueError:
                pass  # not written in short explicit-VR form: nothing to patch
        elif kind == "truncate":
            path.write_bytes(raw[:parameter % len(raw)])
        elif kind == "truncate_header":
            path.write_bytes(raw[:132 + parameter % 2000])
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "duplicate":
            shutil.copy(path, folder / f"copy_of_{name}")
        elif kind == "extra_empty":
            (folder / f"empty_{name}").write_bytes(b"")
    return folder


# ------------------------------------------------------------------------------------------------ oracle
def _rows(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@dataclass
class Result:
    volumes: List[Tuple[np.ndarray, np.ndarray, Dict[str, str]]]  # canonical array, affine, inventory row
    inventory: List[Dict[str, str]]
    flags: Dict[str, str]  # series_id -> flags
    err: List[str]


def run_ingest(src: Path, out: Path) -> Result:
    err = io.StringIO()
    ingest([src], out, IngestConfig(selection=SelectionRules(min_slices=1)), progress=False, err=err, workers=1)
    inventory = _rows(out / ".private" / "inventory.csv")
    manifest = _rows(out / "manifest.csv")
    by_series = {r["series_id"]: r for r in inventory if r["kind"] == "series"}
    volumes = []
    for row in manifest:
        img = nib.as_closest_canonical(nib.load(out / row["image"]))
        volumes.append((np.asanyarray(img.dataobj), img.affine, by_series.get(row["series_id"], {})))
    return Result(volumes, inventory, {r["series_id"]: r["flags"] for r in manifest}, err.getvalue().splitlines())


def _sub_stack(array, affine, base_array, base_affine) -> bool:
    """``array`` is planes t..t+n of the baseline along the slice axis, at the same world positions."""
    if array.shape[:2] != base_array.shape[:2] or array.shape[2] > base_array.shape[2]:
        return False
    m = np.linalg.inv(base_affine) @ affine
    if not np.allclose(m[:3, :3], np.eye(3), atol=1e-4) or not np.allclose(m[:2, 3], 0, atol=1e-3):
        return False
    t = m[2, 3]
    if abs(t - round(t)) > 1e-3 or not 0 <= round(t) <= base_array.shape[2] - array.shape[2]:
        return False
    t = int(round(t))
    return bool(np.array_equal(array, base_array[:, :, t:t + array.shape[2]]))


def classify(result: Result, baseline: Result) -> str:
    if any(r["status"] == "failed" for r in result.inventory) or any("Traceback" in line for line in result.err):
        return "crash"
    if not result.volumes:
        reasons = [r["reason"] for r in result.inventory if r["status"] in ("refused", "skipped")]
        return "refused" if reasons and all(reasons) else "unexplained"
    base_array, base_affine, base_row = baseline.volumes[0]
    array, affine, row = max(result.volumes, key=lambda v: v[0].shape[2])
    if array.shape == base_array.shape and np.allclose(affine, base_affine, atol=1e-4) \
            and np.array_equal(array, base_array):
        return "identical"
    series_id = row.get("series_id", "")
    base_flags = next(iter(baseline.flags.values()))
    if row.get("notes") or result.flags.get(series_id, base_flags) != base_flags:
        return "explained"
    n_series = sum(r["kind"] == "series" for r in result.inventory)
    base_series = sum(r["kind"] == "series" for r in baseline.inventory)
    if _sub_stack(array, affine, base_array, base_affine) and n_series > base_series:
        return "explained"
    return "unexplained"


# ------------------------------------------------------------------------------------------------ the test
def _rescale_type_hu(ds: Dataset) -> None:
    """RescaleType HU wherever the dataset states one: the enhanced fixture is a perfusion map (US), which ingest
    refuses (not Hounsfield units); its functional groups are what the fuzzing is after."""
    for elem in ds.iterall():
        if elem.keyword == "RescaleType":
            elem.value = "HU"


@pytest.fixture(scope="module")
def bases(ct_data: Path, tmp_path_factory) -> Dict[str, Tuple[List[Dataset], List[str], Result]]:
    out = {}
    root = tmp_path_factory.mktemp("fuzz_bases")
    for name, (folder, files) in BASES.items():
        paths = [ct_data / folder / f for f in files] if files else sorted((ct_data / folder).iterdir())[:3]
        datasets = [pydicom.dcmread(p) for p in paths]
        for ds in datasets:
            _rescale_type_hu(ds)
        names = [p.name for p in paths]
        case = Case(name, datasets, names, [], [])
        baseline = run_ingest(write_case(case, root / name / "src"), root / name / "out")
        assert len(baseline.volumes) == 1 and baseline.err == [], (name, baseline.err)
        out[name] = (datasets, names, baseline)
    return out


def _fuzz(bases, tmp_path: Path, n_cases: int, seed: int) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    by_base: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    bad = []
    for k in range(n_cases):
        rng = random.Random(f"{seed}:{k}")
        base = rng.choice(sorted(bases))
        datasets, names, baseline = bases[base]
        case = make_case(rng, base, datasets, names)
        folder = tmp_path / f"case{k}"
        try:
            src = write_case(case, folder / "src")
        except Exception:  # noqa: BLE001 - a mutation pydicom cannot write is not a case
            counts["not written"] += 1
            shutil.rmtree(folder, ignore_errors=True)
            continue
        try:
            outcome = classify(run_ingest(src, folder / "out"), baseline)
        except Exception as exc:  # noqa: BLE001 - anything out of ingest is a crash
            outcome = "crash"
            case.steps.append(f"-> {type(exc).__name__}: {exc}")
        counts[outcome] += 1
        by_base[base][outcome] += 1
        if outcome in ("crash", "unexplained"):
            bad.append(f"case {k} ({base}): {outcome}: {'; '.join(case.steps)}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"\nfuzz seed {seed}, {n_cases} cases: {dict(sorted(counts.items()))}")
    for base, c in sorted(by_base.items()):
        print(f"  {base}: {dict(sorted(c.items()))}")
    assert not bad, "\n".join(bad[:20])
    assert counts["refused"] > n_cases // 10 and counts["identical"] > n_cases // 10  # the mutator bites
    return counts


def test_fuzz_headers(bases, tmp_path):
    _fuzz(bases, tmp_path, FUZZ_CASES, FUZZ_SEED)


@pytest.mark.slow
def test_fuzz_headers_slow(bases, tmp_path):
    _fuzz(bases, tmp_path, FUZZ_CASES_SLOW, FUZZ_SEED + 1)
