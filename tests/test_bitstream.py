"""Hostile-input tests for the `.lic` container: every defect must raise BitstreamError, nothing else."""

from __future__ import annotations

import random
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from lic_deploy.entropy.bitstream import (
    DEFAULT_MAX_PIXELS,
    FINGERPRINT_BYTES,
    FIXED_HEADER_BYTES,
    MAGIC,
    MAX_STREAMS,
    MODE_GRAY,
    MODE_RGB,
    Header,
    pack,
    unpack,
)
from lic_deploy.errors import BitstreamError

FP = bytes(range(0xA0, 0xA0 + FINGERPRINT_BYTES))
OTHER_FP = bytes(range(0x10, 0x10 + FINGERPRINT_BYTES))
HEADER = Header(fingerprint=FP, height=100, width=150, mode=MODE_RGB, pad_bottom=28, pad_right=42)
PAD = 64  # 100 + 28 = 128 and 150 + 42 = 192, both multiples of 64


def _payloads(seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randint(200, 400)) for _ in range(3)]


def _stream() -> bytes:
    return pack(HEADER, _payloads())


def _reject(data: object, **kwargs: object) -> str:
    """Assert unpack(data) raises BitstreamError and no other exception; return its one-line message."""
    try:
        unpack(data, **kwargs)  # type: ignore[arg-type]
    except Exception as exc:  # catch anything, so a wrong exception type fails with a clear message
        assert isinstance(exc, BitstreamError), f"{type(exc).__name__} escaped: {exc}"
        message = str(exc)
        assert message and "\n" not in message
        return message
    raise AssertionError(f"accepted {len(data) if hasattr(data, '__len__') else data!r}")


def _patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    """Overwrite a field and re-compute the CRC, so only the semantic checks can catch it."""
    buf = bytearray(data)
    struct.pack_into(fmt, buf, offset, value)
    struct.pack_into("<I", buf, len(buf) - 4, zlib.crc32(buf[:-4]))
    return bytes(buf)


def test_round_trip() -> None:
    payloads = _payloads()
    header, out = unpack(pack(HEADER, payloads), fingerprint=FP, pad_multiple=PAD, n_streams=3)
    assert header == HEADER
    assert out == payloads
    assert all(type(p) is bytes for p in out)


@pytest.mark.parametrize("payloads", [[b""], [b"", b"", b""], [b"x", b"", b"yz"], [b""] * MAX_STREAMS])
def test_round_trip_empty_and_many_streams(payloads: list[bytes]) -> None:
    header = Header(FP, height=1, width=1, mode=MODE_GRAY, pad_bottom=0, pad_right=0)
    assert unpack(pack(header, payloads)) == (header, payloads)


def test_layout_matches_the_documented_offsets() -> None:
    data = pack(HEADER, [b"ab", b"c"])
    assert data[:4] == MAGIC and data[4] == 1 and data[5] == MODE_RGB and data[6:8] == b"\0\0"
    assert data[8:24] == FP
    assert struct.unpack_from("<IIHHB", data, 24) == (100, 150, 28, 42, 2)
    assert struct.unpack_from("<II", data, FIXED_HEADER_BYTES) == (2, 1)
    assert data[45:48] == b"abc"
    assert struct.unpack("<I", data[-4:])[0] == zlib.crc32(data[:-4])
    assert len(data) == FIXED_HEADER_BYTES + 8 + 3 + 4


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_accepts_bytearray_and_memoryview(kind: type) -> None:
    data = _stream()
    assert unpack(kind(data)) == unpack(data)


@pytest.mark.parametrize("value", ["LICD", 3, None, [1, 2, 3], 1.5])
def test_wrong_input_type(value: object) -> None:
    assert "bytes" in _reject(value)


def test_released_memoryview() -> None:
    view = memoryview(_stream())
    view.release()
    _reject(view)


def test_truncated_at_every_position() -> None:
    data = _stream()
    for cut in range(len(data)):
        _reject(data[:cut])


