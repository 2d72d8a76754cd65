"""TCM's deterministic entropy model: integer programs for the two hyper-synthesis branches and, per slice,
the mean/scale networks (SWAtten + conv chains) and the latent residual prediction (LRP).

Coding order (TCM's): z, then the slices in order, one range-coded y stream per slice; escapes go to the shared
escape stream in the same order. With P = param_frac_bits and y_hat kept exactly as y_fp = y_hat * 2**P:

    lm, ls          = hs(z_hat)                                    (int16 registers at their calibrated scales)
    mu, scale, sup  = slice_i(lm, ls, ctx(y_fp_0), ..., ctx(y_fp_{i-1}))      (mu, scale with P fractional bits)
    y_fp_i          = y_sym * 2**P + mu;   y_fp_i += lrp_i(sup, ctx(y_fp_i))   (0.5 tanh, P fractional bits)

ctx(v) = clip(v >> (P - ctx_frac_bits), +-IN_MAX) is what the networks read. Every step is integer
arithmetic (`intprog`), so encoder and decoder agree bit for bit on every machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np

from lic_deploy.entropy.bitstream import MAX_STREAMS
from lic_deploy.entropy.coder import EscapeReader
from lic_deploy.entropy.intprog import Program
from lic_deploy.entropy.model import EntropyModel, _read_meta, hs_input
from lic_deploy.errors import PackageError

# (slice, table index [s, H, W], mean_fp [s, H, W]) -> y symbols [s, H, W]
Step = Callable[[int, np.ndarray, np.ndarray], np.ndarray]


class TcmEntropyModel(EntropyModel):
    """Built from a TCM package's entropy.npz (no torch)."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        meta = _read_meta(arrays)
        try:
            self.slices = int(meta["slices"])
            self.ctx_frac_bits = int(meta["ctx_frac_bits"])
            self.outputs = {k: [str(n) for n in v] for k, v in meta["outputs"].items()}
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise PackageError(f"TCM entropy model metadata is incomplete ({exc})") from None
        if not 1 <= self.slices <= MAX_STREAMS - 2:
            raise PackageError(f"TCM entropy model: {self.slices} slices do not fit a .lic container")
        super().__init__(arrays)

    def _load_networks(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.hs = Program.from_arrays(arrays, "hs.")
        self.slice_nets = [Program.from_arrays(arrays, f"slice{i}.") for i in range(self.slices)]
        self.lrp_nets = [Program.from_arrays(arrays, f"lrp{i}.") for i in range(self.slices)]
        expected = {"hs": 2, **{f"slice{i}": 3 for i in range(self.slices)},
                    **{f"lrp{i}": 1 for i in range(self.slices)}}
        if (self.y_channels % self.slices or any(len(self.outputs.get(k, ())) != n for k, n in expected.items())
                or len(self.hs.inputs) != 1
                or any(len(p.inputs) != 2 + i for i, p in enumerate(self.slice_nets))
                or any(len(p.inputs) != 2 for p in self.lrp_nets)):
            raise PackageError("TCM entropy model programs are inconsistent with its slices")

    @property
    def n_y_streams(self) -> int:  # type: ignore[override]
        return self.slices

    @property
    def hs_out(self) -> int:
        return 2 * self.y_channels

    def params(self, z_sym: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Not defined for TCM: its y parameters depend on y symbols decoded earlier (use encode_y/decode_y)."""
        raise TypeError("TCM's y parameters depend on earlier y slices; use encode_y/decode_y")

    def _hyper_synthesis(self, z_sym: np.ndarray) -> np.ndarray:
        """[latent means; latent scales] as int16 codes, 2M channels at the y grid. `hs_seconds` (the speed
        benchmark's "integer networks" step) starts here and gathers every program's time of the call."""
        t0 = time.perf_counter()
        x = hs_input(z_sym, self.median_fp, self.z_frac_bits)
        lm, ls = self.hs.run({self.hs.inputs[0]: x}, self.outputs["hs"])
        self.hs_seconds = time.perf_counter() - t0
        return np.concatenate([lm, ls])

    def _code(self, side: np.ndarray, step: Step) -> np.ndarray:
        """Run the slices in order; `step` codes one. Returns y_hat in fixed point (P fractional bits), int64."""
        m = self.y_channels
        lm, ls = side[:m], side[m:]
        done: list[np.ndarray] = []
        for i in range(self.slices):
            t0 = time.perf_counter()
            mu, scale, support = self._slice_params(i, lm, ls, done)
            t1 = time.perf_counter()
            y_sym = step(i, self.table_index(scale), mu)
            y_fp = y_sym * (1 << self.param_frac_bits) + mu
            t2 = time.perf_counter()
            done.append(y_fp + self._lrp_delta(i, support, y_fp))
            self.hs_seconds += (t1 - t0) + (time.perf_counter() - t2)
        return np.concatenate(done)

    def _slice_params(self, i: int, lm: np.ndarray, ls: np.ndarray, done: list[np.ndarray]
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Slice i's (mu, scale, mean support) from the latent means and scales and the earlier slices' y_hat."""
        prog = self.slice_nets[i]
        feeds = [lm, ls, *(self.ctx(v) for v in done)]
        mu, scale, support = prog.run(dict(zip(prog.inputs, feeds, strict=True)), self.outputs[f"slice{i}"])
        return mu, scale, support

    def _lrp_delta(self, i: int, support: np.ndarray, y_fp: np.ndarray) -> np.ndarray:
        """Slice i's latent residual prediction (0.5 tanh, P fractional bits), added to its y_hat."""
        lrp = self.lrp_nets[i]
        (delta,) = lrp.run(dict(zip(lrp.inputs, [support, self.ctx(y_fp)], strict=True)), self.outputs[f"lrp{i}"])
        return delta

    def encode_y(self, y: np.ndarray, side: np.ndarray, escapes: list[int]) -> tuple[list[bytes], np.ndarray]:
        s = self.y_channels // self.slices
        streams: list[bytes] = []

        def step(i: int, index: np.ndarray, mean_fp: np.ndarray) -> np.ndarray:
            y_sym = self.y_symbols(y[i * s:(i + 1) * s], mean_fp)
            streams.append(self.y_coder.encode(y_sym, index, escapes))
            return y_sym

        return streams, self._as_float(self._code(side, step))

    def decode_y(self, streams: list[bytes], side: np.ndarray, reader: EscapeReader) -> np.ndarray:
        def step(i: int, index: np.ndarray, _mean: np.ndarray) -> np.ndarray:
            return self.y_coder.decode(streams[i], index, reader)

        return self._as_float(self._code(side, step))
