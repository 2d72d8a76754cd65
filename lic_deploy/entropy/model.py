"""The deterministic entropy model of a hyperprior package: integer h_s, scale-index thresholds, CDF tables.

Everything here is integer arithmetic on values both sides know, so the encoder and every decoder compute the
same table indexes and means bit for bit, whatever engine or precision ran the float transforms. Fixed point:
- z_hat = z_sym + z_median_fp / 2**z_frac_bits; the integer h_s input is z_sym * 2**z_frac_bits + z_median_fp,
  clipped to +-IN_MAX.
- h_s returns scales (and means, mean-scale models) as integers with param_frac_bits fractional bits.
- Table index = #{i : y_thresholds[i] < scale_int} (= CompressAI's `build_indexes` on the fixed-point scale).
- y symbol = floor(y - mean + 1/2) (encoder only), y_hat = y_sym + mean_fp / 2**param_frac_bits (exact).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from lic_deploy.entropy.coder import EscapeReader, TableCoder, encode_escapes
from lic_deploy.entropy.intnet import IntNet
from lic_deploy.errors import BitstreamError, PackageError

IN_MAX = 2**15 - 1  # bound on |integer h_s input|


def hs_input(z_sym: np.ndarray, median_fp: np.ndarray, z_frac_bits: int) -> np.ndarray:
    """z symbols int64 [N, h, w] -> integer h_s input: z_hat in fixed point, clipped to +-IN_MAX."""
    x = z_sym.astype(np.int64) * (1 << z_frac_bits) + median_fp.astype(np.int64)[:, None, None]
    return np.clip(x, -IN_MAX, IN_MAX)


@dataclass
class Coded:
    """The payload streams of one image (z, one or more y streams, escapes) and the latents both sides agree on."""

    z_stream: bytes
    y_streams: list[bytes]
    escapes: bytes
    y_hat: np.ndarray  # float32 [M, H/16, W/16], exactly what the decoder reconstructs

    @property
    def streams(self) -> list[bytes]:
        """In container order: z, y..., escapes."""
        return [self.z_stream, *self.y_streams, self.escapes]


def open_entropy_model(arrays: Mapping[str, np.ndarray]) -> EntropyModel:
    """The entropy model a package's entropy.npz describes: hyperprior (`EntropyModel`) or ELIC."""
    kind = _read_meta(arrays).get("kind", "hyperprior")
    if kind == "elic":
        from lic_deploy.entropy.elic import ElicEntropyModel

        return ElicEntropyModel(arrays)
    if kind == "tcm":
        from lic_deploy.entropy.tcm import TcmEntropyModel

        return TcmEntropyModel(arrays)
    if kind != "hyperprior":
        raise PackageError(f"entropy model kind {kind!r} is not known to this lic-deploy")
    return EntropyModel(arrays)


def _read_meta(arrays: Mapping[str, np.ndarray]) -> dict:
    try:
        meta = json.loads(bytes(arrays["meta"].astype(np.uint8)).decode())
    except (KeyError, ValueError, TypeError) as exc:
        raise PackageError(f"entropy model has no readable metadata ({exc})") from None
    if not isinstance(meta, dict):
        raise PackageError("entropy model metadata is not a JSON object")
    return meta


