"""The `.lic` container: a fixed header, a table of stream lengths, the payload streams and a CRC32.

Layout (little-endian; see docs/bitstream.md):

    0   4    magic b"LICD"
    4   1    version
    5   1    mode (MODE_RGB / MODE_GRAY)
    6   2    reserved, 0
    8   16   package fingerprint
    24  4    height, pixels (u32)
    28  4    width, pixels (u32)
    32  2    pad_bottom, rows (u16)
    34  2    pad_right, columns (u16)
    36  1    number of streams n (u8, 1..MAX_STREAMS)
    37  4*n  stream lengths, bytes (u32 each)
    ...      payloads, concatenated in order
    end-4 4  zlib.crc32 of every byte before it

`unpack` treats its input as hostile: every defect raises `BitstreamError` with a one-line message, and
nothing is allocated from a declared size before the declared sizes are checked against the bytes present.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from lic_deploy.errors import BitstreamError

MAGIC = b"LICD"
VERSION = 1
FINGERPRINT_BYTES = 16
DEFAULT_MAX_PIXELS = 1 << 26  # cap on height*width of the original image, checked before any allocation
MAX_STREAMS = 16
MODE_RGB = 0
MODE_GRAY = 1  # the decoder returns a greyscale image for MODE_GRAY

_FIXED = struct.Struct("<4sBBH16sIIHHB")  # everything up to and including the stream count
_LENGTH = struct.Struct("<I")
_CRC = struct.Struct("<I")
FIXED_HEADER_BYTES = _FIXED.size  # 37
MIN_STREAM_BYTES = FIXED_HEADER_BYTES + _LENGTH.size + _CRC.size  # one (empty) stream: 45
_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFFFFFF
_MODES = (MODE_RGB, MODE_GRAY)


@dataclass(frozen=True)
class Header:
    """Everything the decoder needs besides the payloads.

    The coded tensor covers (height + pad_bottom) x (width + pad_right) pixels; the decoder crops the
    padding off to return a height x width image.
    """

    fingerprint: bytes  # FINGERPRINT_BYTES bytes identifying the codec package
    height: int  # original image height, pixels (>= 1)
    width: int  # original image width, pixels (>= 1)
    mode: int  # MODE_RGB or MODE_GRAY
    pad_bottom: int  # rows added at the bottom to reach the package's padding multiple
    pad_right: int  # columns added at the right


def _check_header(header: Header) -> None:
    """Raise ValueError if `header` cannot be written in the container's fixed-width fields."""
    if not isinstance(header.fingerprint, bytes) or len(header.fingerprint) != FINGERPRINT_BYTES:
        raise ValueError(f"fingerprint must be {FINGERPRINT_BYTES} bytes, got {header.fingerprint!r}")
    if header.mode not in _MODES:
        raise ValueError(f"mode must be MODE_RGB ({MODE_RGB}) or MODE_GRAY ({MODE_GRAY}), got {header.mode}")
    for name, value, low, high in (
        ("height", header.height, 1, _U32_MAX),
        ("width", header.width, 1, _U32_MAX),
        ("pad_bottom", header.pad_bottom, 0, _U16_MAX),
        ("pad_right", header.pad_right, 0, _U16_MAX),
    ):
        if not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def pack(header: Header, streams: Sequence[bytes]) -> bytes:
    """Serialise `header` and 1..MAX_STREAMS payloads (each at most 2**32-1 bytes) into a `.lic` stream.

    Raises ValueError (TypeError for a payload that is not bytes/bytearray) on arguments that cannot be
    represented; does not apply `unpack`'s pixel cap, which is the reader's policy.
    """
    _check_header(header)
    if not 1 <= len(streams) <= MAX_STREAMS:
        raise ValueError(f"need 1..{MAX_STREAMS} streams, got {len(streams)}")
    for i, payload in enumerate(streams):
        if not isinstance(payload, (bytes, bytearray)):
            raise TypeError(f"stream {i} must be bytes or bytearray, got {type(payload).__name__}")
        if len(payload) > _U32_MAX:
            raise ValueError(f"stream {i} is {len(payload)} bytes; the limit is {_U32_MAX}")
    head = _FIXED.pack(
        MAGIC,
        VERSION,
        header.mode,
        0,
        header.fingerprint,
        header.height,
        header.width,
        header.pad_bottom,
        header.pad_right,
        len(streams),
    )
    body = b"".join([head, *(_LENGTH.pack(len(s)) for s in streams), *streams])
    return body + _CRC.pack(zlib.crc32(body))


