"""FP32 ONNX -> INT8 (explicit Q/DQ) and FP16 graphs.

INT8 is ONNX Runtime's static quantization in QDQ format: symmetric int8 weights per output channel (zero point
0), symmetric int8 activations per tensor, QuantizeLinear/DequantizeLinear pairs around every convolution and
linear layer (MatMul with a weight; attention's activation-by-activation products stay float) — the
form TensorRT's strongly typed builds consume (TensorRT 11 has no implicit INT8). The `int8-u8s8` variant uses
unsigned asymmetric activations, the fast form on x86 CPUs without VNNI; it is for ONNX Runtime only.
The 1x1 convolutions inside GDN/IGDN normalisations (nodes under `/norm/`) act on x^2 and stay in float.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lic_deploy.export.onnx_export import INPUT

CALIB_METHODS = ("minmax", "percentile", "entropy")
# KL (entropy) calibration: histogram bins collected, and the int8 bins each candidate threshold is folded into.
# onnxruntime's own default (128 and 128) leaves one candidate, the full range, which is min-max.
ENTROPY_BINS, ENTROPY_QUANTIZED_BINS = 2048, 128
PERCENTILE = 99.999  # percentile calibration: the range keeps all but 0.0005 % of each tail
# Calibration inputs per collection pass. ONNX Runtime keeps every calibrated tensor of a pass until it reduces
# them (percentile on a narrow TCM's g_a: 4.3 GB for 16 crops of 256 px); passes of CALIB_CHUNK bound that memory
# whatever the count. (Its own CalibMaxIntermediateOutputs drops full passes unreduced in 1.32, so it is not used.)
CALIB_CHUNK = 8
INT8_VARIANTS = ("int8", "int8-u8s8")
QUANTIZED_OPS = ("Conv", "ConvTranspose", "MatMul")  # MatMul: linear layers (transformer blocks) only


class _Reader:
    """ONNX Runtime CalibrationDataReader over a list of float32 [1, C, H, W] arrays."""

    def __init__(self, inputs: Sequence[np.ndarray]) -> None:
        self._it: Iterator[np.ndarray] = iter(inputs)

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        return None if x is None else {INPUT: x.astype(np.float32)}


def _skip_nodes(fp32_path: Path) -> list[str]:
    """Nodes kept in float: GDN's x^2 convolutions and the products of two activations (attention's Q K^T and
    P V; only MatMuls with a weight initializer, linear layers, are quantized)."""
    import onnx

    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    return [n.name for n in graph.node
            if "/norm/" in n.name or (n.op_type == "MatMul" and not any(i in inits for i in n.input))]


def quantize_int8(fp32_path: Path, out_path: Path, calib_inputs: Sequence[np.ndarray], *,
                  method: str = "minmax", variant: str = "int8", exclude: Sequence[str] = ()) -> None:
    """Write the Q/DQ INT8 graph of `fp32_path`, calibrated on `calib_inputs` (the stage's own inputs).

    `exclude` names further nodes to keep in float (mixed precision, `lic_deploy.export.fallback`)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIB_METHODS:
        raise ValueError(f"calibration method {method!r}; choose from {', '.join(CALIB_METHODS)}")
    unsigned = variant == "int8-u8s8"
    # Q/DQ only where a convolution reads its input (TensorRT's recommended placement): conv outputs, and so
    # the stage outputs (latents, image), stay float; biases stay float for the builder to fold.
    extra: dict[str, Any] = {"WeightSymmetric": True, "ActivationSymmetric": not unsigned,
                             "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS),
                             "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
                             "QuantizeBias": False}
    # Every calibrated tensor's range comes from our chunked pass; quantize_static selects the same tensors (the
    # inputs of QUANTIZED_OPS) and its own calibration, on one input, is overridden for all of them.
    ranges = calibrated_ranges(fp32_path, calib_inputs, method)
    extra["TensorQuantOverrides"] = {name: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
                                     for name, (lo, hi) in ranges.items()}
    logging.getLogger().setLevel(logging.ERROR)  # ORT logs a pre-processing hint on the root logger each call
    quantize_static(
        str(fp32_path), str(out_path), _Reader(calib_inputs[:1]),
        quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8 if unsigned else QuantType.QInt8,
        weight_type=QuantType.QInt8, op_types_to_quantize=list(QUANTIZED_OPS),
        nodes_to_exclude=[*_skip_nodes(fp32_path), *exclude],
        calibrate_method=CalibrationMethod.MinMax, extra_options=extra,
    )


def calibrated_ranges(fp32_path: Path, calib_inputs: Sequence[np.ndarray], method: str
                      ) -> dict[str, tuple[float, float]]:
    """Activation ranges (float units) of the quantized ops' input tensors from ONNX Runtime's calibrators, fed
    CALIB_CHUNK inputs per pass and merged over passes. `minmax`: the smallest and largest value; `percentile`:
    the PERCENTILE range of the signed values; `entropy`: the symmetric range that minimises the KL divergence
    between the ENTROPY_BINS histogram and its ENTROPY_QUANTIZED_BINS-level quantization (TensorRT's method).
    The histograms keep the first pass's bin width and grow bins for larger values."""
    import tempfile

    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    kind, options = {
        "minmax": (CalibrationMethod.MinMax, {"symmetric": False}),
        "percentile": (CalibrationMethod.Percentile, {"symmetric": False, "percentile": PERCENTILE}),
        "entropy": (CalibrationMethod.Entropy, {"symmetric": True, "num_bins": ENTROPY_BINS,
                                                "num_quantized_bins": ENTROPY_QUANTIZED_BINS}),
    }[method]
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):  # it prints per pass
        calibrator = create_calibrator(str(fp32_path), list(QUANTIZED_OPS), calibrate_method=kind,
                                       augmented_model_path=str(Path(tmp) / "augmented.onnx"), extra_options=options)
        for start in range(0, len(calib_inputs), CALIB_CHUNK):
            calibrator.collect_data(_Reader(calib_inputs[start:start + CALIB_CHUNK]))
        data = calibrator.compute_data()
    # range_value holds one-element arrays (histogram methods) or scalars (min-max): .item() takes either
    return {name: (np.asarray(r.range_value[0]).item(), np.asarray(r.range_value[1]).item())
            for name, r in data.data.items()}


def activation_ranges(int8_path: Path) -> dict[str, float]:
    """Calibrated |range| per quantized activation tensor: scale * 127 (symmetric) read from the Q nodes."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(int8_path)).graph
    inits = {i.name: i for i in graph.initializer}
    out = {}
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[1] in inits:
            scale = numpy_helper.to_array(inits[node.input[1]])
            zp = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 else np.zeros(1)
            if scale.size == 1:
                qmax = 255 - int(zp.reshape(-1)[0]) if zp.dtype == np.uint8 else 127
                out[node.input[0]] = float(scale.reshape(-1)[0]) * qmax
    return out


def convert_fp16(fp32_path: Path, out_path: Path) -> None:
    """Write an FP16 graph (FP16 weights and tensors; FP32 input/output with casts at the edges)."""
    import onnx
    from onnxconverter_common import float16

    with warnings.catch_warnings():  # it warns for every weight below FP16's range (flushed to +-1e-7)
        warnings.simplefilter("ignore", UserWarning)
        model = float16.convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    onnx.save(model, str(out_path))
