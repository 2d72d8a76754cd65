"""TCM: the official key layout and sizes, the window attention against slow references, the float reference
codec, training from the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lic_deploy.archs.tcm import TcmAdapter, config_for
from lic_deploy.archs.tcm_layers import WindowAttention
from lic_deploy.archs.tcm_model import TCM

TINY = {"N": 32, "M": 40, "slices": 5, "depth": 1, "attn": 16, "cc1": 16, "cc2": 16, "Z": 16}


def official_shift_mask(h_windows: int, w_windows: int, p: int, shift: int) -> torch.Tensor:
    """TCM's `generate_mask` as its code builds it: four slice assignments on a [w1, w2, p1, p2, p3, p4] grid."""
    m = torch.zeros(h_windows, w_windows, p, p, p, p, dtype=torch.bool)
    s = p - shift
    m[-1, :, :s, :, s:, :] = True
    m[-1, :, s:, :, :s, :] = True
    m[:, -1, :, :s, :, s:] = True
    m[:, -1, :, s:, :, :s] = True
    return m.reshape(h_windows * w_windows, p * p, p * p)


def naive_window_attention(att: WindowAttention, x: torch.Tensor) -> np.ndarray:
    """Float64 loops over windows and heads: roll, per-window softmax(q k^T * scale + bias [masked]) v, unroll."""
    xd = x.double()[0].numpy()
    h, w, c = xd.shape
    win, heads, hd = att.window, att.heads, att.head_dim
    if att.shifted:
        xd = np.roll(xd, (-(win // 2), -(win // 2)), axis=(0, 1))
    wq = att.embedding_layer.weight.detach().double().numpy()
    bq = att.embedding_layer.bias.detach().double().numpy()
    wo, bo = att.linear.weight.detach().double().numpy(), att.linear.bias.detach().double().numpy()
    params = att.relative_position_params.detach().double().numpy()
    mask = official_shift_mask(h // win, w // win, win, win // 2).numpy() if att.shifted else None
    out = np.zeros_like(xd)
    for wi in range(h // win):
        for wj in range(w // win):
            tokens = xd[wi * win:(wi + 1) * win, wj * win:(wj + 1) * win].reshape(-1, c)
            qkv = tokens @ wq.T + bq
            heads_out = []
            for hh in range(heads):
                q = qkv[:, hh * hd:(hh + 1) * hd]
                k = qkv[:, c + hh * hd:c + (hh + 1) * hd]
                v = qkv[:, 2 * c + hh * hd:2 * c + (hh + 1) * hd]
                sim = q @ k.T * hd**-0.5
                for i in range(win * win):
                    for j in range(win * win):
                        sim[i, j] += params[hh, i // win - j // win + win - 1, i % win - j % win + win - 1]
                        if mask is not None and mask[wi * (w // win) + wj, i, j]:
                            sim[i, j] = -np.inf
                p = np.exp(sim - sim.max(axis=1, keepdims=True))
                heads_out.append((p / p.sum(axis=1, keepdims=True)) @ v)
            res = np.concatenate(heads_out, axis=1) @ wo.T + bo
            out[wi * win:(wi + 1) * win, wj * win:(wj + 1) * win] = res.reshape(win, win, c)
    if att.shifted:
        out = np.roll(out, (win // 2, win // 2), axis=(0, 1))
    return out


@pytest.mark.parametrize("shifted", [False, True])
def test_window_attention_matches_a_naive_reference(shifted: bool) -> None:
    torch.manual_seed(0)
    att = WindowAttention(16, 8, 4, shifted).eval()
    with torch.no_grad():
        att.relative_position_params.normal_(0, 1)  # a bias large enough to matter
        x = torch.randn(1, 8, 12, 16)
        out = att(x)[0].double().numpy()
    np.testing.assert_allclose(out, naive_window_attention(att, x), atol=1e-5)


def test_shift_mask_equals_the_official_construction() -> None:
    for (h, w), win in [((8, 12), 4), ((16, 16), 8), ((24, 8), 8)]:
        att = WindowAttention(8, 8, win, shifted=True)
        expected = official_shift_mask(h // win, w // win, win, win // 2)
        assert torch.equal(att.shift_mask(h, w, torch.device("cpu")), expected)


def test_official_configurations_have_the_official_layout() -> None:
    """The official code's counts (../shared/ARCHITECTURES.md): 1293 state-dict keys for every size,
    45.18M / 59.13M / 76.57M parameters for TCM-S/M/L, and the named key shapes."""
    expected_params = {"S": 45.18, "M": 59.13, "L": 76.57}
    for size in "SML":
        model = TCM(**config_for(size))
        sd = model.state_dict()
        assert len(sd) == 1293, size
        assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == expected_params[size]
        n = config_for(size)["N"]
        assert tuple(sd["g_a.1.trans_block.msa.relative_position_params"].shape) == (n // 8, 15, 15)
        assert tuple(sd["h_a.1.trans_block.msa.relative_position_params"].shape) == (n // 32, 7, 7)
        assert tuple(sd["g_a.1.trans_block.msa.embedding_layer.weight"].shape) == (3 * n, n)
        assert tuple(sd["atten_mean.4.0.in_conv.weight"].shape) == (128, 320 + 4 * 64, 1, 1)
        assert tuple(sd["lrp_transforms.4.0.weight"].shape) == (224, 320 + 5 * 64, 3, 3)
        assert tuple(sd["entropy_bottleneck.quantiles"].shape) == (192, 1, 3)
        for key in ("g_a.1.conv1_1.weight", "g_a.1.conv1_2.weight", "g_a.1.conv_block.conv1.weight",
                    "h_mean_s.0.subpel_conv.0.weight", "h_scale_s.3.0.weight", "atten_scale.0.0.conv_b.3.weight",
                    "cc_scale_transforms.2.4.weight", "gaussian_conditional.scale_table"):
            assert key in sd, key
        assert TcmAdapter().config_from_state_dict(sd) == config_for(size)


def test_official_training_checkpoint_with_module_prefixes_loads(tmp_path: Path) -> None:
    """A random-weight TCM-S saved as TCM's train.py saves it (dict with epoch, state_dict with `module.`
    prefixes, optimizer states) loads through lic-deploy's checkpoint reader with the config inferred."""
    from lic_deploy.archs.checkpoint import load_model

    torch.manual_seed(1)
    model = TCM(**config_for("S"))
    opt = torch.optim.Adam(list(model.parameters())[:3], lr=1e-4)
    path = tmp_path / "checkpoint_best_loss.pth.tar"
    torch.save({"epoch": 49, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "loss": 0.5, "optimizer": opt.state_dict(), "aux_optimizer": opt.state_dict(),
                "lr_scheduler": {"milestones": {45: 1, 48: 1}, "gamma": 0.1}}, path)
    loaded = load_model(path)
    assert loaded.arch == "tcm" and loaded.config == config_for("S")
    for key in ("g_s.7.trans_block.mlp.2.weight", "atten_mean.3.0.non_local_block.block_2.msa.linear.bias"):
        assert torch.equal(loaded.model.state_dict()[key], model.state_dict()[key]), key


def test_float_reference_codec_round_trip_and_rate() -> None:
    """compress/decompress of a narrow TCM: the decoder rebuilds the encoder's x_hat exactly (same machine, same
    float path), and the bytes track the model's own likelihood estimate."""
    torch.manual_seed(2)
    model = TCM(**TINY).eval()
    model.update(force=True)
    x = torch.rand(1, 3, 256, 384)
    with torch.no_grad():
        enc = model.compress(x)
        dec = model.decompress(enc["strings"], enc["shape"])
        out = model(x)
    assert len(enc["strings"]) == 1 + TINY["slices"] and tuple(enc["shape"]) == (4, 6)
    assert dec["x_hat"].shape == x.shape
    n_bytes = sum(len(s[0]) for s in enc["strings"])
    est = float(sum(-torch.log2(lk).sum() for lk in out["likelihoods"].values())) / 8
    assert 0.7 * est < n_bytes < 1.3 * est + 200
    with torch.no_grad():  # the same x_hat as a second decode (deterministic)
        again = model.decompress(enc["strings"], enc["shape"])
    assert torch.equal(dec["x_hat"], again["x_hat"])


def test_train_cli_tcm_soap_and_adam(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lic_deploy.archs.checkpoint import load_model
    from lic_deploy.cli import main
    from tests.conftest import write_images

    tiny_data = tmp_path / "data"
    write_images(tiny_data, [(260, 300), (280, 256)])
    knobs = ",".join(f"{k}={v}" for k, v in TINY.items() if k not in ("N", "M"))
    for opt in ("soap", "adam"):
        out = tmp_path / f"tcm-{opt}.pt"
        assert main(["train", "--arch", "tcm", "--data", str(tiny_data), "-o", str(out), "--N", "32", "--M", "40",
                     "--arch-config", knobs, "--patch", "256", "--batch", "1", "--steps", "2", "--log-every", "1",
                     "--optimizer", opt, "--align-every", "1", "--downscale", "0"]) == 0
        loaded = load_model(out)
        assert loaded.arch == "tcm" and loaded.config == TINY
    assert main(["train", "--arch", "tcm", "--data", str(tiny_data), "-o", str(tmp_path / "x.pt"),
                 "--patch", "128"]) == 2
    assert "multiple of 128 and at least 256" in capsys.readouterr().err
    assert main(["train", "--arch", "tcm", "--data", str(tiny_data), "-o", str(tmp_path / "x.pt"), "--patch", "256",
                 "--arch-config", "heads=3"]) == 2
    assert "heads" in capsys.readouterr().err


def test_transforms_export_at_two_sizes_and_int8_quantizes_linear_layers(tmp_path: Path) -> None:
    """g_a, h_a, g_s and a hyper-synthesis branch of a narrow TCM export to ONNX at 256x256 and run at 384x512
    within the FP32 tolerance; INT8 puts per-channel Q/DQ on the Swin layers' linear layers (not on Q K^T, P V)."""
    import onnx
    import onnxruntime as ort

    from lic_deploy.export.onnx_export import FP32_TOLERANCE, deployable, export_onnx, rel_error, sqnr_db, torch_run
    from lic_deploy.export.quantize import quantize_int8

    torch.manual_seed(3)
    model = TCM(**TINY).eval()
    rng = np.random.default_rng(0)
    for name, module, c, stride in [("g_a", model.g_a, 3, 1), ("h_a", model.h_a, 40, 16),
                                    ("g_s", model.g_s, 40, 16), ("h_mean_s", model.h_mean_s, 16, 64)]:
        net = deployable(module)
        path = tmp_path / f"{name}.onnx"
        export_onnx(net, torch.rand(1, c, 256 // stride, 256 // stride), path)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for h, w in [(256, 256), (384, 512)]:
            x = rng.random((1, c, h // stride, w // stride), dtype=np.float32)
            assert rel_error(torch_run(net, x), sess.run(None, {"input": x})[0]) <= FP32_TOLERANCE, (name, h, w)
    net = deployable(model.g_a)
    int8 = tmp_path / "g_a.int8.onnx"
    quantize_int8(tmp_path / "g_a.onnx", int8, [rng.random((1, 3, 256, 256), dtype=np.float32) for _ in range(2)])
    graph = onnx.load(str(int8)).graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    products = [n for n in matmuls if "/msa/MatMul" in n.name]  # Q K^T and P V of each attention
    assert len(products) == 2 * 3 and len(matmuls) == 6 * 3  # g_a of depth 1: three Swin layers
    for node in matmuls:
        fed_by_dq = [producers[i].op_type == "DequantizeLinear" for i in node.input if i in producers]
        if node in products:
            assert not any(fed_by_dq), node.name
        else:
            assert len(fed_by_dq) == 2 and all(fed_by_dq), node.name
            scale = inits[producers[node.input[1]].input[1]]
            assert len(scale.dims) == 1 and scale.dims[0] > 1, node.name  # per output channel
    x = rng.random((1, 3, 384, 512), dtype=np.float32)
    out = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert sqnr_db(torch_run(net, x), out) > 20


# ---------------------------------------------------------------------- the codec: export, integer entropy path


@pytest.fixture(scope="module")
def package_tcm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lic_deploy.archs.checkpoint import save_checkpoint
    from lic_deploy.export.package_writer import ExportOptions, export_package

    tmp = tmp_path_factory.mktemp("tcm")
    torch.manual_seed(5)
    save_checkpoint(tmp / "tiny.pt", TCM(**TINY), "tcm", TINY)
    return export_package(tmp / "tiny.pt", tmp / "pkg", log=lambda _: None,
                          options=ExportOptions(precisions=("fp32", "int8"), calib_count=2))


@pytest.fixture(scope="module")
def tcm_image() -> np.ndarray:
    """A smooth 200x300 RGB image (padded to 256x384 by the codec)."""
    yy, xx = np.mgrid[0:200, 0:300] / 300.0
    rng = np.random.default_rng(6)
    img = np.stack([np.sin(7 * xx + c) * np.cos(5 * yy - c) for c in range(3)]) * 0.4 + 0.5
    return np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1).astype(np.float32)


def test_cross_backend_bit_exact(package_tcm: Path, tcm_image: np.ndarray) -> None:
    """Streams from PyTorch FP32, ONNX Runtime FP32 (1 and 2 threads) and ONNX Runtime INT8 decode on each of
    them to the encoder's latents; one y stream per slice."""
    from lic_deploy.entropy.bitstream import unpack
    from lic_deploy.runtime.codec import Codec
    from lic_deploy.runtime.package import Package

    pkg = Package.open(package_tcm)
    assert pkg.geometry["pad_multiple"] == 128 and pkg.geometry["min_size"] == 256
    codecs = {"torch-fp32": Codec(pkg, "torch", threads=1), "ort-fp32-1t": Codec(pkg, threads=1),
              "ort-fp32-2t": Codec(pkg, threads=2), "ort-int8": Codec(pkg, "ort", "int8")}
    streams = {name: c.encode_array(tcm_image) for name, c in codecs.items()}
    assert len({data for data, _ in streams.values()}) > 1  # the float transforms differ...
    for enc, (data, y_enc) in streams.items():
        _, parts = unpack(data)
        assert len(parts) == 2 + TINY["slices"]  # z, the slices, escapes
        for dec, codec in codecs.items():
            out = codec.decode(data)
            assert np.array_equal(out.y_hat, y_enc), (enc, dec)  # ...the latents never do
            assert out.image.shape == (200, 300, 3)


def test_perturbed_transforms_change_nothing_in_decodability(package_tcm: Path, tcm_image: np.ndarray) -> None:
    from lic_deploy.runtime.codec import Codec
    from lic_deploy.runtime.engines import create_engine
    from lic_deploy.runtime.package import Package
    from tests.conftest import Perturbed

    pkg = Package.open(package_tcm)
    clean = Codec(pkg)
    for seed in range(2):
        noisy = Codec(pkg, engine=Perturbed(create_engine(pkg, "ort", "fp32"), 1e-3, seed))
        data, y_enc = noisy.encode_array(tcm_image)
        assert np.array_equal(clean.decode(data).y_hat, y_enc)
        data, y_enc = clean.encode_array(tcm_image)
        assert np.array_equal(noisy.decode(data).y_hat, y_enc)


def test_hostile_tcm_streams(package_tcm: Path, tcm_image: np.ndarray) -> None:
    """Truncation, bit flips, forged lengths with a valid CRC and a wrong stream count: BitstreamError (or, for
    payload bytes that still parse, some image), never another exception."""
    import struct
    import zlib

    from lic_deploy.errors import BitstreamError
    from lic_deploy.runtime.codec import Codec

    codec = Codec(package_tcm)
    data, _ = codec.encode_array(tcm_image)
    for cut in range(0, len(data), 7):
        with pytest.raises(BitstreamError):
            codec.decode(data[:cut])
    n = 2 + TINY["slices"]
    for bit in range(0, (37 + 4 * n) * 8, 3):
        bad = bytearray(data)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(BitstreamError):
            codec.decode(bytes(bad))

    def recrc(body: bytes) -> bytes:
        return body + struct.pack("<I", zlib.crc32(body))

    body = data[:-4]
    lengths = list(struct.unpack_from(f"<{n}I", body, 37))
    payload = body[37 + 4 * n:]
    outcomes = set()
    for i in range(n):  # move bytes between neighbouring streams: lengths still sum up, CRC valid
        for delta in (-3, 1, 5):
            forged = list(lengths)
            j = (i + 1) % n
            if forged[i] + delta < 0 or forged[j] - delta < 0:
                continue
            forged[i] += delta
            forged[j] -= delta
            try:
                codec.decode(recrc(body[:37] + struct.pack(f"<{n}I", *forged) + payload))
                outcomes.add("decoded")
            except BitstreamError:
                outcomes.add("error")
    assert "error" in outcomes
    fewer = bytearray(body[:37 + 4 * (n - 1)] + payload)
    fewer[36] = n - 1
    struct.pack_into("<I", fewer, 37 + 4 * (n - 2), lengths[-2] + lengths[-1])
    with pytest.raises(BitstreamError, match="payload streams"):
        codec.decode(recrc(bytes(fewer)))


def test_integer_path_rate_matches_the_float_reference(package_tcm: Path, tcm_image: np.ndarray) -> None:
    """The same model's float reference codec (PyTorch, CompressAI's rANS) on the same padded image: the
    integer entropy path's payload is within a few percent of it, and its latents stay close to the float
    y_hat (the integer networks' rounding moves the means slightly, the symbols rarely)."""
    from lic_deploy.archs.checkpoint import load_model
    from lic_deploy.entropy.bitstream import unpack
    from lic_deploy.runtime.codec import Codec
    from lic_deploy.runtime.package import Package

    pkg = Package.open(package_tcm)
    model = load_model(package_tcm / "model.safetensors").model
    model.update(force=True)
    x = torch.from_numpy(pkg.pad(tcm_image)[0][None])
    with torch.no_grad():
        ref = model.compress(x)
    ref_bytes = sum(len(s[0]) for s in ref["strings"])
    data, _ = Codec(pkg, "torch", threads=1).encode_array(tcm_image)
    lic_bytes = sum(len(p) for p in unpack(data)[1])
    assert 0.85 * ref_bytes <= lic_bytes <= 1.15 * ref_bytes + 16


def test_official_tcm_s_checkpoint_exports_encodes_and_decodes(tmp_path: Path) -> None:
    """A random-weight TCM-S in the official layout, saved as TCM's training script does (with `module.`
    prefixes), goes through export (FP32) and encode/decode with the latents intact."""
    from lic_deploy.export.package_writer import ExportOptions, export_package
    from lic_deploy.runtime.codec import Codec

    torch.manual_seed(7)
    model = TCM(**config_for("S"))
    path = tmp_path / "checkpoint_best_loss.pth.tar"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    pkg = export_package(path, tmp_path / "pkg", log=lambda _: None, options=ExportOptions(calib_count=1))
    image = np.random.default_rng(8).random((3, 130, 260), dtype=np.float32)
    codec = Codec(pkg)
    data, y_enc = codec.encode_array(image)
    out = codec.decode(data)
    assert np.array_equal(out.y_hat, y_enc) and out.image.shape == (130, 260, 3)
    assert y_enc.shape == (320, 16, 24)  # padded to 256 x 384: multiples of 128, at least 256


def test_ablation_variants_code_real_streams(package_tcm: Path, tcm_image: np.ndarray) -> None:
    """The ablation's `integer` variant is the shipped codec (same payload bits and PSNR as encode/decode);
    `float-all` takes the float networks' values, so its rate is near the float reference codec's."""
    from lic_deploy.archs.checkpoint import load_model
    from lic_deploy.bench.tcm_ablation import VARIANTS, AblatedTcm, measure, report
    from lic_deploy.entropy.bitstream import unpack
    from lic_deploy.entropy.model import hs_input
    from lic_deploy.runtime.codec import Codec
    from lic_deploy.runtime.images import psnr, to_uint8
    from lic_deploy.runtime.package import Package

    model = load_model(package_tcm / "model.safetensors").model.eval()
    got = measure(package_tcm, model, [tcm_image], threads=1)
    codec = Codec(package_tcm, "ort", "fp32", threads=1)
    data, _ = codec.encode_array(tcm_image)
    pixels = tcm_image.shape[1] * tcm_image.shape[2]
    assert got["integer"]["bpp"] == 8 * sum(len(p) for p in unpack(data)[1]) / pixels
    assert got["integer"]["psnr"] == pytest.approx(psnr(codec.decode(data).image, to_uint8(tcm_image)), abs=1e-9)
    model.update(force=True)
    with torch.no_grad():
        ref = model.compress(torch.from_numpy(Package.open(package_tcm).pad(tcm_image)[0][None]))
    ref_bpp = 8 * sum(len(s[0]) for s in ref["strings"]) / pixels
    assert abs(got["float-all"]["bpp"] / ref_bpp - 1) < 0.05
    # float-all's y_hat is the float model's (reference_slices on the same y and z_hat) to y_hat's fixed point
    x = Package.open(package_tcm).pad(tcm_image)[0][None]
    y = codec.engine.run("g_a", x)
    z = codec.engine.run("h_a", y)
    errors = {}
    for name in ("integer", "float-all"):
        entropy = AblatedTcm(codec.package.entropy, model, VARIANTS[name])
        y_hat = entropy.encode(y[0], z[0]).y_hat
        z_hat = hs_input(entropy.z_symbols(z[0]), entropy.median_fp, entropy.z_frac_bits) / 2**entropy.z_frac_bits
        with torch.no_grad():
            ref_y_hat = model.reference_slices(torch.from_numpy(y), torch.from_numpy(z_hat[None]).float())[0]
        errors[name] = np.abs(y_hat - ref_y_hat[0].numpy()) * (1 << entropy.param_frac_bits)
    # in units of y_hat's fixed point: float-all within one unit almost everywhere, the integer path not
    assert np.mean(errors["float-all"] <= 1.01) > 0.99 and np.mean(errors["integer"] <= 1.01) < 0.9
    assert set(got) == set(VARIANTS) and all(np.isfinite([v["bpp"], v["psnr"]]).all() for v in got.values())
    assert all(name in report({"m": got}) for name in VARIANTS)
