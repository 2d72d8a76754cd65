"""Integer hyper-synthesis network: bit-exactness against pure-int64 references, bounds, storage, export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lic_deploy.entropy import intnet as intnet_mod
from lic_deploy.entropy.intnet import IntLayer, IntNet
from lic_deploy.errors import PackageError
from lic_deploy.export.intnet_build import build_intnet

REPO = Path(__file__).resolve().parents[1]
I64 = np.int64


# ---------------------------------------------------------------- slow, independent pure-integer references


def ref_conv_acc(x: np.ndarray, w: np.ndarray, b: np.ndarray, s: int, p: int) -> np.ndarray:
    """conv(x, w) + b with int64 einsum (no floats). w: [O, I, kh, kw]."""
    _, h, wd = x.shape
    kh, kw = w.shape[2:]
    xp = np.pad(x.astype(I64), ((0, 0), (p, p), (p, p)))
    ho, wo = (h + 2 * p - kh) // s + 1, (wd + 2 * p - kw) // s + 1
    acc = np.zeros((w.shape[0], ho, wo), dtype=I64)
    for ky in range(kh):
        for kx in range(kw):
            patch = xp[:, ky : ky + s * (ho - 1) + 1 : s, kx : kx + s * (wo - 1) + 1 : s]
            acc += np.einsum("oc,chw->ohw", w[:, :, ky, kx].astype(I64), patch)
    return acc + b.astype(I64)[:, None, None]


def ref_deconv_acc(x: np.ndarray, w: np.ndarray, b: np.ndarray, s: int, p: int, op: int) -> np.ndarray:
    """Transposed conv as zero insertion + stride-1 conv with the flipped kernel (needs p <= k - 1)."""
    n_in, h, wd = x.shape
    kh, kw = w.shape[2:]
    z = np.zeros((n_in, (h - 1) * s + 1, (wd - 1) * s + 1), dtype=I64)
    z[:, ::s, ::s] = x
    z = np.pad(z, ((0, 0), (kh - 1 - p, kh - 1 - p + op), (kw - 1 - p, kw - 1 - p + op)))
    return ref_conv_acc(z, w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3), b, 1, 0)


def ref_requant(acc: np.ndarray, layer: IntLayer) -> np.ndarray:
    """The documented rule in Python integers: clip(floor((acc*m + 2**(shift-1)) / 2**shift))."""
    a = acc.astype(object)
    m = np.where(acc >= 0, layer.mult[:, None, None], layer.mult_neg[:, None, None]).astype(object)
    sh = layer.shift[:, None, None].astype(object)
    out = (a * m + 2 ** (sh - 1)) // 2**sh
    return np.clip(out, layer.out_min, layer.out_max).astype(I64)


def ref_layer(x: np.ndarray, layer: IntLayer) -> np.ndarray:
    if layer.kind == "conv":
        acc = ref_conv_acc(x, layer.weight, layer.bias, layer.stride, layer.padding)
    else:
        acc = ref_deconv_acc(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.output_padding)
    return ref_requant(acc, layer)


def ref_net(x: np.ndarray, net: IntNet) -> np.ndarray:
    for layer in net.layers:
        x = ref_layer(x, layer)
    return x


# ---------------------------------------------------------------- helpers


def random_layer(rng, kind, n_in, n_out, k, s, p, op=0, *, in_max=2**15 - 1, clip=(-3000, 3000)) -> IntLayer:
    shape = (n_out, n_in, k, k) if kind == "conv" else (n_in, n_out, k, k)
    weight = rng.integers(-128, 128, size=shape).astype(np.int8)
    weight.flat[:2] = (-128, 127)
    mult = rng.integers(2**22, 2**23, size=n_out).astype(I64)
    return IntLayer(
        kind=kind,
        weight=weight,
        bias=rng.integers(-(2**30), 2**30, size=n_out).astype(I64),
        stride=s,
        padding=p,
        output_padding=op,
        mult=mult,
        mult_neg=(mult * rng.uniform(-0.5, 1.0, size=n_out)).round().astype(I64),
        shift=rng.integers(30, 40, size=n_out).astype(I64),
        out_min=clip[0],
        out_max=clip[1],
        in_max=in_max,
    )


def identity_layer(kind: str, w: np.ndarray, s: int, p: int, op: int = 0, in_max: int = 1000) -> IntLayer:
    """Requantization that returns the accumulator unchanged: floor((2*acc + 1) / 2) = acc."""
    n_out = w.shape[0] if kind == "conv" else w.shape[1]
    two = np.full(n_out, 2, dtype=I64)
    return IntLayer(kind, w, np.zeros(n_out, I64), s, p, op, two, two, np.ones(n_out, I64),
                    -(2**40), 2**40, in_max)


def random_input(rng, c, h, w, in_max):
    x = rng.integers(-in_max, in_max + 1, size=(c, h, w)).astype(I64)
    x[0, 0, 0], x[-1, -1, -1], x[0, -1, 0] = in_max, -in_max, -in_max  # extremes at the bound
    return x


def mbt_hs(n: int, m: int, seed: int) -> nn.Sequential:
    from compressai.models import MeanScaleHyperprior

    torch.manual_seed(seed)
    return MeanScaleHyperprior(N=n, M=m).h_s.double().eval()


def z_hat(seed: int, c: int = 32, h: int = 4, w: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.round(torch.randn(1, c, h, w, generator=g, dtype=torch.float64) * 3).clamp(-127, 127)


def built_hs(act_bits: int = 16, seed: int = 0) -> tuple[nn.Sequential, IntNet]:
    hs = mbt_hs(32, 48, seed)
    calib = [z_hat(100 + i) for i in range(4)]
    net = build_intnet(hs, calib, in_frac_bits=0, in_max=127, act_bits=act_bits,
                       out_frac_bits=np.full(96, 16))
    return hs, net


# ---------------------------------------------------------------- (1) single layers are bit-exact


@pytest.mark.parametrize(("k", "s", "p"), [(3, 1, 1), (3, 2, 1), (5, 2, 2), (5, 1, 0), (4, 2, 1), (1, 1, 0), (1, 2, 0)])
def test_conv_layer_matches_int64_reference(k, s, p):
    rng = np.random.default_rng(k * 100 + s * 10 + p)
    layer = random_layer(rng, "conv", 5, 7, k, s, p)
    x = random_input(rng, 5, 11, 8, layer.in_max)
    out = IntNet([layer], layer.in_max)(x)
    assert out.dtype == I64
    np.testing.assert_array_equal(out, ref_layer(x, layer))
    assert out.min() < 0 < out.max()


@pytest.mark.parametrize(("k", "s", "p", "op"), [(3, 1, 1, 0), (3, 2, 1, 1), (5, 2, 2, 1), (5, 2, 2, 0),
                                                 (4, 2, 1, 0), (5, 2, 0, 1), (3, 2, 2, 1)])
def test_deconv_layer_matches_int64_reference(k, s, p, op):
    rng = np.random.default_rng(k * 1000 + s * 100 + p * 10 + op)
    layer = random_layer(rng, "deconv", 5, 6, k, s, p, op)
    x = random_input(rng, 5, 7, 9, layer.in_max)
    out = IntNet([layer], layer.in_max)(x)
    np.testing.assert_array_equal(out, ref_layer(x, layer))


@pytest.mark.parametrize("kind", ["conv", "deconv"])
def test_accumulator_exact_just_below_2_pow_53(kind):
    """Weights at -128/127 and inputs at +-in_max with in_max at the largest admissible value."""
    rng = np.random.default_rng(7)
    shape = (3, 2, 3, 3)  # conv: O=3, I=2; deconv: I=3, O=2
    w = np.where(rng.random(shape) < 0.5, -128, 127).astype(np.int8)
    n_out = 3 if kind == "conv" else 2
    w[(0,) if kind == "conv" else (slice(None), 0)] = -128  # output channel 0: all weights -128
    w_sum = np.abs(w.astype(I64)).sum(axis=(1, 2, 3) if kind == "conv" else (0, 2, 3))
    bias = np.full(n_out, 12345, dtype=I64)
    in_max = int((2**53 - 1 - 12345) // int(w_sum.max()))
    one = np.full(n_out, 1, dtype=I64)
    layer = IntLayer(kind, w, bias, 1, 1, 0, one * 511, -one * 511, one * 9, -(2**62), 2**62, in_max)
    x = np.where(rng.random((w.shape[1] if kind == "conv" else 3, 6, 6)) < 0.5, -in_max, in_max).astype(I64)
    x[:, 1:5, 1:5] = -in_max  # uniform-sign interior: channel 0's accumulator reaches in_max * sum|w| + bias
    acc = layer.accumulate(x)
    ref = ref_conv_acc(x, w, bias, 1, 1) if kind == "conv" else ref_deconv_acc(x, w, bias, 1, 1, 0)
    np.testing.assert_array_equal(acc, ref)
    assert acc.max() == in_max * int(w_sum.max()) + 12345 > 2**53 - int(w_sum.max())
    np.testing.assert_array_equal(IntNet([layer], in_max)(x), ref_requant(ref, layer))


@pytest.mark.parametrize("kind", ["conv", "deconv"])
def test_float32_gemm_chosen_only_under_its_bound_and_exact_there(kind):
    """Layers with in_max * sum|w| < 2**24 run float32 GEMMs: exact with odd weights of one sign and inputs that
    bring one output's sums to just below 2**24; one more unit of in_max switches the layer to float64."""
    n_in, n_out = 32, 2
    shape = (n_out, n_in, 3, 3) if kind == "conv" else (n_in, n_out, 3, 3)
    w = np.full(shape, -127, dtype=np.int8)
    w.flat[::7] = 125  # odd weights of both signs on the other channel positions
    w_sum = np.abs(w.astype(I64)).sum(axis=(1, 2, 3) if kind == "conv" else (0, 2, 3))
    in_max = (2**24 - 1) // int(w_sum.max())
    one = np.full(n_out, 1, dtype=I64)

    def make(m: int) -> IntLayer:
        return IntLayer(kind, w, np.full(n_out, 7, I64), 1, 1, 0, one * 2, one * 2, one, -(2**62), 2**62, m)

    layer = make(in_max)
    assert layer._dtype is np.float32 and make(in_max + 1)._dtype is np.float64
    rng = np.random.default_rng(4)
    x = (in_max - rng.integers(0, 3, size=(n_in, 6, 6))) * np.sign(w.reshape(-1)[0])  # all products of one sign
    x = np.where(rng.random(x.shape) < 0.2, -x, x).astype(I64)  # some of the other sign: odd partial sums
    acc = layer.accumulate(x)
    ref = ref_conv_acc(x, w, layer.bias, 1, 1) if kind == "conv" else ref_deconv_acc(x, w, layer.bias, 1, 1, 0)
    np.testing.assert_array_equal(acc, ref)
    assert np.abs(ref).max() > 2**23  # the sums really come near the float32 bound


