"""Integer programs built from TCM's float modules: accuracy against the float modules, determinism, storage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lic_deploy.archs.tcm_model import TCM
from lic_deploy.entropy import intnet
from lic_deploy.entropy.intprog import Program, window_region_mask
from lic_deploy.errors import PackageError
from lic_deploy.export.intprog_build import (
    Tracer,
    emit_conv_chain,
    emit_conv_trans_block,
    emit_hyper_synthesis,
    emit_swatten,
)

TINY = {"N": 32, "M": 40, "slices": 5, "depth": 1, "attn": 16, "cc1": 16, "cc2": 16, "Z": 16}


@pytest.fixture(scope="module")
def model() -> TCM:
    torch.manual_seed(0)
    return TCM(**TINY).eval()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _float(module: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    import copy

    with torch.no_grad():
        return copy.deepcopy(module).double()(x.double())[0].numpy()


def test_hyper_synthesis_program_follows_the_float_branch(model: TCM) -> None:
    """h_mean_s (upsample block with IGDN, a ConvTransBlock with shifted-window attention, subpel conv) as an
    integer program, calibrated on three z_hat and run on a fourth of another size: within 2 % (L2)."""
    gen = torch.Generator().manual_seed(1)
    calib = [torch.round(torch.randn(1, 16, 4, 6, generator=gen) * 3) for _ in range(3)]
    t = Tracer()
    z = t.input("z", calib, 1.0, 127)
    out = emit_hyper_synthesis(t, model.h_mean_s, z)
    prog = t.program()
    assert {i.op for i in prog.instrs} >= {"conv", "igdn", "wmsa", "layernorm", "lut", "pixel_shuffle", "add"}
    test = torch.round(torch.randn(1, 16, 6, 4, generator=gen) * 3)
    (o,) = prog.run({"z": test[0].numpy().astype(np.int64)}, [out])
    assert o.dtype == np.int64
    assert _rel(o * t.regs[out].scale[:, None, None], _float(model.h_mean_s, test)) < 0.02


def test_igdn_with_rows_of_gamma_at_its_floor(model: TCM) -> None:
    """Trained IGDNs can leave rows of gamma at the reparametrisation's floor (~1e-11, seen in a narrow TCM's
    h_scale_s at lambda 0.0035): beta must still fit the accumulator, and the program still follow the branch."""
    import copy

    branch = copy.deepcopy(model.h_scale_s)
    gdn = branch[0].igdn
    pedestal = gdn.gamma_reparam.reparam_offset**2
    with torch.no_grad():
        gdn.gamma[:5] = (pedestal + 1e-11) ** 0.5  # rows 0-4: gamma ~1e-11, as trained
    assert float(gdn.gamma_reparam(gdn.gamma)[:5].abs().max()) < 1e-10
    gen = torch.Generator().manual_seed(3)
    calib = [torch.round(torch.randn(1, 16, 4, 6, generator=gen) * 3) for _ in range(3)]
    t = Tracer()
    out = emit_hyper_synthesis(t, branch, t.input("z", calib, 1.0, 127))
    test = torch.round(torch.randn(1, 16, 6, 4, generator=gen) * 3)
    (o,) = t.program().run({"z": test[0].numpy().astype(np.int64)}, [out])
    assert _rel(o * t.regs[out].scale[:, None, None], _float(branch, test)) < 0.02


def test_swatten_and_conv_chain_programs_follow_the_float_modules(model: TCM) -> None:
    gen = torch.Generator().manual_seed(2)
    calib = [torch.randn(1, 40, 8, 8, generator=gen) * 2 for _ in range(3)]
    t = Tracer()
    x = t.input("x", calib, 2.0**-8, 2**15 - 1)
    att = emit_swatten(t, model.atten_mean[0][0], x)
    cc = emit_conv_chain(t, model.cc_mean_transforms[0], att, np.full(8, 2.0**-16))
    prog = t.program()
    test = torch.randn(1, 40, 8, 16, generator=gen) * 2
    xi = np.clip(np.round(test[0].numpy() * 2**8), -(2**15 - 1), 2**15 - 1).astype(np.int64)
    a, c = prog.run({"x": xi}, [att, cc])
    ref_att = _float(model.atten_mean[0][0], torch.from_numpy(xi[None] / 2**8))
    ref_cc = _float(model.cc_mean_transforms[0], torch.from_numpy(ref_att[None]))
    assert _rel(a * t.regs[att].scale[:, None, None], ref_att) < 0.02
    assert _rel(c * 2.0**-16, ref_cc) < 0.02


def test_program_is_deterministic_across_chunking_and_storage(model: TCM, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same integers with other GEMM row chunks (another memory budget), after a round trip through the
    package arrays, and the stored form refuses corruption with PackageError."""
    gen = torch.Generator().manual_seed(3)
    calib = [torch.randn(1, 64, 8, 8, generator=gen) for _ in range(2)]
    t = Tracer()
    x = t.input("x", calib, 2.0**-10, 2**15 - 1)
    out = emit_conv_trans_block(t, model.h_mean_s[1], x)
    prog = t.program()
    xi = np.random.default_rng(4).integers(-3000, 3000, size=(64, 8, 12)).astype(np.int64)
    (ref,) = prog.run({"x": xi}, [out])
    monkeypatch.setattr(intnet, "CHUNK_BYTES", 4096)
    (chunked,) = prog.run({"x": xi}, [out])
    arrays = prog.to_arrays("p.")
    (stored,) = Program.from_arrays(arrays, "p.").run({"x": xi}, [out])
    assert np.array_equal(ref, chunked) and np.array_equal(ref, stored)
    broken = dict(arrays)
    broken["p.meta"] = np.frombuffer(b'{"format": "lic-intprog", "version": 9}', dtype=np.uint8)
    with pytest.raises(PackageError, match="v1"):
        Program.from_arrays(broken, "p.")
    missing = {k: v for k, v in arrays.items() if not k.endswith(".bias")}
    with pytest.raises(PackageError):
        Program.from_arrays(missing, "p.")
    with pytest.raises(ValueError, match="exceeds its bound"):
        prog.run({"x": np.full((64, 8, 12), 2**15, np.int64)}, [out])


def test_window_region_mask_matches_the_float_module() -> None:
    from lic_deploy.archs.tcm_layers import WindowAttention

    shifted = WindowAttention(32, 32, 4, shifted=True)
    for h, w in [(8, 8), (12, 16), (4, 8)]:
        assert np.array_equal(window_region_mask(h, w, 4), shifted.shift_mask(h, w, torch.device("cpu")).numpy())
