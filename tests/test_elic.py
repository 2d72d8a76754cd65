"""ELIC end to end on a small random-weight model: export of every stage, integer context networks, bit-exact
decoding across engines, robustness to float noise, and agreement with CompressAI's own compress."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lic_deploy.entropy.bitstream import unpack
from lic_deploy.runtime.codec import Codec
from lic_deploy.runtime.engines import create_engine
from lic_deploy.runtime.images import load_rgb, pad_to_multiple
from lic_deploy.runtime.package import Package
from tests.conftest import Perturbed

CONFIG = {"N": 32, "M": 160, "cc1": 32, "cc2": 32}  # groups 16, 16, 32, 64, 32


@pytest.fixture(scope="module")
def ckpt_elic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lic_deploy.bench.synthetic import random_checkpoint

    cfg = dict(CONFIG)
    return random_checkpoint(tmp_path_factory.mktemp("elic") / "elic.pt", "elic", cfg.pop("N"), cfg.pop("M"), **cfg)


@pytest.fixture(scope="module")
def package_elic(ckpt_elic: Path) -> Path:
    from lic_deploy.export.package_writer import ExportOptions, export_package

    opts = ExportOptions(precisions=("fp32", "int8"), calib_count=2, calib_size=128)
    return export_package(ckpt_elic, ckpt_elic.parent / "pkg", options=opts, log=lambda _: None)


@pytest.fixture(scope="module")
def image(image_dir: Path) -> np.ndarray:
    return load_rgb(image_dir / "img0.png")[0]  # 96x128: y grid 8 x 8


def test_adapter_recognises_compressai_layout(ckpt_elic: Path) -> None:
    from lic_deploy.archs.checkpoint import load_model

    loaded = load_model(ckpt_elic)
    assert loaded.arch == "elic" and loaded.config == CONFIG
    assert any(k.startswith("latent_codec.y.channel_context.y4.") for k in loaded.model.state_dict())


def test_every_stage_exported_and_verified(package_elic: Path) -> None:
    stages = Package.open(package_elic).manifest["stages"]
    context = {f"sp{k}" for k in range(5)} | {f"agg{k}" for k in range(5)} | {f"cc{k}" for k in range(1, 5)}
    assert set(stages) == {"g_a", "h_a", "h_s", "g_s"} | context
    for name, entry in stages.items():  # FP32 ONNX Runtime against PyTorch, measured at export
        assert entry["files"]["fp32"]["rel_error"] <= 1e-4, name
    assert "int8" in stages["g_a"]["files"] and set(stages["agg0"]["files"]) == {"fp32"}


def test_cross_backend_bit_exact(package_elic: Path, image: np.ndarray) -> None:
    pkg = Package.open(package_elic)
    codecs = {"ort-fp32": Codec(pkg), "ort-fp32-1t": Codec(pkg, threads=1), "ort-int8": Codec(pkg, "ort", "int8"),
              "torch-fp32": Codec(pkg, "torch", threads=1),
              "torch-fp32-intnet-torch": Codec(pkg, "torch", threads=1, intnet="torch:cpu"),  # the GPU path's nets
              "ort-fp32-intnet-ort": Codec(pkg, threads=1, intnet="ort")}  # context nets as ONNX graphs
    streams = {name: c.encode_array(image) for name, c in codecs.items()}
    assert len({data for data, _ in streams.values()}) > 1
    assert streams["torch-fp32"][0] == streams["torch-fp32-intnet-torch"][0]  # context nets on torch: same bytes
    assert streams["ort-fp32-1t"][0] == streams["ort-fp32-intnet-ort"][0]  # and as ONNX graphs
    for enc_name, (data, y_enc) in streams.items():
        _, parts = unpack(data)
        assert len(parts) == 12  # z, 5 groups x (anchors, non-anchors), escapes
        for dec_name, dec in codecs.items():
            assert np.array_equal(dec.decode(data).y_hat, y_enc), (enc_name, dec_name)


def test_perturbed_transforms_change_nothing_in_decodability(package_elic: Path, image: np.ndarray) -> None:
    pkg = Package.open(package_elic)
    clean = Codec(pkg)
    for seed in range(2):
        noisy = Codec(pkg, engine=Perturbed(create_engine(pkg, "ort", "fp32"), 1e-3, seed))
        data, y_enc = noisy.encode_array(image)
        assert np.array_equal(clean.decode(data).y_hat, y_enc)
        data, y_enc = clean.encode_array(image)
        assert np.array_equal(noisy.decode(data).y_hat, y_enc)


def test_rate_and_latents_agree_with_compressai(package_elic: Path, ckpt_elic: Path, image: np.ndarray) -> None:
    """The integer context path codes within 1% of CompressAI's compress of the same model, and its latents
    differ from CompressAI's only where a float mean sits near a rounding boundary."""
    from lic_deploy.archs.checkpoint import load_model

    data, y_hat = Codec(package_elic, "torch", threads=1).encode_array(image)
    payload = sum(len(p) for p in unpack(data)[1])
    model = load_model(ckpt_elic).model
    model.update(force=True)
    with torch.no_grad():
        out = model.compress(torch.from_numpy(pad_to_multiple(image, 64)[0][None]))
    theirs = sum(len(s[0]) for s in out["strings"])
    assert abs(payload / theirs - 1) < 0.01, (payload, theirs)
    diff = np.abs(out["y_hat"][0].numpy() - y_hat)
    assert diff.max() <= 1.0 + 1e-4 and (diff > 0.5).mean() < 0.01