# ---------------------------------------------------------------- (2) accuracy of a converted h_s


@pytest.mark.parametrize(("act_bits", "tol"), [(16, 0.02), (8, 0.06)])
def test_converted_hs_close_to_float(act_bits, tol):
    # Measured (seed 0, N=32, M=48, out_frac_bits=16): relative L2 error 0.0061 at act_bits=16 (dominated by
    # the int8 weights) and 0.022 at act_bits=8.
    hs, net = built_hs(act_bits)
    z = z_hat(1)
    with torch.no_grad():
        ref = hs(z)[0].numpy()
    out = net(z[0].numpy().astype(I64)) * 2.0**-16
    assert out.shape == ref.shape == (96, 16, 24)
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel < tol, rel


def test_build_multipliers_and_activations():
    hs = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(6, 5, 4, 2, 1),
                       nn.LeakyReLU(0.1), nn.Conv2d(5, 3, 1)).double()
    calib = [torch.randn(1, 4, 5, 5, dtype=torch.float64) * 4 for _ in range(2)]
    net = build_intnet(hs, calib, in_frac_bits=2, in_max=64, act_bits=16,
                       out_frac_bits=np.array([10, 12, 14]))
    relu, leaky, plain = net.layers
    for layer in net.layers:
        assert ((layer.mult >= 2**22) & (layer.mult < 2**23)).all()
    assert (relu.mult_neg == 0).all()
    np.testing.assert_array_equal(leaky.mult_neg, np.rint(leaky.mult * 0.1).astype(I64))
    np.testing.assert_array_equal(plain.mult_neg, plain.mult)
    assert (relu.out_min, relu.out_max, leaky.in_max) == (-32767, 32767, 32767)
    assert (plain.out_min, plain.out_max, net.in_max, relu.in_max) == (-(2**31), 2**31 - 1, 64, 64)
    x = torch.randn(1, 4, 6, 7, dtype=torch.float64) * 4
    x_int = torch.round(x * 4).clamp(-64, 64)
    with torch.no_grad():
        ref = hs(x_int / 4)[0].numpy()
    out = net(x_int[0].numpy().astype(I64)) * np.exp2(-np.array([10, 12, 14]))[:, None, None]
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.02


