"""ONNX Runtime on CPU: the embedded default engine."""

from __future__ import annotations

import numpy as np

from lic_deploy.errors import LicError, PackageError
from lic_deploy.runtime.package import PRECISIONS, Package


class OrtEngine:
    """One InferenceSession per stage, created on first use. `threads` = intra-op threads (None: ORT default)."""

    name = "ort"

    def __init__(self, package: Package, precision: str = "fp32", *, threads: int | None = None) -> None:
        if precision not in PRECISIONS:
            raise LicError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
        self.package = package
        self.precision = precision
        self.threads = threads
        self._sessions: dict[str, object] = {}

    def session(self, stage: str):
        if stage not in self._sessions:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            if self.threads:
                opts.intra_op_num_threads = self.threads
                opts.inter_op_num_threads = 1
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # No spin-waiting after a run: the codec's next step (the integer networks' BLAS, the range coder)
            # needs the same cores. Measured (2 cores, kodim04, medians of 7): the integer h_s right after h_a
            # took 116 -> 86 ms (N=128) and 62 -> 29 ms (N=64); whole encodes stayed within their noise.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            path = self.package.stage_path(stage, self.precision)
            try:
                self._sessions[stage] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime's own errors (InvalidProtobuf, InvalidGraph...) are plain Exceptions
                raise PackageError(f"{path}: ONNX Runtime cannot load this graph ({_one_line(exc)})") from None
        return self._sessions[stage]

    def run(self, stage: str, x: np.ndarray) -> np.ndarray:
        from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

        sess = self.session(stage)
        try:
            return sess.run(None, {"input": np.ascontiguousarray(x, dtype=np.float32)})[0]
        except (Fail, InvalidArgument, RuntimeException, ValueError) as exc:  # another stage's graph
            raise PackageError(f"{self.package.root}: ONNX Runtime cannot run the {self.precision} {stage} graph on "
                               f"{list(x.shape)} ({_one_line(exc)})") from None


def _one_line(exc: Exception, limit: int = 200) -> str:
    """An exception's message on one short line (ONNX Runtime's can span several)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
