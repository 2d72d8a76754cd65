"""The deterministic codec: bit-exact decoding across engines, precisions and thread counts; robustness to
float perturbations that break CompressAI's float entropy path; hostile streams."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from lic_deploy.entropy.bitstream import unpack
from lic_deploy.errors import BitstreamError, DataError
from lic_deploy.runtime.codec import Codec, decode, encode
from lic_deploy.runtime.engines import create_engine
from lic_deploy.runtime.images import load_rgb, psnr, to_uint8
from lic_deploy.runtime.package import Package
from tests.conftest import Perturbed

ENGINES = {  # name -> (backend, precision, threads)
    "torch-fp32": ("torch", "fp32", 1),
    "ort-fp32": ("ort", "fp32", None),
    "ort-int8": ("ort", "int8", None),
    "ort-fp32-1t": ("ort", "fp32", 1),
    "ort-fp32-2t": ("ort", "fp32", 2),
}


@pytest.fixture(scope="module")
def codecs(package_mbt: Path) -> dict[str, Codec]:
    pkg = Package.open(package_mbt)
    out = {name: Codec(pkg, b, p, threads=t) for name, (b, p, t) in ENGINES.items()}
    # the GPU path's integer networks (torch, float64 GEMMs), here on the CPU
    out["torch-fp32-intnet-torch"] = Codec(pkg, "torch", "fp32", threads=1, intnet="torch:cpu")
    out["ort-fp32-intnet-ort"] = Codec(pkg, "ort", "fp32", threads=1, intnet="ort")  # h_s as an ONNX graph
    return out


@pytest.fixture(scope="module")
def image(image_dir: Path) -> np.ndarray:
    img, _ = load_rgb(image_dir / "img0.png")  # 96x128: padded to 128x128
    return img


def test_round_trip_any_size(codecs: dict[str, Codec], image_dir: Path) -> None:
    codec = codecs["ort-fp32"]
    for path in sorted(image_dir.glob("*.png")):
        img, _ = load_rgb(path)
        data, y_hat = codec.encode_array(img)
        out = codec.decode(data)
        assert out.image.shape == (*img.shape[1:], 3) and out.image.dtype == np.uint8
        assert np.array_equal(out.y_hat, y_hat)
        assert np.array_equal(out.image, codec.reconstruct(y_hat, *img.shape[1:]))
        header, _ = unpack(data)
        assert (header.height, header.width) == img.shape[1:]
        assert (header.height + header.pad_bottom) % 64 == 0 and (header.width + header.pad_right) % 64 == 0


def test_cross_backend_bit_exact(codecs: dict[str, Codec], image: np.ndarray) -> None:
    """Every encoder's stream decodes on every decoder to the encoder's latents; a decoder's image is exactly
    its own synthesis of those latents."""
    streams = {name: c.encode_array(image) for name, c in codecs.items()}
    assert len({data for data, _ in streams.values()}) > 1  # the float transforms really differ...
    for enc_name, (data, y_enc) in streams.items():
        for dec_name, dec in codecs.items():
            out = dec.decode(data)
            assert np.array_equal(out.y_hat, y_enc), (enc_name, dec_name)  # ...the latents never do
            assert np.array_equal(out.image, dec.reconstruct(y_enc, *image.shape[1:])), (enc_name, dec_name)
        images = [codecs[n].decode(data).image for n in ("ort-fp32", "ort-fp32")]
        assert np.array_equal(images[0], images[1])


@pytest.mark.parametrize(("fast_name", "plain_name", "cls"), [("torch-fp32-intnet-torch", "torch-fp32", "TorchIntNet"),
                                                             ("ort-fp32-intnet-ort", "ort-fp32-1t", "OrtIntNet")])
def test_other_integer_network_evaluators_write_the_same_streams(codecs: dict[str, Codec], image: np.ndarray,
                                                                 fast_name: str, plain_name: str, cls: str) -> None:
    """The same engine with the integer networks on torch (the `--device cuda` path) or as an ONNX graph on ONNX
    Runtime, against numpy: the same bytes."""
    from lic_deploy.entropy import intnet_onnx, intnet_torch

    evaluator = getattr(intnet_torch, cls, None) or getattr(intnet_onnx, cls)
    fast, plain = codecs[fast_name], codecs[plain_name]
    assert isinstance(fast.entropy.hs, evaluator) and not isinstance(plain.entropy.hs, evaluator)
    assert fast.encode_array(image)[0] == plain.encode_array(image)[0]


def test_perturbed_transforms_change_nothing_in_decodability(package_mbt: Path, image: np.ndarray) -> None:
    pkg = Package.open(package_mbt)
    clean = Codec(pkg)
    for seed in range(3):
        noisy = Codec(pkg, engine=Perturbed(create_engine(pkg, "ort", "fp32"), 1e-3, seed))
        data, y_enc = noisy.encode_array(image)  # encoder on "another device"
        assert np.array_equal(clean.decode(data).y_hat, y_enc)
        data, y_enc = clean.encode_array(image)  # decoder on "another device"
        assert np.array_equal(noisy.decode(data).y_hat, y_enc)


def test_same_perturbation_breaks_compressai_float_path(ckpt_mbt: Path, image: np.ndarray) -> None:
    """Companion: 1e-3 relative noise on a float h_s (CompressAI's path) desynchronises its decoder."""
    import torch

    from lic_deploy.archs.checkpoint import load_model
    from lic_deploy.runtime.images import pad_to_multiple

    model = load_model(ckpt_mbt).model
    model.update(force=True)
    x = torch.from_numpy(pad_to_multiple(image, 64)[0][None])
    gc, eb = model.gaussian_conditional, model.entropy_bottleneck
    with torch.no_grad():
        out = model.compress(x)
        z_hat = eb.decompress(out["strings"][1], out["shape"])
        params = model.h_s(z_hat)
        gen = torch.Generator().manual_seed(0)
        noisy = params * (1 + 1e-3 * torch.randn(params.shape, generator=gen))

        def decode_y(p: torch.Tensor) -> torch.Tensor:
            scales, means = p.chunk(2, 1)
            return gc.decompress(out["strings"][0], gc.build_indexes(scales), means=means)

        clean_y, noisy_y = decode_y(params), decode_y(noisy)
    wrong = float(((clean_y - noisy_y).abs() > 0.5).float().mean())
    assert wrong > 0.01, f"only {wrong:.2%} of latents changed"


def test_hostile_streams(codecs: dict[str, Codec], image: np.ndarray, package_mbt: Path) -> None:
    codec = codecs["ort-fp32"]
    data, _ = codec.encode_array(image)
    for cut in range(len(data)):  # truncated at every byte position
        with pytest.raises(BitstreamError):
            codec.decode_latents(data[:cut])
    header_bits = (37 + 4 * 3) * 8
    for bit in range(header_bits):  # every single-bit flip in the header
        bad = bytearray(data)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(BitstreamError):
            codec.decode_latents(bytes(bad))
    rng = np.random.default_rng(0)
    for n in (0, 1, 44, 45, 100, 5000):
        with pytest.raises(BitstreamError):
            codec.decode(rng.integers(0, 256, n, dtype=np.uint8).tobytes())


def _recrc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_crafted_streams_with_valid_crc(codecs: dict[str, Codec], image: np.ndarray) -> None:
    """Streams an attacker forged with a correct CRC: absurd sizes are refused before any allocation, and
    corrupted payloads give BitstreamError or some image, never another exception."""
    codec = codecs["ort-fp32"]
    data, _ = codec.encode_array(image)
    body = bytearray(data[:-4])
    huge = bytearray(body)
    struct.pack_into("<II", huge, 24, 200_000, 200_000)
    with pytest.raises(BitstreamError, match="pixels"):
        codec.decode(_recrc(bytes(huge)))
    rng = np.random.default_rng(1)
    outcomes = set()
    for _ in range(30):
        bad = bytearray(body)
        for pos in rng.integers(49, len(bad), 3):
            bad[pos] = int(rng.integers(0, 256))
        try:
            codec.decode(_recrc(bytes(bad)))
            outcomes.add("decoded")
        except BitstreamError:
            outcomes.add("error")
    assert outcomes <= {"decoded", "error"}


def test_wrong_package_is_named(codecs: dict[str, Codec], image: np.ndarray, tmp_path: Path, ckpt_mbt: Path) -> None:
    from lic_deploy.export.package_writer import ExportOptions, export_package
    from tests.conftest import make_checkpoint

    other = export_package(make_checkpoint(tmp_path / "o.pt", "bmshj2018-hyperprior", 32, 48),
                           tmp_path / "other", options=ExportOptions(calib_count=2, calib_size=128),
                           log=lambda _: None)
    data, _ = codecs["ort-fp32"].encode_array(image)
    with pytest.raises(BitstreamError, match="encoded with package"):
        Codec(other).decode(data)


def test_greyscale_and_odd_inputs(package_mbt: Path, tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    grey = (rng.random((40, 50)) * 255).astype(np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "g.png")
    out = decode(package_mbt, encode(package_mbt, tmp_path / "g.png"))
    assert out.shape == (40, 50) and out.dtype == np.uint8
    rgba = (rng.random((30, 20, 4)) * 255).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    with pytest.warns(UserWarning, match="alpha"):
        data = encode(package_mbt, tmp_path / "a.png")
    assert decode(package_mbt, data).shape == (30, 20, 3)
    deep = (rng.random((16, 16)) * 65535).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    with pytest.warns(UserWarning, match="8 bit"):
        assert decode(package_mbt, encode(package_mbt, tmp_path / "d.png")).shape == (16, 16)
    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot read image"):
        encode(package_mbt, tmp_path / "x.png")


def test_quality_is_what_the_latents_give(codecs: dict[str, Codec], image: np.ndarray) -> None:
    """PSNR of the decode equals PSNR of the encoder-side reconstruction (a check on cropping/rounding)."""
    codec = codecs["ort-fp32"]
    data, y_hat = codec.encode_array(image)
    ref = to_uint8(image)
    assert psnr(codec.decode(data).image, ref) == psnr(codec.reconstruct(y_hat, *image.shape[1:]), ref)


def test_speed_bench_profiles_every_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bench-speed on a tiny model: every encode/decode step is timed, the integer h_s is part of the entropy
    step, and the ratio against CompressAI's compress/decompress is computed from the same run."""
    import json

    from lic_deploy.bench.speed_bench import main as speed_main
    from tests.conftest import make_checkpoint, write_images

    write_images(tmp_path / "img", [(64, 96)])
    ckpt = make_checkpoint(tmp_path / "tiny.pt", "mbt2018-mean", 16, 24)
    assert speed_main([str(ckpt), "--data", str(tmp_path / "img"), "--images", "1", "--repeat", "1",
                       "--threads", "1", "--paths", "ort:fp32,ort:fp32@ort", "--entropy-bits", "16,8",
                       "--out", str(tmp_path / "out")]) == 0
    assert "enc+dec vs CompressAI" in capsys.readouterr().out
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    (fp32,) = doc["models"]["tiny"]["per_image"]["ort:fp32"]
    for key in ("enc_g_a", "enc_h_a", "enc_entropy_hs", "enc_entropy_rest", "enc_container", "dec_container",
                "dec_entropy_hs", "dec_entropy_rest", "dec_g_s"):
        assert fp32[key] >= 0, key
    assert fp32["enc_entropy_hs"] > 0 and fp32["dec_entropy_hs"] > 0 and fp32["encode"] > fp32["enc_g_a"]
    (onnx_nets,) = doc["models"]["tiny"]["per_image"]["ort:fp32@ort"]
    (e8,) = doc["models"]["tiny"]["per_image"]["ort:fp32 e8"]
    assert onnx_nets["dec_entropy_hs"] > 0 and e8["dec_entropy_hs"] > 0
    (ca,) = doc["models"]["tiny"]["per_image"]["compressai"]
    assert ca["encode"] > 0 and ca["g_s"] > 0
    out = tmp_path / "refused"
    assert speed_main([str(ckpt), "--data", str(tmp_path / "img"), "--paths", "ort:fp64", "--out", str(out)]) == 2
    assert "expected ort:PRECISION" in capsys.readouterr().err
    assert speed_main([str(ckpt), "--data", str(tmp_path / "img"), "--paths", "ort:fp32@gpu", "--out", str(out)]) == 2
    assert "choose numpy, ort or torch" in capsys.readouterr().err