def _as_bytes(data: object) -> bytes:
    """Return `data` as bytes, or raise BitstreamError if it is not a bytes-like object we accept."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        try:
            return bytes(data)
        except ValueError as exc:  # a released memoryview
            raise BitstreamError(f"cannot read the .lic input: {exc}") from None
    raise BitstreamError(f"a .lic stream must be bytes, bytearray or memoryview, got {type(data).__name__}")


def padding(size: int, multiple: int, min_size: int = 0) -> int:
    """Rows (or columns) a package adds to `size` pixels: up to the next multiple of `multiple`, and up to the
    first multiple that is at least `min_size` (TCM: multiples of 128, at least 256)."""
    return max(-(-size // multiple), -(-min_size // multiple)) * multiple - size


def unpack(
    data: bytes | bytearray | memoryview,
    *,
    fingerprint: bytes | None = None,
    pad_multiple: int | None = None,
    min_size: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    n_streams: int | None = None,
) -> tuple[Header, list[bytes]]:
    """Parse and validate a `.lic` stream; return its header and payloads (bytes, in order).

    Checks structure first (length, magic, version, stream count, declared lengths, CRC), then field values
    (reserved, mode, height*width <= max_pixels), then the binding to a package (`fingerprint`,
    `n_streams`, padding equal to `padding(size, pad_multiple, min_size)`; each only when given). Any failure raises
    BitstreamError with a one-line message. Arguments that are themselves invalid raise ValueError.
    """
    if fingerprint is not None and (
        not isinstance(fingerprint, bytes) or len(fingerprint) != FINGERPRINT_BYTES
    ):
        raise ValueError(f"fingerprint must be {FINGERPRINT_BYTES} bytes, got {fingerprint!r}")
    if pad_multiple is not None and pad_multiple < 1:
        raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    if n_streams is not None and not 1 <= n_streams <= MAX_STREAMS:
        raise ValueError(f"n_streams must be in 1..{MAX_STREAMS}, got {n_streams}")

    buf = _as_bytes(data)
    if len(buf) < MIN_STREAM_BYTES:
        raise BitstreamError(
            f"too short for a .lic stream: {len(buf)} bytes, the smallest possible is {MIN_STREAM_BYTES}"
        )
    magic, version, mode, reserved, fp, height, width, pad_bottom, pad_right, n = _FIXED.unpack_from(buf)
    if magic != MAGIC:
        raise BitstreamError(f"not a .lic stream (starts with {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise BitstreamError(f"unsupported .lic version {version} (this build reads {VERSION})")
    if not 1 <= n <= MAX_STREAMS:
        raise BitstreamError(f"corrupt .lic header: {n} streams declared, must be 1..{MAX_STREAMS}")
    table_end = FIXED_HEADER_BYTES + _LENGTH.size * n
    if len(buf) < table_end + _CRC.size:
        raise BitstreamError(
            f"truncated: header declares at least {table_end + _CRC.size} bytes, got {len(buf)}"
        )
    lengths = [_LENGTH.unpack_from(buf, FIXED_HEADER_BYTES + _LENGTH.size * i)[0] for i in range(n)]
    declared = table_end + sum(lengths) + _CRC.size
    if declared > len(buf):
        raise BitstreamError(f"truncated: header declares {declared} bytes, got {len(buf)}")
    if declared < len(buf):
        raise BitstreamError(f"trailing bytes: header declares {declared} bytes, got {len(buf)}")
    (stored_crc,) = _CRC.unpack_from(buf, len(buf) - _CRC.size)
    if zlib.crc32(memoryview(buf)[: -_CRC.size]) != stored_crc:
        raise BitstreamError("CRC mismatch: the stream is corrupt")

    if reserved != 0:
        raise BitstreamError(f"corrupt .lic header: reserved field is {reserved}, must be 0")
    if mode not in _MODES:
        raise BitstreamError(f"corrupt .lic header: unknown mode {mode} (0 = RGB, 1 = greyscale)")
    if height < 1 or width < 1:
        raise BitstreamError(f"corrupt .lic header: image size {height}x{width} is empty")
    if height * width > max_pixels:
        raise BitstreamError(
            f"image {height}x{width} ({height * width} pixels) exceeds the cap of {max_pixels} pixels "
            "(raise max_pixels to decode it)"
        )
    if fingerprint is not None and fp != fingerprint:
        raise BitstreamError(
            f"stream was encoded with package {fp.hex()} but this package is {fingerprint.hex()}"
        )
    if n_streams is not None and n != n_streams:
        raise BitstreamError(f"stream has {n} payload streams, this package expects {n_streams}")
    if pad_multiple is not None:
        for name, size, pad in (("height", height, pad_bottom), ("width", width, pad_right)):
            if pad != padding(size, pad_multiple, min_size):
                raise BitstreamError(
                    f"corrupt .lic header: padding {pad} for {name} {size} is not the smallest that reaches "
                    f"a multiple of {pad_multiple}" + (f" of at least {min_size}" if min_size else "")
                    + " (this package's geometry)"
                )

    payloads = []
    offset = table_end
    for length in lengths:
        payloads.append(buf[offset : offset + length])
        offset += length
    header = Header(fp, height, width, mode, pad_bottom, pad_right)
    return header, payloads