@pytest.mark.parametrize(
    ("modules", "name"),
    [
        ([nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)], "1"),
        ([nn.Conv2d(4, 4, 3, groups=2)], "0"),
        ([nn.Conv2d(4, 4, 3, dilation=2)], "0"),
        ([nn.Conv2d(4, 4, 3, stride=(1, 2))], "0"),
        ([nn.Conv2d(4, 4, 3, padding="same")], "0"),
        ([nn.Conv2d(4, 4, 3), nn.ReLU(), nn.ReLU()], "2"),
        ([nn.ReLU(), nn.Conv2d(4, 4, 3)], "0"),
    ],
)
def test_build_rejects_unsupported_modules(modules, name):
    with pytest.raises(ValueError, match=f"module {name} "):
        build_intnet(nn.Sequential(*modules), [torch.zeros(1, 4, 8, 8)], in_frac_bits=0, in_max=8,
                     act_bits=16, out_frac_bits=np.zeros(4, dtype=I64))


# ---------------------------------------------------------------- (3) determinism


def test_deterministic_across_calls_chunking_and_reference(monkeypatch):
    _, net = built_hs(16)
    x = z_hat(2)[0].numpy().astype(I64)
    first = net(x)
    np.testing.assert_array_equal(first, net(x))
    monkeypatch.setattr(intnet_mod, "CHUNK_BYTES", 1)  # one output row (input row for deconv) per GEMM
    np.testing.assert_array_equal(first, net(x))
    np.testing.assert_array_equal(first, ref_net(x, net))


