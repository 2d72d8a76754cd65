"""The integer operator set (TCM's entropy path; DCAE and LALIC reuse it): exactness against Python-integer
references and accuracy against the float operators, within the bounds docs/entropy.md states."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lic_deploy.entropy import intops
from lic_deploy.entropy.intops import IntLayerNorm, build_lut, build_softmax, isqrt, matmul, round_div, round_shift

I64 = np.int64


def test_round_shift_and_round_div_round_half_up_like_python_integers():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.integers(-(2**61), 2**61, 2000), np.arange(-40, 41)]).astype(I64)
    for shift in (0, 1, 3, 17, 40):
        expected = [v if shift == 0 else (v + 2 ** (shift - 1)) >> shift for v in x.tolist()]
        assert round_shift(x, shift).tolist() == expected
    b = rng.integers(1, 2**20, x.size).astype(I64)
    a = x >> 22  # keep 2a + b inside int64
    expected = [math.floor((2 * p + q) / (2 * q)) if abs(p) < 2**40 else (2 * p + q) // (2 * q)
                for p, q in zip(a.tolist(), b.tolist(), strict=True)]
    assert round_div(a, b).tolist() == expected
    assert round_div(np.array([5, -5, 7, -7], I64), np.array([2, 2, 2, 2], I64)).tolist() == [3, -2, 4, -3]


def test_isqrt_exact_everywhere_it_is_defined():
    rng = np.random.default_rng(1)
    n = np.concatenate([np.arange(0, 5000), rng.integers(0, 2**62, 20000), rng.integers(0, 2**40, 2000)])
    squares = rng.integers(0, 2**31, 2000).astype(object) ** 2
    n = np.concatenate([n.astype(object), squares, squares - 1, squares + 1]).astype(object)
    n = np.array([v for v in n.tolist() if 0 <= v < 2**62], dtype=I64)
    n = np.concatenate([n, np.array([2**62 - 1, (2**31 - 1) ** 2, 2**53 + 1, 2**54 - 1], I64)])
    assert isqrt(n).tolist() == [math.isqrt(v) for v in n.tolist()]
    with pytest.raises(ValueError, match="2\\*\\*62"):
        isqrt(np.array([2**62], I64))
    with pytest.raises(ValueError, match="0 <= n"):
        isqrt(np.array([-1], I64))


def _layernorm_reference(x: np.ndarray, eps_int: int, out_frac: int) -> list[list[int]]:
    """The documented rule in Python integers (math.isqrt, floor division)."""
    c, t = x.shape
    out = [[0] * t for _ in range(c)]
    for j in range(t):
        col = [int(v) for v in x[:, j]]
        s, q = sum(col), sum(v * v for v in col)
        d = c * q - s * s + eps_int
        k = max((61 - d.bit_length()) // 2, 0)
        r = max(math.isqrt(d << (2 * k)), 1)
        for i, v in enumerate(col):
            num = (c * v - s) << (out_frac + k)
            out[i][j] = (2 * num + r) // (2 * r)
    return out


def test_layernorm_equals_its_integer_rule_and_the_float_layernorm():
    """Exact against the Python-integer rule (inputs at +-in_max included); against torch's LayerNorm the
    error stays within 2**-out_frac plus eps's rounding (a few 1e-4 here)."""
    rng = np.random.default_rng(2)
    for c, in_max in [(16, 2**15 - 1), (128, 2**15 - 1), (320, 5000)]:
        ln = IntLayerNorm(c, eps_int=round(c * c * 1e-5 / (4.0 / in_max) ** 2), out_frac=12, in_max=in_max)
        x = rng.integers(-in_max, in_max + 1, size=(c, 40)).astype(I64)
        x[:, 0], x[:, 1], x[:, 2] = in_max, -in_max, 7  # constant columns: variance 0 (eps decides)
        x[0, 3], x[1:, 3] = in_max, -in_max  # one outlier against the rest
        out = ln(x)
        assert out.tolist() == _layernorm_reference(x, ln.eps_int, 12)
        assert np.abs(out).max() <= ln.bound
        scale = 4.0 / in_max  # real value of one input unit
        ref = torch.nn.functional.layer_norm(torch.from_numpy(x.T * scale), (c,), eps=1e-5).numpy().T
        assert np.abs(out / 2**12 - ref).max() < 2**-12 + 1e-3