class EntropyModel:
    """The hyperprior family's model, built from a package's entropy.npz arrays (no torch). Subclasses change
    how y is coded (`n_y_streams`, `encode_y`, `decode_y`); z coding and the tables are shared."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        meta = _read_meta(arrays)
        try:
            self.z_frac_bits = int(meta["z_frac_bits"])
            self.param_frac_bits = int(meta["param_frac_bits"])
            self.has_means = bool(meta["has_means"])
            self.y_channels, self.z_channels = int(meta["y_channels"]), int(meta["z_channels"])
            self.z_coder = TableCoder(arrays["z_cdf"], arrays["z_cdf_length"], arrays["z_offset"])
            self.y_coder = TableCoder(arrays["y_cdf"], arrays["y_cdf_length"], arrays["y_offset"])
            self.median_fp = np.asarray(arrays["z_median_fp"], dtype=np.int64)
            self.thresholds = np.asarray(arrays["y_thresholds"], dtype=np.int64)
        except (KeyError, ValueError, TypeError) as exc:
            raise PackageError(f"entropy model is incomplete or malformed ({exc})") from None
        if (self.median_fp.shape != (self.z_channels,) or len(self.z_coder.models) != self.z_channels
                or len(self.y_coder.models) != self.thresholds.size + 1 or np.any(np.diff(self.thresholds) < 0)):
            raise PackageError("entropy model arrays are inconsistent with each other")
        self._load_networks(arrays)

    def _load_networks(self, arrays: Mapping[str, np.ndarray]) -> None:
        """The integer networks between z symbols and y tables (here: h_s)."""
        self.hs = IntNet.from_arrays(arrays, "hs.")
        if self.hs.out_channels != self.hs_out or self.hs.in_channels != self.z_channels:
            raise PackageError("entropy model: h_s does not match the latents' channels")

    n_y_streams = 1

    @property
    def n_streams(self) -> int:
        """Payload streams in a .lic file of this model: z, the y streams, escapes."""
        return self.n_y_streams + 2

    @property
    def hs_out(self) -> int:
        """Output channels of the integer h_s."""
        return self.y_channels * (2 if self.has_means else 1)

    def ctx(self, y_fp: np.ndarray) -> np.ndarray:
        """What a context network reads of y_hat (fixed point, param_frac_bits): ctx_frac_bits fractional bits,
        clipped to +-IN_MAX (ELIC, TCM)."""
        return np.clip(y_fp >> (self.param_frac_bits - self.ctx_frac_bits), -IN_MAX, IN_MAX)

    def z_symbols(self, z: np.ndarray) -> np.ndarray:
        """Float z [N, h, w] -> int64 symbols round(z - z_median), on the fixed-point median."""
        med = self.median_fp.astype(np.float64)[:, None, None] / (1 << self.z_frac_bits)
        return np.floor(z.astype(np.float64) - med + 0.5).astype(np.int64)

    def y_hat(self, y_sym: np.ndarray, mean_fp: np.ndarray) -> np.ndarray:
        """Exact reconstruction y_sym + mean_fp / 2**param_frac_bits as float32."""
        return self._as_float(y_sym.astype(np.int64) * (1 << self.param_frac_bits) + mean_fp)

    def encode(self, y: np.ndarray, z: np.ndarray) -> Coded:
        """Float latents y [M, H, W] and z [N, h, w] (from any engine) -> payload streams."""
        if z.ndim != 3 or z.shape[0] != self.z_channels:
            raise PackageError(f"the package's h_a graph gives z of shape {z.shape}; its entropy model expects "
                               f"{self.z_channels} channels (the graphs and entropy.npz are from different packages)")
        escapes: list[int] = []
        z_sym = self.z_symbols(z)
        channel = np.broadcast_to(np.arange(self.z_channels)[:, None, None], z_sym.shape)
        z_stream = self.z_coder.encode(z_sym, channel, escapes)
        side = self._hyper_synthesis(z_sym)
        if side.shape[1:] != y.shape[1:] or y.shape[0] != self.y_channels:
            raise PackageError(f"the package's g_a graph gives y of shape {y.shape}; its entropy model predicts "
                               f"{side.shape[1:]} for {self.y_channels} channels (the graphs and entropy.npz are "
                               "from different packages)")
        y_streams, y_hat = self.encode_y(y, side, escapes)
        return Coded(z_stream, y_streams, encode_escapes(escapes), y_hat)

    def decode(self, streams: list[bytes], z_shape: tuple[int, int]) -> np.ndarray:
        """Payload streams (z, y..., escapes) and the z grid (h, w) -> y_hat float32 [M, 4h, 4w].
        BitstreamError when malformed."""
        reader = EscapeReader(streams[-1])
        channel = np.broadcast_to(np.arange(self.z_channels)[:, None, None], (self.z_channels, *z_shape))
        z_sym = self.z_coder.decode(streams[0], channel, reader)
        if np.abs(z_sym).max(initial=0) > IN_MAX:
            raise BitstreamError("decoded hyper-latent is out of range")
        side = self._hyper_synthesis(z_sym)
        y_hat = self.decode_y(streams[1:-1], side, reader)
        reader.finish()
        return y_hat

    def _hyper_synthesis(self, z_sym: np.ndarray) -> np.ndarray:
        """The integer h_s on z symbols; its seconds go to `hs_seconds` (the speed benchmark's step)."""
        t0 = time.perf_counter()
        side = self.hs(hs_input(z_sym, self.median_fp, self.z_frac_bits))
        self.hs_seconds = time.perf_counter() - t0
        return side

    def _as_float(self, y_fp: np.ndarray) -> np.ndarray:
        """y_hat in fixed point (param_frac_bits) as float32, exactly."""
        return (y_fp.astype(np.float64) / (1 << self.param_frac_bits)).astype(np.float32)

    def y_symbols(self, y: np.ndarray, mean_fp: np.ndarray) -> np.ndarray:
        """floor(y - mean + 1/2) as int64 (the encoder's quantization)."""
        mean = mean_fp.astype(np.float64) / (1 << self.param_frac_bits)
        return np.floor(y.astype(np.float64) - mean + 0.5).astype(np.int64)

    def table_index(self, scale_fp: np.ndarray) -> np.ndarray:
        """Fixed-point scales -> CDF table indexes (CompressAI's `build_indexes`)."""
        return np.searchsorted(self.thresholds, scale_fp, side="left").astype(np.int64)

    def encode_y(self, y: np.ndarray, side: np.ndarray, escapes: list[int]) -> tuple[list[bytes], np.ndarray]:
        """y [M, H, W] and the h_s output -> (y streams, y_hat)."""
        index, mean_fp = self._params(side)
        y_sym = self.y_symbols(y, mean_fp)
        return [self.y_coder.encode(y_sym, index, escapes)], self.y_hat(y_sym, mean_fp)

    def decode_y(self, streams: list[bytes], side: np.ndarray, reader: EscapeReader) -> np.ndarray:
        index, mean_fp = self._params(side)
        return self.y_hat(self.y_coder.decode(streams[0], index, reader), mean_fp)

    def params(self, z_sym: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """z symbols -> (table index int64 [M, H, W], mean_fp int64 [M, H, W], zeros without means)."""
        return self._params(self.hs(hs_input(z_sym, self.median_fp, self.z_frac_bits)))

    def _params(self, side: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = self.y_channels
        mean_fp = side[m:] if self.has_means else np.zeros_like(side[:m])
        return self.table_index(side[:m]), mean_fp
