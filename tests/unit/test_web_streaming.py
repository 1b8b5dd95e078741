"""Blob files as response bodies: every byte once, in order, whatever the chunk boundaries."""

from __future__ import annotations

import random

import pytest

from pacsd.web.streaming import file_chunks, multipart_files


@pytest.fixture
def files(tmp_path):
    rng = random.Random(7)
    out = []
    for n, size in enumerate([0, 1, 5, 16, 17, 100, 3]):
        path = tmp_path / f"f{n}"
        path.write_bytes(rng.randbytes(size))
        out.append((f"--b{n}\r\nContent-Type: application/dicom\r\n\r\n".encode(), path, size))
    return out


@pytest.mark.parametrize("chunk", [1, 7, 16, 64, 1 << 20])
def test_multipart_files_is_the_heads_and_files_in_order(files, chunk):
    tail = b"\r\n--b--\r\n"
    pieces = [bytes(piece) for piece in multipart_files(files, tail, chunk)]
    expected = b"".join(head + path.read_bytes() for head, path, _ in files) + tail
    assert b"".join(pieces) == expected
    # Pieces are filled up to the chunk size (a header never split) and none is empty.
    assert all(pieces) and all(len(p) <= max(chunk, 60) for p in pieces)
    if chunk == 1 << 20:
        assert len(pieces) == 1


def test_multipart_files_refuses_a_file_shorter_than_promised(files):
    head, path, size = files[5]
    with pytest.raises(OSError, match="ended 10 bytes early"):
        b"".join(multipart_files([(head, path, size + 10)], b"--end", 1 << 20))


@pytest.mark.parametrize("chunk", [1, 3, 1 << 20])
def test_file_chunks_gives_the_range(files, chunk):
    _, path, _ = files[5]
    data = path.read_bytes()
    assert b"".join(file_chunks(path, 10, 50, chunk)) == data[10:60]
    assert b"".join(file_chunks(path, 90, None, chunk)) == data[90:]
    with pytest.raises(OSError, match="early"):
        b"".join(file_chunks(path, 90, 20, chunk))