def test_layernorm_bounds_are_enforced():
    with pytest.raises(ValueError, match="2\\*\\*61"):
        IntLayerNorm(2**16, 0, 12, 2**15)
    ln = IntLayerNorm(8, 0, 12, 100)
    with pytest.raises(ValueError, match="must lie in"):
        ln(np.full((8, 3), 101, I64))
    with pytest.raises(ValueError, match="\\[8, T\\]"):
        ln(np.zeros((4, 3), I64))


@pytest.mark.parametrize(("name", "fn", "lipschitz"), [("gelu", intops.gelu, 1.13), ("sigmoid", intops.sigmoid, 0.25),
                                                        ("tanh", np.tanh, 1.0)])
def test_luts_follow_the_float_function(name, fn, lipschitz):
    """Table functions on int16 inputs: exact table semantics, and |out * s_out - f(x * s_in)| <= s_out / 2 +
    L * (2**in_shift - 1) * s_in (output rounding plus the dropped low input bits)."""
    s_in, s_out = 8.0 / 2**15, 1.0 / 2**14
    for in_shift in (0, 4):
        lut = build_lut(fn, s_in, s_out, -(2**15), 2**15 - 1, in_shift)
        x = np.arange(-(2**15), 2**15, dtype=I64)
        out = lut(x)
        torch_fn = {"gelu": torch.nn.functional.gelu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}[name]
        ref = torch_fn(torch.from_numpy(x * s_in)).numpy()
        assert np.abs(out * s_out - ref).max() <= s_out / 2 + lipschitz * (2**in_shift - 1) * s_in + 1e-12
        assert lut(np.array([-(2**40), 2**40], I64)).tolist() == [lut.table[0], lut.table[-1]]  # clamped ends
        assert lut.table.flags.writeable is False


def test_softmax_masks_exactly_and_follows_the_float_softmax():
    rng = np.random.default_rng(3)
    scale = 1.0 / 256  # logit units
    sm = build_softmax(scale, exp_frac=16, out_frac=15)
    z = rng.integers(-3000, 3000, size=(5, 7, 64)).astype(I64)
    z[0, 0] = 0  # all equal
    z[0, 1, 5] = 10**9  # one dominant logit
    mask = rng.random((7, 64, 64))[:, 0] < 0.3
    mask[:, 0] = False  # every row keeps one entry
    p = sm(z, mask)
    assert np.all(p[np.broadcast_to(mask, p.shape)] == 0)
    ref = torch.softmax(torch.from_numpy(np.where(mask, -np.inf, z * scale)), dim=-1).numpy()
    assert np.abs(p / 2**15 - ref).max() < 2**-14  # table rounding 2**-17 relative, output rounding 2**-16
    assert np.abs(p.sum(axis=-1) - 2**15).max() <= 32  # one half unit per entry at most
    kept = p[0, 0][~mask[0]]  # equal logits: equal probabilities over the unmasked entries
    assert kept.min() == kept.max() and abs(int(kept[0]) - 2**15 / kept.size) <= 0.5
    assert p[0, 1, 5] == 2**15 and p[0, 1].sum() == 2**15  # a dominant logit takes everything
    with pytest.raises(ValueError, match="unmasked"):
        sm(z[:1, :1, :4], np.ones(4, dtype=bool))


def test_matmul_exact_and_bounded():
    rng = np.random.default_rng(4)
    a = rng.integers(-(2**15), 2**15, size=(3, 16, 32)).astype(I64)
    b = rng.integers(-(2**15), 2**15, size=(3, 32, 16)).astype(I64)
    a[0, 0], b[0, :, 0] = -(2**15), -(2**15)  # one sum at the extreme: 32 * 2**30
    expected = np.einsum("bik,bkj->bij", a.astype(object), b.astype(object))
    assert (matmul(a, b).astype(object) == expected).all()
    with pytest.raises(ValueError, match="2\\*\\*53"):
        matmul(np.full((1, 2**12), 2**20, I64), np.full((2**12, 1), 2**21, I64))