def test_deterministic_single_thread_subprocess_and_torch_free(tmp_path):
    _, net = built_hs(8)
    x = z_hat(3)[0].numpy().astype(I64)
    np.savez(tmp_path / "net.npz", x=x, **net.to_arrays("hs."))
    script = (
        "import sys, numpy as np\n"
        "from lic_deploy.entropy.intnet import IntNet\n"
        f"d = np.load({str(tmp_path / 'net.npz')!r}, allow_pickle=False)\n"
        "np.save(sys.argv[1], IntNet.from_arrays(d, 'hs.')(d['x']))\n"
        "assert 'torch' not in sys.modules\n"
    )
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "y.npy")], env=env, check=True, timeout=60)
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), net(x))


# ---------------------------------------------------------------- (4) exactness and overflow bounds


def test_2_pow_53_bound_enforced():
    w = np.full((2, 3, 3, 3), -128, dtype=np.int8)  # sum|w_o| = 3456
    bias = np.array([0, 100], dtype=I64)
    one = np.ones(2, dtype=I64)
    limit = (2**53 - 1 - 100) // 3456  # largest in_max with in_max * 3456 + 100 < 2**53
    IntLayer("conv", w, bias, 1, 1, 0, one, one, one, -10, 10, limit)
    with pytest.raises(ValueError, match="2\\*\\*53"):
        IntLayer("conv", w, bias, 1, 1, 0, one, one, one, -10, 10, limit + 1)
    three = np.ones(3, dtype=I64)  # as a deconv, w is [I=2, O=3, 3, 3]
    limit = (2**53 - 2) // 2304  # sum|w_o| = 2 * 9 * 128 = 2304, |bias| = 1
    IntLayer("deconv", w, three, 2, 1, 1, three, three, three, -10, 10, limit)
    with pytest.raises(ValueError, match="2\\*\\*53"):
        IntLayer("deconv", w, three, 2, 1, 1, three, three, three, -10, 10, limit + 1)


