"""Write a synthetic CT volume as a DICOM series the way scanners export it, quirks included.

One axial CT Image Storage file per slice, 12-bit unsigned stored values with RescaleSlope 1 /
RescaleIntercept -1024 (HU = stored - 1024), and the usual head-first-supine geometry:
ImageOrientationPatient ``[1, 0, 0, 0, 1, 0]`` (rows run to the patient's left, columns to the back) in
DICOM's LPS world, which is the RAS+ NIfTI affine with x and y negated. Slice files get hash-like names that
sort out of slice order, and a coronal LOCALIZER (a projection image, its own series) sits in the same
folder, as in real exports, so a reader has to sort by position and drop the localizer.

All UIDs come from ``pydicom.uid.generate_uid(entropy_srcs=...)`` over (seed, patient, series, instance):
the same input gives byte-identical files. Patient name and ID are the synthetic patient id.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import List

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

RESCALE_INTERCEPT = -1024
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


def _uid(seed: int, patient_id: str, *parts: object) -> str:
    return generate_uid(entropy_srcs=["pancls-synth", str(seed), patient_id, *map(str, parts)])


def _file_name(seed: int, patient_id: str, what: str) -> str:
    """Hash-like name (like many PACS exports): sorts in no relation to the slice order."""
    return "IM" + hashlib.sha256(f"{seed}/{patient_id}/{what}".encode()).hexdigest()[:10].upper()


def _stored(hu: np.ndarray) -> np.ndarray:
    stored = hu.astype(np.int32) - RESCALE_INTERCEPT
    if stored.min() < 0 or stored.max() > 4095:
        raise ValueError("HU outside [-1024, 3071] cannot be stored in 12 bits")  # generate_phantom clips
    return stored.astype(np.uint16)


def _base(seed: int, patient_id: str, study_uid: str, frame_uid: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.PatientName = patient_id
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "pancls synthetic abdominal CT"
    ds.Modality = "CT"
    ds.Manufacturer = "pancls"
    ds.ManufacturerModelName = "synthetic phantom"
    ds.BodyPartExamined = "ABDOMEN"
    ds.PatientPosition = "HFS"
    ds.KVP = "120"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = str(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def _finish(ds: Dataset, sop_uid: str, pixels: np.ndarray, path: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPInstanceUID = sop_uid
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = np.ascontiguousarray(pixels, "<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def ct_slices(image: np.ndarray, affine: np.ndarray) -> List[tuple]:
    """(pixels, ImagePositionPatient) per axial slice k of a RAS+ volume, for IOP ``[1, 0, 0, 0, 1, 0]``.

    Pixel ``[r, c]`` of slice k is voxel ``(nx-1-c, ny-1-r, k)``: columns run towards -x (RAS) = +x (LPS),
    rows towards -y (RAS) = +y (LPS). The first pixel is voxel ``(nx-1, ny-1, k)``.
    """
    nx, ny, nz = image.shape
    out = []
    for k in range(nz):
        corner_ras = affine @ np.array([nx - 1, ny - 1, k, 1.0])
        out.append((image[::-1, ::-1, k].T, _LPS_FROM_RAS @ corner_ras[:3]))
    return out


def write_ct_series(folder: str | os.PathLike, image: np.ndarray, affine: np.ndarray, patient_id: str,
                    seed: int, overwrite: bool = False) -> Path:
    """Write ``image`` (int16 HU, axis-aligned RAS+ ``affine``) as ``folder/`` = axial series + localizer.

    The folder appears complete or not at all: files are written into a temporary sibling folder that
    is renamed at the end. An existing ``folder`` is replaced only with ``overwrite``.
    """
    folder = Path(folder)
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))) or (np.diag(affine)[:3] <= 0).any():
        raise ValueError("write_ct_series needs an axis-aligned RAS+ affine with positive spacings")
    spacing = np.diag(affine)[:3]
    study = _uid(seed, patient_id, "study")
    frame = _uid(seed, patient_id, "frame")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        series = _uid(seed, patient_id, "series", 2)
        slices = ct_slices(image, affine)
        # scanners number axial images head to feet: instance 1 is the most superior slice
        for number, k in enumerate(range(len(slices) - 1, -1, -1), start=1):
            pixels, position = slices[k]
            ds = _base(seed, patient_id, study, frame)
            ds.SeriesInstanceUID = series
            ds.SeriesNumber = 2
            ds.SeriesDescription = "Abdomen pancreatic phase"
            ds.InstanceNumber = number
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.ConvolutionKernel = "B30f"
            ds.SliceThickness = f"{spacing[2]:g}"
            ds.SpacingBetweenSlices = f"{spacing[2]:g}"
            ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[0]:g}"]  # row spacing (along y), column spacing
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
            ds.SliceLocation = f"{position[2]:.4f}"
            ds.WindowCenter, ds.WindowWidth = "40", "400"
            _finish(ds, _uid(seed, patient_id, "series", 2, number), _stored(pixels), tmp / _file_name(seed, patient_id, number))
        _write_localizer(tmp, image, affine, patient_id, seed, study, frame)
        if folder.exists():
            if not overwrite:
                raise FileExistsError(folder)
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def _write_localizer(tmp: Path, image: np.ndarray, affine: np.ndarray, patient_id: str, seed: int,
                     study: str, frame: str) -> None:
    """A coronal projection (mean HU along y) as a one-image LOCALIZER series: rows run feet-wards."""
    nx, ny, nz = image.shape
    spacing = np.diag(affine)[:3]
    projection = np.rint(image.astype(np.float32).mean(axis=1)).astype(np.int16)  # (nx, nz)
    pixels = projection[::-1, ::-1].T  # [r, c] = voxel (nx-1-c, ., nz-1-r)
    corner = _LPS_FROM_RAS @ (affine @ np.array([nx - 1, (ny - 1) / 2, nz - 1, 1.0]))[:3]
    ds = _base(seed, patient_id, study, frame)
    ds.SeriesInstanceUID = _uid(seed, patient_id, "series", 1)
    ds.SeriesNumber = 1
    ds.SeriesDescription = "Topogram"
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.PixelSpacing = [f"{spacing[2]:g}", f"{spacing[0]:g}"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.ImagePositionPatient = [f"{v:.4f}" for v in corner]
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    _finish(ds, _uid(seed, patient_id, "series", 1, 1), _stored(pixels), tmp / _file_name(seed, patient_id, "localizer"))