def test_truncated_message_names_sizes() -> None:
    data = _stream()
    message = _reject(data[:-10])
    assert message.startswith("truncated") and str(len(data)) in message and str(len(data) - 10) in message
    assert _reject(data + b"\0").startswith("trailing bytes")


def test_every_bit_flip_in_header_and_crc() -> None:
    data = _stream()
    header_end = FIXED_HEADER_BYTES + 4 * 3
    positions = [*range(header_end), *range(len(data) - 4, len(data))]
    for pos in positions:
        for bit in range(8):
            buf = bytearray(data)
            buf[pos] ^= 1 << bit
            _reject(bytes(buf), fingerprint=FP, pad_multiple=PAD, n_streams=3)


def test_bit_flips_in_payload_fail_the_crc() -> None:
    data = _stream()
    rng = random.Random(1)
    for pos in rng.sample(range(FIXED_HEADER_BYTES + 12, len(data) - 4), 20):
        buf = bytearray(data)
        buf[pos] ^= 1 << rng.randrange(8)
        assert "CRC" in _reject(bytes(buf))


def test_random_bytes() -> None:
    rng = random.Random(2)
    for length in [0, 1, 3, 4, 36, 37, 44, 45, 46, 64, 100, 1000, 5000]:
        for _ in range(20):
            _reject(rng.randbytes(length))
    for _ in range(200):  # past the magic and version check, so the length table is exercised
        _reject(MAGIC + b"\x01" + rng.randbytes(rng.randint(0, 300)))


def test_magic_and_version_messages() -> None:
    data = _stream()
    assert "not a .lic stream" in _reject(b"PNG\0" + data[4:])
    assert "unsupported .lic version 2 (this build reads 1)" in _reject(data[:4] + b"\x02" + data[5:])


@pytest.mark.parametrize("n", [0, MAX_STREAMS + 1, 255])
def test_stream_count_out_of_range(n: int) -> None:
    assert "streams" in _reject(_patch(_stream(), 36, "<B", n))


def test_huge_declared_length_is_not_allocated() -> None:
    data = _patch(_stream(), FIXED_HEADER_BYTES, "<I", 0xFFFFFFFF)
    tracemalloc.start()
    try:
        message = _reject(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message.startswith("truncated")
    assert peak < 1 << 20


def test_wrong_fingerprint_names_both() -> None:
    message = _reject(_stream(), fingerprint=OTHER_FP)
    assert FP.hex()[:8] in message and OTHER_FP.hex()[:8] in message


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "words"),
    [
        (6, "<H", 1, "reserved"),
        (5, "<B", 2, "mode"),
        (24, "<I", 0, "empty"),
        (28, "<I", 0, "empty"),
    ],
)
def test_invalid_fields_with_valid_crc(offset: int, fmt: str, value: int, words: str) -> None:
    assert words in _reject(_patch(_stream(), offset, fmt, value))