def test_reference_pass_is_compressai_compress(ckpt_elic: Path, image: np.ndarray) -> None:
    """lic-deploy's reading of ELIC's order (groups, anchors, non-anchors, masks) reproduces CompressAI's y_hat."""
    from lic_deploy.archs.checkpoint import load_model
    from lic_deploy.archs.elic import reference_pass
    from lic_deploy.archs.registry import get_adapter

    model = load_model(ckpt_elic).model
    spec = get_adapter("elic").spec(model)
    x = torch.from_numpy(pad_to_multiple(image, 64)[0][None])
    hyper = model.latent_codec["hyper"]
    with torch.no_grad():
        out = model.compress(x)
        y = model.g_a(x)
        z = hyper.h_a(y)
        med = torch.from_numpy(spec.tables["z_median"]).float().view(1, -1, 1, 1)
        y_hat, seen = reference_pass(spec.context, y, hyper.h_s(torch.round(z - med) + med))
    assert torch.allclose(y_hat, out["y_hat"], atol=1e-5)
    assert len(seen["agg0"]) == 2 and "cc0" not in seen and len(seen["cc4"]) == 1


def test_elic_goes_through_bench(package_elic: Path, image_dir: Path, tmp_path: Path) -> None:
    from lic_deploy.bench.runner import BenchOptions, run_bench

    opts = BenchOptions(data=image_dir, out=tmp_path, precisions=("fp32", "int8"), images=1, repeat=1,
                        outlier_images=1, calib_count=1, calib_size=64, labels={"pkg": "soap:0.013"})
    results = run_bench([package_elic], opts)
    assert {s["variant"] for s in results["summaries"]} == {"ort:fp32", "ort:int8:minmax"}
    assert all(r["bytes"] > 0 and r["psnr"] > 0 for r in results["rows"])
    (record,) = results["outliers"]
    names = {layer["name"] for layer in record["layers"]}
    assert {"y", "z"} <= names and any(n.startswith("g_a.") for n in names)


def test_entropy_model_refuses_inconsistent_arrays(package_elic: Path) -> None:
    import json

    from lic_deploy.entropy.model import open_entropy_model
    from lic_deploy.errors import PackageError

    with np.load(package_elic / "entropy.npz", allow_pickle=False) as npz:
        arrays = dict(npz)
    meta = json.loads(arrays["meta"].tobytes().decode())

    def with_meta(**changes: object) -> dict[str, np.ndarray]:
        raw = json.dumps({**meta, **changes}).encode()
        return {**arrays, "meta": np.frombuffer(raw, dtype=np.uint8)}

    model = open_entropy_model(arrays)
    assert model.n_streams == 12
    with pytest.raises(TypeError, match="earlier y symbols"):
        model.params(np.zeros((1, 2, 2), dtype=np.int64))
    cases = [(with_meta(kind="dcae"), "not known"), (with_meta(groups=[16, 16, 32, 64, 16]), "inconsistent"),
             (with_meta(groups=[1] * 8), "do not fit"), (with_meta(groups=None), "incomplete")]
    for bad, needle in cases:
        with pytest.raises(PackageError, match=needle):
            open_entropy_model(bad)


def test_int8_entropy_activations_round_trip(ckpt_elic: Path, image: np.ndarray, tmp_path: Path) -> None:
    """`--entropy-bits 8`: every context network runs on int8 activations and the stream still decodes exactly."""
    from lic_deploy.export.package_writer import ExportOptions, export_package

    opts = ExportOptions(precisions=("fp32",), calib_count=1, calib_size=128, entropy_act_bits=8)
    pkg = export_package(ckpt_elic, tmp_path / "pkg8", options=opts, log=lambda _: None)
    codec = Codec(pkg)
    assert max(net.layers[-1].bound for net in codec.entropy.sp) == 127
    data, y_enc = codec.encode_array(image)
    assert np.array_equal(Codec(pkg, "torch", threads=1).decode(data).y_hat, y_enc)
