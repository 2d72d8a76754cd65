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
    """The three payload streams of one image and the latents both sides agree on."""

    z_stream: bytes
    y_stream: bytes
    escapes: bytes
    y_hat: np.ndarray  # float32 [M, H/16, W/16], exactly what the decoder reconstructs


class EntropyModel:
    """Built from a package's entropy.npz arrays (no torch)."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        try:
            meta = json.loads(bytes(arrays["meta"].astype(np.uint8)).decode())
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
        self.hs = IntNet.from_arrays(arrays, "hs.")
        out = self.y_channels * (2 if self.has_means else 1)
        if (self.median_fp.shape != (self.z_channels,) or len(self.z_coder.models) != self.z_channels
                or len(self.y_coder.models) != self.thresholds.size + 1 or self.hs.out_channels != out
                or self.hs.in_channels != self.z_channels or np.any(np.diff(self.thresholds) < 0)):
            raise PackageError("entropy model arrays are inconsistent with each other")

    def z_symbols(self, z: np.ndarray) -> np.ndarray:
        """Float z [N, h, w] -> int64 symbols round(z - z_median), on the fixed-point median."""
        med = self.median_fp.astype(np.float64)[:, None, None] / (1 << self.z_frac_bits)
        return np.floor(z.astype(np.float64) - med + 0.5).astype(np.int64)

    def params(self, z_sym: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """z symbols -> (table index int64 [M, H, W], mean_fp int64 [M, H, W], zeros without means)."""
        out = self.hs(hs_input(z_sym, self.median_fp, self.z_frac_bits))
        m = self.y_channels
        index = np.searchsorted(self.thresholds, out[:m], side="left")
        mean_fp = out[m:] if self.has_means else np.zeros_like(out[:m])
        return index.astype(np.int64), mean_fp

    def y_hat(self, y_sym: np.ndarray, mean_fp: np.ndarray) -> np.ndarray:
        """Exact reconstruction y_sym + mean_fp / 2**param_frac_bits as float32."""
        scaled = y_sym.astype(np.int64) * (1 << self.param_frac_bits) + mean_fp
        return (scaled.astype(np.float64) / (1 << self.param_frac_bits)).astype(np.float32)

    def encode(self, y: np.ndarray, z: np.ndarray) -> Coded:
        """Float latents y [M, H, W] and z [N, h, w] (from any engine) -> payload streams."""
        escapes: list[int] = []
        z_sym = self.z_symbols(z)
        channel = np.broadcast_to(np.arange(self.z_channels)[:, None, None], z_sym.shape)
        z_stream = self.z_coder.encode(z_sym, channel, escapes)
        index, mean_fp = self.params(z_sym)
        if index.shape != y.shape:
            raise ValueError(f"y has shape {y.shape}, h_s predicts {index.shape}")
        mean = mean_fp.astype(np.float64) / (1 << self.param_frac_bits)
        y_sym = np.floor(y.astype(np.float64) - mean + 0.5).astype(np.int64)
        y_stream = self.y_coder.encode(y_sym, index, escapes)
        return Coded(z_stream, y_stream, encode_escapes(escapes), self.y_hat(y_sym, mean_fp))

    def decode(self, z_stream: bytes, y_stream: bytes, escapes: bytes, z_shape: tuple[int, int]) -> np.ndarray:
        """Payload streams and the z grid (h, w) -> y_hat float32 [M, 4h, 4w]. BitstreamError when malformed."""
        reader = EscapeReader(escapes)
        channel = np.broadcast_to(np.arange(self.z_channels)[:, None, None], (self.z_channels, *z_shape))
        z_sym = self.z_coder.decode(z_stream, channel, reader)
        if np.abs(z_sym).max(initial=0) > IN_MAX:
            raise BitstreamError("decoded hyper-latent is out of range")
        index, mean_fp = self.params(z_sym)
        y_sym = self.y_coder.decode(y_stream, index, reader)
        reader.finish()
        return self.y_hat(y_sym, mean_fp)