def test_int64_product_bound_enforced():
    w = np.full((1, 1, 1, 1), 127, dtype=np.int8)
    one = np.ones(1, dtype=I64)
    in_max = 2**30
    acc_max = in_max * 127
    ok = (2**62 - 1) // acc_max
    IntLayer("conv", w, 0 * one, 1, 0, 0, ok * one, -ok * one, 62 * one, -10, 10, in_max)
    with pytest.raises(ValueError, match="2\\*\\*62"):
        IntLayer("conv", w, 0 * one, 1, 0, 0, ok * one, -(ok + 1) * one, 62 * one, -10, 10, in_max)


def test_net_checks_chained_bounds_and_inputs():
    rng = np.random.default_rng(0)
    a = random_layer(rng, "conv", 3, 4, 3, 1, 1, clip=(-500, 500), in_max=100)
    b = random_layer(rng, "deconv", 4, 2, 3, 2, 1, 1, in_max=499)
    with pytest.raises(ValueError, match="in_max"):
        IntNet([a, b], 100)
    with pytest.raises(ValueError, match="in_max"):
        IntNet([a], 101)
    with pytest.raises(ValueError, match="channels"):
        IntNet([a, random_layer(rng, "conv", 5, 2, 1, 1, 0, in_max=500)], 100)
    net = IntNet([a], 100)
    x = rng.integers(-100, 101, size=(3, 6, 6)).astype(I64)
    for bad in (x.astype(np.int32), x[None], x[:2], x + 1000, np.zeros((3, 0, 4), I64)):
        with pytest.raises(ValueError):
            net(bad)


# ---------------------------------------------------------------- (5) storage


def test_npz_round_trip(tmp_path):
    _, net = built_hs(16)
    np.savez(tmp_path / "e.npz", **net.to_arrays("hs."), other=np.zeros(3))
    with np.load(tmp_path / "e.npz", allow_pickle=False) as d:
        loaded = IntNet.from_arrays(d, "hs.")
    assert loaded.in_max == net.in_max and len(loaded.layers) == len(net.layers)
    for a, b in zip(net.layers, loaded.layers, strict=True):
        for f in ("kind", "stride", "padding", "output_padding", "out_min", "out_max", "in_max"):
            assert getattr(a, f) == getattr(b, f)
        for f in ("weight", "bias", "mult", "mult_neg", "shift"):
            assert getattr(a, f).dtype == getattr(b, f).dtype
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    x = z_hat(4)[0].numpy().astype(I64)
    np.testing.assert_array_equal(loaded(x), net(x))


def _meta(arrays):
    return json.loads(arrays["hs.meta"].tobytes())


