"""The ingest path's DICOM JSON encoder gives exactly what pydicom's to_json_dict gives."""

from __future__ import annotations

import json
import warnings

import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_files

from pacsd.index.dicomjson import to_json_dict


def _readable():
    files = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(set(get_testdata_files("*") + get_charset_files("*"))):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                ds.to_json_dict(8192, lambda element: "")
            except Exception:
                continue  # not DICOM, or pydicom itself cannot express it as JSON
            files.append(path)
    return files


FILES = _readable()


def test_the_corpus_is_not_empty():
    assert len(FILES) > 60


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.rsplit("/", 1)[-1])
def test_same_json_as_pydicom(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = to_json_dict(pydicom.dcmread(path, stop_before_pixels=True), 8192, lambda element: "")
        theirs = pydicom.dcmread(path, stop_before_pixels=True).to_json_dict(8192, lambda element: "")
    assert json.dumps(ours, sort_keys=True) == json.dumps(theirs, sort_keys=True)


def _raw_dataset(*elements) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.set_original_encoding(False, True)
    for tag, vr, value in elements:
        ds._dict[tag] = pydicom.dataelem.RawDataElement(tag, vr, len(value), value, 0, False, True)
    return ds


def test_raw_values_straight_to_json():
    ds = _raw_dataset((0x00280030, "DS", b"0.5 "), (0x00100010, "PN", b"Doe^John"),
                      (0x00280010, "US", b"\x00\x02"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = to_json_dict(ds, 8192, lambda element: "")
    assert out["00280030"] == {"vr": "DS", "Value": [0.5]}
    assert out["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}]}
    assert out["00280010"] == {"vr": "US", "Value": [512]}


def test_a_value_nobody_can_convert_is_an_error_as_with_pydicom():
    # The ingest path then leaves that element out of the index (levels.rows).
    ds = _raw_dataset((0x00200013, "IS", b"1A"))
    with warnings.catch_warnings(), pytest.raises(ValueError):
        warnings.simplefilter("ignore")
        to_json_dict(ds, 8192, lambda element: "")
