"""ELIC's deterministic entropy model: integer h_s, channel-context, checkerboard and aggregation networks.

Coding order (CompressAI's): channel groups in sequence; within a group, anchors ((row + column) even), then
non-anchors. One range-coded y stream per (group, pass), so 2 * groups y streams; escapes go to the shared
escape stream in the same order. Per group k and pass:

    C   = cc_k(ctx(y_hat of groups < k))                       (k >= 1; act_bits codes, per-tensor scale)
    S   = 0 for anchors, sp_k(ctx(y_hat of the group's anchors)) for non-anchors
    out = agg_k([S, C, side]) at the pass's positions             (1x1 convs; scales and means, param_frac bits)

`side` is the integer h_s output (act_bits codes: int16 by default). y_hat is kept exactly as
y_sym * 2**param_frac_bits + mean_fp; ctx(v) = clip(v >> (param_frac_bits - ctx_frac_bits), +-IN_MAX) is what
the context networks read. The aggregation networks take inputs of three scales;
`lic_deploy.export.intnet_build.build_scaled_intnet` folds the scales into their first layer. Every step is
integer arithmetic, so encoder and decoder agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from lic_deploy.entropy.bitstream import MAX_STREAMS
from lic_deploy.entropy.coder import EscapeReader
from lic_deploy.entropy.intnet import IntNet
from lic_deploy.entropy.model import IN_MAX, EntropyModel, _read_meta
from lic_deploy.errors import PackageError


def anchor_mask(h: int, w: int) -> np.ndarray:
    """bool [h, w], True at anchors: (row + column) even (CompressAI's `anchor_parity="even"`)."""
    return (np.add.outer(np.arange(h), np.arange(w)) % 2) == 0


# (step, table index [g, n], mean_fp [g, n], channels c0:c1, rows, cols) -> y symbols [g, n]
Step = Callable[[int, np.ndarray, np.ndarray, int, int, np.ndarray, np.ndarray], np.ndarray]


class ElicEntropyModel(EntropyModel):
    """Built from an ELIC package's entropy.npz (no torch)."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        meta = _read_meta(arrays)
        try:
            self.groups = [int(g) for g in meta["groups"]]
            self.ctx_frac_bits = int(meta["ctx_frac_bits"])
            self.side_channels = int(meta["side_channels"])
        except (KeyError, ValueError, TypeError) as exc:
            raise PackageError(f"ELIC entropy model metadata is incomplete ({exc})") from None
        if not self.groups or 2 + 2 * len(self.groups) > MAX_STREAMS:
            raise PackageError(f"ELIC entropy model: {len(self.groups)} groups do not fit a .lic container")
        super().__init__(arrays)
        self.cc = [None, *[IntNet.from_arrays(arrays, f"cc{k}.") for k in range(1, len(self.groups))]]
        self.sp = [IntNet.from_arrays(arrays, f"sp{k}.") for k in range(len(self.groups))]
        self.agg = [IntNet.from_arrays(arrays, f"agg{k}.") for k in range(len(self.groups))]
        if sum(self.groups) != self.y_channels or not 0 <= self.ctx_frac_bits <= self.param_frac_bits or any(
                self.sp[k].in_channels != g or self.sp[k].out_channels != 2 * g or self.agg[k].out_channels != 2 * g
                or min(self.sp[k].in_max, self.cc[k].in_max if k else IN_MAX) < IN_MAX
                or self.agg[k].in_max < max(n.layers[-1].bound for n in (self.hs, self.sp[k], self.cc[k] or self.hs))
                or self.agg[k].in_channels != 2 * g * (2 if k else 1) + self.side_channels
                or (k and (self.cc[k].in_channels != sum(self.groups[:k]) or self.cc[k].out_channels != 2 * g))
                for k, g in enumerate(self.groups)):
            raise PackageError("ELIC entropy model networks are inconsistent with its groups")

    def params(self, z_sym: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Not defined for ELIC: its y parameters depend on y symbols decoded earlier (use encode_y/decode_y)."""
        raise TypeError("ELIC's y parameters depend on earlier y symbols; use encode_y/decode_y")

    @property
    def n_y_streams(self) -> int:  # type: ignore[override]
        return 2 * len(self.groups)

    @property
    def hs_out(self) -> int:
        return self.side_channels

    def _code(self, side: np.ndarray, step: Step) -> np.ndarray:
        """Run the groups and passes in order; `step` codes one pass. Returns y_hat in fixed point, int64."""
        h, w = side.shape[1:]
        anchor = anchor_mask(h, w)
        y_fp = np.zeros((self.y_channels, h, w), dtype=np.int64)
        c0 = 0
        for k, g in enumerate(self.groups):
            c1 = c0 + g
            channel = self.cc[k](self.ctx(y_fp[:c0])) if k else None
            for p, sel in enumerate((anchor, ~anchor)):
                rows, cols = np.nonzero(sel)  # both passes non-empty: the y grid is at least 4 x 4
                spatial = (np.zeros((2 * g, rows.size), dtype=np.int64) if p == 0
                           else self.sp[k](self.ctx(y_fp[c0:c1]))[:, rows, cols])
                feats = [spatial, *([channel[:, rows, cols]] if channel is not None else []), side[:, rows, cols]]
                out = self.agg[k](np.concatenate(feats)[:, :, None])[:, :, 0]
                index, mean_fp = self.table_index(out[:g]), out[g:]
                y_sym = step(2 * k + p, index, mean_fp, c0, c1, rows, cols)
                y_fp[c0:c1, rows, cols] = y_sym * (1 << self.param_frac_bits) + mean_fp
            c0 = c1
        return y_fp

    def encode_y(self, y: np.ndarray, side: np.ndarray, escapes: list[int]) -> tuple[list[bytes], np.ndarray]:
        streams: list[bytes] = []

        def step(_: int, index: np.ndarray, mean_fp: np.ndarray, c0: int, c1: int, rows: np.ndarray,
                 cols: np.ndarray) -> np.ndarray:
            y_sym = self.y_symbols(y[c0:c1, rows, cols], mean_fp)
            streams.append(self.y_coder.encode(y_sym, index, escapes))
            return y_sym

        y_fp = self._code(side, step)
        return streams, self._as_float(y_fp)

    def decode_y(self, streams: list[bytes], side: np.ndarray, reader: EscapeReader) -> np.ndarray:
        def step(i: int, index: np.ndarray, _m: np.ndarray, _c0: int, _c1: int, _r: np.ndarray,
                 _c: np.ndarray) -> np.ndarray:
            return self.y_coder.decode(streams[i], index, reader)

        return self._as_float(self._code(side, step))