def test_absurd_dimensions_rejected_quickly_without_allocation() -> None:
    data = _patch(_patch(_stream(), 24, "<I", 100_000), 28, "<I", 100_000)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        message = _reject(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 1.0
    assert peak < 1 << 20
    assert "100000x100000" in message and str(DEFAULT_MAX_PIXELS) in message
    largest = _patch(_patch(_stream(), 24, "<I", 0xFFFFFFFF), 28, "<I", 0xFFFFFFFF)
    _reject(largest)


def test_max_pixels_is_configurable() -> None:
    data = _stream()  # 100 x 150 = 15000 pixels
    assert "14999" in _reject(data, max_pixels=14_999)
    assert unpack(data, max_pixels=15_000)[0] == HEADER
    big = _patch(_patch(data, 24, "<I", 10_000), 28, "<I", 10_000)
    _reject(big)
    assert unpack(big, max_pixels=10_000 * 10_000)[0].height == 10_000


@pytest.mark.parametrize(
    ("pad_bottom", "pad_right", "multiple"),
    [
        (28, 42, 32),  # 150 + 42 = 192 is a multiple of 32, but 42 >= 32 is not the smallest pad
        (27, 42, 64),  # height + pad not a multiple
        (28, 41, 64),  # width + pad not a multiple
        (28 + 64, 42, 64),  # pad >= multiple
    ],
)
def test_pad_inconsistent_with_multiple(pad_bottom: int, pad_right: int, multiple: int) -> None:
    data = pack(Header(FP, 100, 150, MODE_RGB, pad_bottom, pad_right), _payloads())
    unpack(data)  # padding is not checked without a multiple
    assert "padding" in _reject(data, pad_multiple=multiple)


def test_n_streams_mismatch() -> None:
    data = _stream()
    assert "3" in _reject(data, n_streams=2) and "2" in _reject(data, n_streams=2)
    _reject(data, n_streams=4)
    assert len(unpack(data, n_streams=3)[1]) == 3


def test_fingerprint_checked_before_package_shape() -> None:
    """A stream from another package is reported as such, not as a stream-count or padding mismatch."""
    message = _reject(_stream(), fingerprint=OTHER_FP, n_streams=2, pad_multiple=16)
    assert "package" in message


@pytest.mark.parametrize(
    "header",
    [
        Header(b"short", 1, 1, MODE_RGB, 0, 0),
        Header(FP, 0, 1, MODE_RGB, 0, 0),
        Header(FP, 1, 1 << 32, MODE_RGB, 0, 0),
        Header(FP, 1, 1, 7, 0, 0),
        Header(FP, 1, 1, MODE_RGB, -1, 0),
        Header(FP, 1, 1, MODE_RGB, 0, 1 << 16),
    ],
)
def test_pack_rejects_unrepresentable_headers(header: Header) -> None:
    with pytest.raises(ValueError):
        pack(header, [b""])


def test_pack_rejects_bad_stream_lists() -> None:
    with pytest.raises(ValueError):
        pack(HEADER, [])
    with pytest.raises(ValueError):
        pack(HEADER, [b""] * (MAX_STREAMS + 1))
    with pytest.raises(TypeError):
        pack(HEADER, ["text"])  # type: ignore[list-item]


@pytest.mark.parametrize(
    "kwargs",
    [{"fingerprint": b"short"}, {"pad_multiple": 0}, {"max_pixels": 0}, {"n_streams": 0}, {"n_streams": 17}],
)
def test_unpack_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        unpack(_stream(), **kwargs)  # type: ignore[arg-type]


def test_golden_stream_decodes_identically() -> None:
    """tests/golden holds a package, a .lic stream it wrote and the image it decoded to (when it was made, with
    ONNX Runtime, 1 thread). Every later version must decode that stream to the same latents bit for bit, on ORT
    and on PyTorch: the guard for any change to the entropy path's speed. The 8-bit image may differ by 1 where
    float32 synthesis rounds differently on another CPU's kernels, never by more."""
    import hashlib
    import json

    from PIL import Image

    from lic_deploy.runtime.codec import Codec

    golden = Path(__file__).parent / "golden"
    expected = json.loads((golden / "golden.json").read_text())
    data = (golden / "stream.lic").read_bytes()
    assert hashlib.sha256(data).hexdigest() == expected["stream_sha256"]
    reference = np.asarray(Image.open(golden / "decoded.png"))
    for backend, intnet in (("ort", None), ("torch", None), ("torch", "torch:cpu"), ("ort", "ort")):
        decoded = Codec(golden / "package", backend, "fp32", threads=1, intnet=intnet).decode(data)
        y_hat = np.ascontiguousarray(decoded.y_hat, np.float32)
        assert hashlib.sha256(y_hat.tobytes()).hexdigest() == expected["y_hat_sha256"], backend
        assert list(decoded.image.shape) == expected["shape"]
        assert int(np.abs(decoded.image.astype(np.int16) - reference).max()) <= 1, backend