def _set_meta(arrays, meta):
    arrays["hs.meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)


def _corrupt_version(a):
    m = _meta(a)
    m["version"] = 99
    _set_meta(a, m)


def _corrupt_in_max(a):  # layer 0 no longer covers the net's input bound
    m = _meta(a)
    m["layers"][0]["in_max"] = 1
    _set_meta(a, m)


def _corrupt_stride(a):
    m = _meta(a)
    m["layers"][1]["stride"] = "2"
    _set_meta(a, m)


def _corrupt_extra_layer(a):
    m = _meta(a)
    m["layers"].append(m["layers"][-1])
    _set_meta(a, m)


def _corrupt_bound(a):  # a huge weight breaks the exactness bound
    m = _meta(a)
    m["in_max"] = m["layers"][0]["in_max"] = 2**50
    _set_meta(a, m)


CORRUPTIONS = {
    "missing weight": lambda a: a.pop("hs.layer1.weight"),
    "missing meta": lambda a: a.pop("hs.meta"),
    "weight dtype": lambda a: a.update({"hs.layer0.weight": a["hs.layer0.weight"].astype(np.int16)}),
    "mult dtype": lambda a: a.update({"hs.layer2.mult": a["hs.layer2.mult"].astype(np.float64)}),
    "shift shape": lambda a: a.update({"hs.layer2.shift": a["hs.layer2.shift"][:-1]}),
    "channel mismatch": lambda a: a.update({"hs.layer2.weight": a["hs.layer2.weight"][:, :-1]}),
    "meta not json": lambda a: a.update({"hs.meta": np.frombuffer(b"{not json", dtype=np.uint8)}),
    "meta 2-d": lambda a: a.update({"hs.meta": a["hs.meta"][None]}),
    "object array": lambda a: a.update({"hs.layer0.bias": np.array([{"x": 1}], dtype=object)}),
    "version": _corrupt_version,
    "in_max chain": _corrupt_in_max,
    "stride type": _corrupt_stride,
    "extra layer": _corrupt_extra_layer,
    "bound": _corrupt_bound,
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_arrays_raise_package_error(tmp_path, name):
    _, net = built_hs(8)
    arrays = net.to_arrays("hs.")
    CORRUPTIONS[name](arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    with np.load(tmp_path / "bad.npz", allow_pickle=False) as d, pytest.raises(PackageError):
        IntNet.from_arrays(d, "hs.")


# ---------------------------------------------------------------- (6) activations on negative accumulators


def test_relu_leaky_and_round_half_up():
    x = np.arange(-6, 7, dtype=I64).reshape(1, 1, 13)
    w = np.ones((1, 1, 1, 1), dtype=np.int8)

    def run(mult, mult_neg, shift, lo=-100, hi=100):
        arr = [np.array([v], dtype=I64) for v in (mult, mult_neg, shift)]
        layer = IntLayer("conv", w, np.zeros(1, I64), 1, 0, 0, *arr, lo, hi, 6)
        return IntNet([layer], 6)(x)[0, 0]

    xs = x[0, 0]
    np.testing.assert_array_equal(run(2, 2, 1), xs)  # identity
    np.testing.assert_array_equal(run(2, 0, 1), np.maximum(xs, 0))  # ReLU
    np.testing.assert_array_equal(run(8, 2, 3), np.where(xs >= 0, xs, np.floor(xs * 0.25 + 0.5)))  # leaky 1/4
    assert run(8, 2, 3)[:4].tolist() == [-1, -1, -1, -1]  # -1.5, -1.25, -1.0, -0.75 rounded half up
    assert run(8, 2, 3)[4] == 0  # -0.5 -> 0 (toward +inf)
    np.testing.assert_array_equal(run(1, 1, 1), np.floor(xs / 2 + 0.5))  # halves round toward +inf
    assert run(1, 1, 1).tolist()[:7] == [-3, -2, -2, -1, -1, 0, 0]
    np.testing.assert_array_equal(run(2, 2, 1, -2, 3), np.clip(xs, -2, 3))


# ---------------------------------------------------------------- (7) sizes and values against torch


@pytest.mark.parametrize(("k", "s", "p", "op"), [(5, 2, 2, 1), (3, 2, 1, 1), (4, 2, 1, 0), (3, 1, 0, 0),
                                                 (5, 2, 1, 1), (2, 2, 0, 1)])
def test_deconv_sizes_and_values_match_torch(k, s, p, op):
    rng = np.random.default_rng(k + 10 * p + 100 * op)
    w = rng.integers(-128, 128, size=(3, 4, k, k)).astype(np.int8)
    layer = identity_layer("deconv", w, s, p, op)
    for h, wd in [(1, 1), (1, 3), (2, 5), (4, 6), (7, 3), (9, 10)]:
        x = rng.integers(-1000, 1001, size=(3, h, wd)).astype(I64)
        xt, wt = torch.from_numpy(x[None]).double(), torch.from_numpy(w.astype(np.float64))
        ref = torch.nn.functional.conv_transpose2d(xt, wt, stride=s, padding=p, output_padding=op)[0].numpy()
        out = IntNet([layer], 1000)(x)
        assert out.shape == ref.shape == (4, *layer.output_size(h, wd))
        np.testing.assert_array_equal(out, ref.astype(I64))


@pytest.mark.parametrize(("k", "s", "p"), [(3, 1, 1), (3, 2, 1), (5, 2, 2), (2, 2, 0)])
def test_conv_sizes_and_values_match_torch(k, s, p):
    rng = np.random.default_rng(k + 10 * s + 100 * p)
    w = rng.integers(-128, 128, size=(4, 3, k, k)).astype(np.int8)
    layer = identity_layer("conv", w, s, p)
    for h, wd in [(2, 2), (3, 7), (8, 5), (11, 12)]:
        x = rng.integers(-1000, 1001, size=(3, h, wd)).astype(I64)
        xt, wt = torch.from_numpy(x[None]).double(), torch.from_numpy(w.astype(np.float64))
        ref = torch.nn.functional.conv2d(xt, wt, stride=s, padding=p)[0].numpy()
        out = IntNet([layer], 1000)(x)
        assert out.shape == ref.shape
        np.testing.assert_array_equal(out, ref.astype(I64))


# ---------------------------------------------------------------- (7) the torch evaluator (the GPU path)


@pytest.mark.parametrize(("kind", "k", "s", "p", "op"), [("conv", 3, 1, 1, 0), ("conv", 5, 2, 2, 0),
                                                         ("conv", 4, 2, 1, 0), ("deconv", 5, 2, 2, 1),
                                                         ("deconv", 3, 2, 1, 1), ("deconv", 5, 2, 0, 1),
                                                         ("deconv", 4, 2, 1, 0)])
def test_torch_evaluator_equals_numpy_and_int64_reference(kind, k, s, p, op):
    """`TorchIntNet` (float64 unfold/GEMM/fold, int64 requantization: what runs on a GPU) against numpy's IntNet and
    the pure-int64 reference, on the CPU here, inputs at +-in_max included."""
    from lic_deploy.entropy.intnet_torch import TorchIntNet

    rng = np.random.default_rng(hash((kind, k, s, p, op)) % 2**32)
    layer = random_layer(rng, kind, 5, 6, k, s, p, op)
    x = random_input(rng, 5, 9, 7, layer.in_max)
    net = IntNet([layer], layer.in_max)
    out = TorchIntNet(net, "cpu")(x)
    assert out.dtype == I64
    np.testing.assert_array_equal(out, net(x))
    np.testing.assert_array_equal(out, ref_layer(x, layer))


@pytest.mark.parametrize("kind", ["conv", "deconv"])
def test_torch_evaluator_exact_just_below_2_pow_53(kind):
    from lic_deploy.entropy.intnet_torch import TorchIntNet

    rng = np.random.default_rng(11)
    shape = (3, 2, 3, 3)
    w = np.where(rng.random(shape) < 0.5, -128, 127).astype(np.int8)
    n_out = 3 if kind == "conv" else 2
    w[(0,) if kind == "conv" else (slice(None), 0)] = -128
    w_sum = np.abs(w.astype(I64)).sum(axis=(1, 2, 3) if kind == "conv" else (0, 2, 3))
    in_max = int((2**53 - 1) // int(w_sum.max()))
    one = np.full(n_out, 1, dtype=I64)
    layer = IntLayer(kind, w, np.zeros(n_out, I64), 1, 1, 0, one * 511, -one * 511, one * 9, -(2**62), 2**62,
                     in_max)
    x = np.full((w.shape[1] if kind == "conv" else 3, 6, 6), -in_max, dtype=I64)
    net = IntNet([layer], in_max)
    np.testing.assert_array_equal(TorchIntNet(net, "cpu")(x), net(x))


def test_torch_evaluator_runs_a_converted_hs_and_checks_inputs():
    from lic_deploy.entropy.intnet_torch import TorchIntNet

    _, net = built_hs()
    x = z_hat(7)[0].numpy().astype(I64)
    fast = TorchIntNet(net, "cpu")
    np.testing.assert_array_equal(fast(x), net(x))
    assert fast.in_channels == net.in_channels and fast.layers is net.layers
    with pytest.raises(ValueError, match="must lie in"):
        fast(np.full_like(x, net.in_max + 1))


# ---------------------------------------------------------------- (8) ONNX graphs of exact float32 parts (ORT)


def test_split_plan_keeps_every_part_sum_below_2_pow_24_with_fewest_parts():
    from lic_deploy.entropy.intnet_onnx import F32_EXACT, split_plan

    rng = np.random.default_rng(5)
    for n_in, k, in_max in [(2, 1, 100), (40, 3, 2**15 - 1), (128, 5, 2**15 - 1), (288, 3, 2**15 - 1),
                            (64, 5, 2**20), (4, 3, 2**23)]:
        layer = random_layer(rng, "conv", n_in, 3, k, 1, k // 2, in_max=in_max)
        s_max = int(np.abs(layer.weight.astype(I64)).sum(axis=(1, 2, 3)).max())
        b, parts = split_plan(layer)
        if parts == 1:
            assert in_max * s_max < F32_EXACT
            continue
        top = (in_max >> (b * (parts - 1))) + 1
        assert (2**b - 1) * s_max < F32_EXACT and top * s_max < F32_EXACT
        assert 2 ** (b + 1) - 1 >= F32_EXACT / s_max  # b is the widest part that fits
        assert ((in_max >> (b * (parts - 2))) + 1) * s_max >= F32_EXACT  # one part fewer would not fit


@pytest.mark.parametrize(("kind", "k", "s", "p", "op"), [("conv", 3, 1, 1, 0), ("conv", 5, 2, 2, 0),
                                                         ("deconv", 5, 2, 2, 1), ("deconv", 3, 2, 1, 1),
                                                         ("deconv", 4, 2, 1, 0)])
def test_onnx_evaluator_equals_numpy_and_int64_reference(kind, k, s, p, op):
    """`OrtIntNet` (the ONNX graph: float32 convolutions of split parts, int64 requantization) against numpy's
    IntNet and the pure-int64 reference, inputs at +-in_max; wide enough that the input is split in parts."""
    from lic_deploy.entropy.intnet_onnx import OrtIntNet, split_plan

    rng = np.random.default_rng(hash((kind, k, s, p, op, "ort")) % 2**32)
    layer = random_layer(rng, kind, 48, 6, k, s, p, op)
    assert split_plan(layer)[1] >= 2
    x = random_input(rng, 48, 9, 7, layer.in_max)
    net = IntNet([layer], layer.in_max)
    out = OrtIntNet(net, threads=2)(x)
    assert out.dtype == I64
    np.testing.assert_array_equal(out, net(x))
    np.testing.assert_array_equal(out, ref_layer(x, layer))


@pytest.mark.parametrize("kind", ["conv", "deconv"])
def test_onnx_evaluator_exact_at_the_float32_bound(kind):
    """Odd weights of one sign and inputs whose lower parts are near 2**b - 1 drive those parts' sums to just below
    2**24 with every low bit in play: exact (one bit more per part would not be)."""
    from lic_deploy.entropy.intnet_onnx import F32_EXACT, OrtIntNet, split_plan

    n_in, n_out = 64, 2
    shape = (n_out, n_in, 3, 3) if kind == "conv" else (n_in, n_out, 3, 3)
    w = np.full(shape, -127, dtype=np.int8)
    one = np.full(n_out, 1, dtype=I64)
    layer = IntLayer(kind, w, np.zeros(n_out, I64), 1, 1, 0, one * 2, one * 2, one, -(2**62), 2**62, 2**15 - 1)
    b, parts = split_plan(layer)
    assert parts >= 2 and (2**b - 1) * 127 * n_in * 9 > F32_EXACT // 2  # within 2x of the bound
    rng = np.random.default_rng(3)
    x = rng.integers(-layer.in_max, layer.in_max + 1, size=(n_in, 6, 6))
    x = np.clip((x >> b << b) + (2**b - 1) - rng.integers(0, 3, size=x.shape), -layer.in_max, layer.in_max)
    x[0, 0, 0], x[1, 1, 1] = layer.in_max, -layer.in_max
    net = IntNet([layer], layer.in_max)
    np.testing.assert_array_equal(OrtIntNet(net, threads=1)(x.astype(I64)), ref_layer(x.astype(I64), layer))


def test_onnx_evaluator_runs_a_converted_hs_and_its_graph_checks():
    import onnx

    from lic_deploy.entropy.intnet_onnx import OrtIntNet, intnet_to_onnx

    _, net = built_hs()
    x = z_hat(7)[0].numpy().astype(I64)
    fast = OrtIntNet(net)
    np.testing.assert_array_equal(fast(x), net(x))
    assert fast.out_channels == net.out_channels and fast.layers is net.layers
    model = intnet_to_onnx(net)
    onnx.checker.check_model(model, full_check=True)
    assert {n.op_type for n in model.graph.node} >= {"ConvTranspose", "Conv", "Mod", "Clip"}
    with pytest.raises(ValueError, match="must lie in"):
        fast(np.full_like(x, net.in_max + 1))


def test_evaluator_choice_is_checked():
    from lic_deploy.entropy import evaluators
    from lic_deploy.errors import LicError

    for good in ("numpy", "ort", "torch:cpu", "torch:cuda", "torch:cuda:1"):
        assert evaluators.check(good) == good
    for bad in ("onnx", "torch", "torch:tpu", ""):
        with pytest.raises(LicError, match="choose numpy, ort or torch"):
            evaluators.check(bad)
