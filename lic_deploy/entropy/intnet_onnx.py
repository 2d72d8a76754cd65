"""The integer networks as ONNX graphs of float32 convolutions on small integer parts, exact by construction.

float32 adds integers exactly while every partial sum stays below 2**24 in magnitude. One int16 activation times
an int8 weight summed over a few thousand terms goes far past that, so each layer splits its input into P parts
of b bits, x = sum_i p_i * 2**(b*i) (lower parts in [0, 2**b), the top part signed), with b and P chosen per layer
so that max|p_i| * max_o sum|w_o| < 2**24. Every partial sum of one part's convolution, in whatever order the
engine adds (GEMM blocking, FMA, threads), is then an integer of magnitude below 2**24: exact. The parts run as
one batch-P convolution; their results are cast to int64, weighted by 2**(b*i) and summed, the bias added, and
the requantization is the numpy path's (round half up by an exact floor division written as (t - t mod 2**s) /
2**s, whose Mod takes the divisor's sign). Inputs and outputs are int64 numpy arrays, as for `IntNet`.

Exact where the engine's convolution is a sum of the integer products (ONNX Runtime's CPU kernels: im2col +
SGEMM or direct NCHWc loops). Winograd or FFT convolutions, and TF32 matrix units, are not sums of exact
products: on a GPU engine they must be off (ONNX Runtime CUDA: `use_tf32=0`, `cudnn_conv_algo_search=DEFAULT`
still lets cuDNN pick an implicit GEMM; TensorRT may choose Winograd tactics, so it is not offered).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lic_deploy.entropy.intnet import IntLayer, IntNet, IntNetEvaluator

F32_EXACT = 2**24  # |integers| below this, and sums of them that stay below it, are exact in float32


def split_plan(layer: IntLayer) -> tuple[int, int]:
    """(b, P): part width in bits and part count for this layer's input, the fewest parts that keep every
    float32 partial sum below 2**24 (P = 1, b = 0: the input is used whole). ValueError when no split can."""
    w_abs = np.abs(layer.weight.astype(np.int64))
    s_max = max(1, int((w_abs.sum(axis=(1, 2, 3)) if layer.kind == "conv" else w_abs.sum(axis=(0, 2, 3))).max()))
    if layer.in_max >= F32_EXACT:
        raise ValueError(f"in_max {layer.in_max} is not exact in float32")
    if layer.in_max * s_max < F32_EXACT:
        return 0, 1
    b = ((F32_EXACT - 1) // s_max + 1).bit_length() - 1  # largest b with (2**b - 1) * s_max < 2**24
    if b < 1:
        raise ValueError(f"sum|w| = {s_max} >= 2**24: no exact float32 split")
    parts = 2
    while ((layer.in_max >> (b * (parts - 1))) + 1) * s_max >= F32_EXACT:  # bound on the signed top part
        parts += 1
    return b, parts


def intnet_to_onnx(net: IntNet, opset: int = 17) -> Any:
    """The ONNX model of `net`: input "x" float32 [1, C, H, W] (integer values, |x| <= in_max), output "y" int64
    [1, O, H', W'] equal to `net(x)` (a check that the caller's x is admissible stays with `IntNet.check_input`)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[Any] = []
    inits: list[Any] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    x = "x"
    for i, layer in enumerate(net.layers):
        L = f"l{i}."
        b, parts = split_plan(layer)
        if parts > 1:  # x = sum_i p_i 2**(b*i): p_i = floor(x / 2**(b*i)) mod 2**b, the top part signed
            scale = const(L + "two_b", np.array(2.0**b, np.float32))
            q, pieces = x, []
            for k in range(parts - 1):
                q_next = node("Floor", [node("Div", [q, scale], L + f"div{k}")], L + f"q{k + 1}")
                pieces.append(node("Sub", [q, node("Mul", [q_next, scale], L + f"back{k}")], L + f"p{k}"))
                q = q_next
            x = node("Concat", [*pieces, q], L + "parts", axis=0)  # [P, C, H, W]
        (kh, kw), s, p = layer.kernel, layer.stride, layer.padding
        w = const(L + "w", layer.weight.astype(np.float32))
        if layer.kind == "conv":
            y = node("Conv", [x, w], L + "conv", kernel_shape=[kh, kw], strides=[s, s], pads=[p, p, p, p])
        else:
            y = node("ConvTranspose", [x, w], L + "conv", kernel_shape=[kh, kw], strides=[s, s], pads=[p, p, p, p],
                     output_padding=[layer.output_padding] * 2)
        acc = node("Cast", [y], L + "acc_parts", to=TensorProto.INT64)
        if parts > 1:
            weights = (np.int64(1) << (b * np.arange(parts, dtype=np.int64))).reshape(parts, 1, 1, 1)
            acc = node("Mul", [acc, const(L + "part_w", weights)], L + "acc_weighted")
            acc = node("ReduceSum", [acc, const(L + "axis0", np.array([0], np.int64))], L + "acc_sum", keepdims=1)
        acc = node("Add", [acc, const(L + "bias", layer.bias.reshape(1, -1, 1, 1))], L + "acc")
        # Requantize: t = acc * m + 2**(s-1); floor(t / 2**s) = (t - t mod 2**s) / 2**s, exact in int64.
        col = {k: np.asarray(getattr(layer, k)).reshape(1, -1, 1, 1) for k in ("mult", "mult_neg", "shift")}
        zero = const(L + "zero", np.array(0, np.int64))
        m = node("Where", [node("GreaterOrEqual", [acc, zero], L + "pos"), const(L + "mult", col["mult"]),
                           const(L + "mult_neg", col["mult_neg"])], L + "m")
        t = node("Add", [node("Mul", [acc, m], L + "scaled"), const(L + "half", np.int64(1) << (col["shift"] - 1))],
                 L + "t")
        div = const(L + "div", np.int64(1) << col["shift"])
        r = node("Mod", [t, div], L + "rem", fmod=0)
        q = node("Div", [node("Sub", [t, r], L + "t_floor"), div], L + "q")
        lo, hi = const(L + "lo", np.array(layer.out_min, np.int64)), const(L + "hi", np.array(layer.out_max, np.int64))
        out = node("Clip", [q, lo, hi], "y" if i == len(net.layers) - 1 else L + "out")
        if i < len(net.layers) - 1:
            if layer.bound >= F32_EXACT:
                raise ValueError(f"layer {i}: outputs up to {layer.bound} are not exact in float32")
            x = node("Cast", [out], L + "next", to=TensorProto.FLOAT)
    graph = helper.make_graph(
        nodes, "lic_intnet",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, net.in_channels, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [1, net.out_channels, "ho", "wo"])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="lic-deploy")
    onnx.checker.check_model(model)
    return model


class OrtIntNet(IntNetEvaluator):
    """An `IntNet` run by ONNX Runtime (CPU) as `intnet_to_onnx`'s graph; call it like the IntNet, same result."""

    def __init__(self, net: IntNet, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.net = net
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model = intnet_to_onnx(net).SerializeToString()
        self._session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.net.check_input(x)
        return self._session.run(None, {"x": x.astype(np.float32)[None]})[0][0]
