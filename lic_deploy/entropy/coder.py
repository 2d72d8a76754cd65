"""Entropy coding of integer symbols with a package's stored CDF tables.

Tables use CompressAI's layout: table t has `cdf_length[t]` entries of a 16-bit CDF (cdf[0] = 0,
cdf[len-1] = 2**16); symbol index i in [0, len-2) codes value i + offset[t], and index len-2 is the escape.
Escaped values go, in raster order, to a separate byte stream as zigzag LEB128 varints.

The coder is constriction's range coder (Rust, exact fixed-point models; pinned in pyproject.toml because the
bitstream depends on its model quantization). Each table becomes one `Categorical` model built from the exact
probabilities cdf-difference / 2**16; symbols are coded grouped by table, in increasing table id, each group in
raster order. Both sides derive the groups from integers only, so encoder and decoder agree everywhere.
CompressAI's own rANS is not used: importing it imports torch.
"""

from __future__ import annotations

import numpy as np

from lic_deploy.errors import BitstreamError, PackageError

CDF_PRECISION = 16
MAX_ESCAPE_BYTES = 5  # a zigzag varint of a value with |v| < 2**31 takes at most 5 bytes


def _constriction():
    import constriction

    return constriction.stream


class TableCoder:
    """Categorical models for one set of CDF tables; codes int64 values chosen by per-position table ids."""

    def __init__(self, cdf: np.ndarray, cdf_length: np.ndarray, offset: np.ndarray) -> None:
        cdf, cdf_length, offset = (np.asarray(a, dtype=np.int64) for a in (cdf, cdf_length, offset))
        if cdf.ndim != 2 or cdf_length.shape != offset.shape or cdf_length.shape[0] != cdf.shape[0]:
            raise PackageError("entropy tables have inconsistent shapes")
        stream = _constriction()
        self.n_real = cdf_length - 2  # real symbols per table; index n_real[t] is the escape
        self.offset = offset
        self.models = []
        for t, length in enumerate(cdf_length):
            row = cdf[t, : int(length)]
            if length < 3 or length > cdf.shape[1] or row[0] != 0 or row[-1] != 1 << CDF_PRECISION \
                    or np.any(np.diff(row) <= 0):
                raise PackageError(f"entropy table {t} is not a valid {CDF_PRECISION}-bit CDF")
            pmf = np.diff(row).astype(np.float64) / float(1 << CDF_PRECISION)
            self.models.append(stream.model.Categorical(pmf, perfect=False))

    def _groups(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions sorted by table id, stably: raster order within a table; start of each table's group).
        The ids are cast to the smallest unsigned type that holds them, for which numpy's stable sort is a radix
        sort: the same order as sorting the int64 ids, in a quarter of the time."""
        n = len(self.models)
        key = t.astype(np.uint8 if n <= 1 << 8 else np.uint16 if n <= 1 << 16 else np.int64)
        counts = np.bincount(t, minlength=n)[:n]
        return np.argsort(key, kind="stable"), np.concatenate(([0], np.cumsum(counts)))

    def encode(self, values: np.ndarray, tables: np.ndarray, escapes: list[int]) -> bytes:
        """Code `values` (int64, any shape) with the tables `tables` (same shape); escapes are appended."""
        v, t = values.reshape(-1).astype(np.int64), tables.reshape(-1).astype(np.int64)
        idx = v - self.offset[t]
        n_real = self.n_real[t]
        esc = (idx < 0) | (idx >= n_real)
        idx[esc] = n_real[esc]
        escapes.extend(int(x) for x in v[esc])
        enc = _constriction().queue.RangeEncoder()
        order, bounds = self._groups(t)
        for table in np.flatnonzero(np.diff(bounds)):
            group = idx[order[bounds[table]:bounds[table + 1]]].astype(np.int32)
            enc.encode(group, self.models[table])
        return enc.get_compressed().astype("<u4").tobytes()

    def decode(self, data: bytes, tables: np.ndarray, escapes: EscapeReader) -> np.ndarray:
        """Inverse of `encode`: values (int64, shape of `tables`). BitstreamError on malformed data."""
        if len(data) % 4:
            raise BitstreamError("range-coded stream length is not a multiple of 4 bytes")
        t = tables.reshape(-1).astype(np.int64)
        idx = np.empty(t.shape, dtype=np.int64)
        order, bounds = self._groups(t)
        words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
        try:
            dec = _constriction().queue.RangeDecoder(words)
            for table in np.flatnonzero(np.diff(bounds)):
                n = int(bounds[table + 1] - bounds[table])
                idx[order[bounds[table]:bounds[table + 1]]] = dec.decode(self.models[table], n)
        except (ValueError, RuntimeError, AssertionError, OverflowError) as exc:
            raise BitstreamError(f"range-coded stream is malformed ({exc})") from None
        values = idx + self.offset[t]
        esc = np.flatnonzero(idx == self.n_real[t])
        if esc.size:
            values[esc] = escapes.read(esc.size)
        return values.reshape(tables.shape)


def encode_escapes(values: list[int]) -> bytes:
    """Zigzag LEB128: v >= 0 -> 2v, v < 0 -> -2v - 1, then 7 bits per byte, high bit = more bytes follow."""
    out = bytearray()
    for v in values:
        u = 2 * v if v >= 0 else -2 * v - 1
        while True:
            byte, u = u & 0x7F, u >> 7
            out.append(byte | (0x80 if u else 0))
            if not u:
                break
    return bytes(out)


class EscapeReader:
    """Reads zigzag LEB128 values in order; BitstreamError when they run out or are malformed."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        for i in range(count):
            u, shift = 0, 0
            while True:
                if self.pos >= len(self.data):
                    raise BitstreamError("escape stream ends early")
                byte = self.data[self.pos]
                self.pos += 1
                u |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
                if shift >= 7 * MAX_ESCAPE_BYTES:
                    raise BitstreamError("escape value is longer than 5 bytes")
            out[i] = u >> 1 if not u & 1 else -(u >> 1) - 1
        return out

    def finish(self) -> None:
        if self.pos != len(self.data):
            raise BitstreamError(f"escape stream has {len(self.data) - self.pos} unused bytes")
