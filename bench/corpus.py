"""Deterministic benchmark corpora: the same bytes on every run and every machine.

    python bench/corpus.py DIR            # small (2,000 CT 64x64), ct512 (one study, 200 CT 512x512)
                                          # and find (1,000 studies of one CT 64x64 each)
    python bench/corpus.py DIR --huge     # also one 1 GiB multi-frame instance

The find corpus gives its studies the same patients and dates as the synthetic index that
bench/run.py fills directly (study_identity), so one query mix serves both.

Files are written with pydicom, except the pixel data of the huge instance, which is
streamed so that generating it needs no more memory than sending it should.
"""

from __future__ import annotations

import argparse
import random
import struct
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

EXPLICIT_LE = ExplicitVRLittleEndian
MULTIFRAME_CT = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
PREFIX = "1.2.826.0.1.3680043.10.1428."  # a root reserved for pacsd's benchmark corpora


NAMES = ["ADAMS", "BAKER", "CLARK", "DAVIS", "EVANS", "FRANK", "GREEN", "HARRIS", "IRWIN", "JONES"]


def study_identity(study: int) -> dict[str, str]:
    """Patient and date of study number `study` in the C-FIND corpora: 5 studies a patient,
    dates spread over 2010-2025."""
    patient = study // 5
    rng = random.Random(study)
    return {"PatientName": f"{NAMES[patient % 10]}^{chr(65 + patient % 26)}{patient:05d}",
            "PatientID": f"P{patient:06d}",
            "StudyDate": f"20{10 + study % 16:02d}{1 + rng.randrange(12):02d}{1 + rng.randrange(28):02d}"}


def uid(*parts: object) -> str:
    return generate_uid(PREFIX, entropy_srcs=[str(p) for p in parts])


def ct_dataset(corpus: str, index: int, size: int, studies: int) -> Dataset:
    study = index % studies
    series = (index // studies) % 4
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid(corpus, "instance", index)
    ds.StudyInstanceUID = uid(corpus, "study", study)
    ds.SeriesInstanceUID = uid(corpus, "series", study, series)
    ds.FrameOfReferenceUID = uid(corpus, "for", study)
    ds.PatientName = f"BENCH^{corpus.upper()}{study:03d}"
    ds.PatientID = f"{corpus}-{study:04d}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = f"2026{1 + study % 12:02d}{1 + study % 28:02d}"
    ds.StudyTime = "120000"
    ds.AccessionNumber = f"A{study:07d}"
    ds.StudyID = str(study)
    ds.ReferringPhysicianName = "REFERRER^BENCH"
    ds.StudyDescription = f"Benchmark {corpus}"
    ds.Modality = "CT"
    ds.SeriesNumber = series + 1
    ds.SeriesDescription = f"Series {series + 1}"
    ds.InstanceNumber = index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [0, 0, float(index)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 1.0
    ds.KVP = 120
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(index)
    ds.PixelData = rng.integers(0, 4096, size=(size, size), dtype=np.uint16).tobytes()
    return ds


def file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = EXPLICIT_LE
    meta.ImplementationClassUID = PREFIX + "1"
    return meta


def write_ct(directory: Path, corpus: str, count: int, size: int, studies: int,
             identity: bool = False) -> list[Path]:
    """`count` CT instances spread over `studies` studies; with `identity`, each study's
    patient and date come from study_identity."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = directory / f"{corpus}{index:05d}.dcm"
        paths.append(path)
        if path.exists():
            continue
        ds = ct_dataset(corpus, index, size, studies)
        if identity:
            for keyword, value in study_identity(index % studies).items():
                setattr(ds, keyword, value)
        ds.file_meta = file_meta(ds.SOPClassUID, ds.SOPInstanceUID)
        ds.save_as(path, enforce_file_format=True)
    return paths


def write_small(directory: Path) -> list[Path]:
    return write_ct(directory / "small", "small", 2000, 64, 20)


def write_ct512(directory: Path) -> list[Path]:
    return write_ct(directory / "ct512", "ct512", 200, 512, 1)


def write_find(directory: Path, studies: int = 1000) -> list[Path]:
    return write_ct(directory / "find", "find", studies, 64, studies, identity=True)


def write_huge(directory: Path, total_bytes: int = 1 << 30, size: int = 512) -> Path:
    """One Enhanced CT instance of `total_bytes` pixel data, written frame by frame."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "huge.dcm"
    frame_bytes = size * size * 2
    frames = total_bytes // frame_bytes
    if path.exists() and path.stat().st_size > frames * frame_bytes:
        return path
    ds = ct_dataset("huge", 0, size, 1)
    del ds.PixelData
    ds.SOPClassUID = MULTIFRAME_CT
    ds.NumberOfFrames = frames
    ds.file_meta = file_meta(ds.SOPClassUID, ds.SOPInstanceUID)
    tmp = path.with_suffix(".part")
    ds.save_as(tmp, enforce_file_format=True)
    frame = np.random.default_rng(7).integers(0, 4096, size=(size, size), dtype=np.uint16).tobytes()
    with open(tmp, "ab") as f:
        # (7FE0,0010) OW, explicit VR LE: tag, VR, 2 reserved bytes, 4-byte length
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, frames * frame_bytes))
        for _ in range(frames):
            f.write(frame)
    tmp.rename(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--huge", action="store_true", help="also write the 1 GiB instance")
    args = parser.parse_args()
    small = write_small(args.directory)
    large = write_ct512(args.directory)
    find = write_find(args.directory)
    print(f"{len(small)} small, {len(large)} large and {len(find)} C-FIND CT instances in {args.directory}")
    if args.huge:
        print(f"huge instance: {write_huge(args.directory / 'huge')}")


if __name__ == "__main__":
    main()
