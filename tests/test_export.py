"""Export: package layout, FP32 graphs equal PyTorch, INT8 is explicit symmetric Q/DQ, FP16 is FP16, atomicity."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from lic_deploy.archs.checkpoint import load_model
from lic_deploy.archs.registry import get_adapter
from lic_deploy.errors import DataError, PackageError
from lic_deploy.export.onnx_export import rel_error, torch_run
from lic_deploy.export.package_writer import ExportOptions, export_package, stage_inputs
from lic_deploy.runtime.engines import create_engine
from lic_deploy.runtime.package import Package, fingerprint

STAGES = ("g_a", "h_a", "h_s", "g_s")


def test_manifest(package_mbt: Path, ckpt_mbt: Path) -> None:
    pkg = Package.open(package_mbt)
    m = pkg.manifest
    assert m["arch"] == "mbt2018-mean" and m["config"] == {"N": 128, "M": 192}
    assert m["geometry"]["pad_multiple"] == 64 and m["geometry"]["has_means"] is True
    for stage in STAGES:
        assert set(pkg.precisions(stage)) == {"fp32", "int8", "fp16"}
        assert m["stages"][stage]["files"]["fp32"]["rel_error"] <= 1e-4
        for p in ("int8", "fp16"):
            assert np.isfinite(m["stages"][stage]["files"][p]["sqnr_db"])
    assert m["fingerprint"] == fingerprint(m) and len(pkg.fingerprint) == 16
    from lic_deploy.runtime.package import file_sha256

    assert m["source"]["sha256"] == file_sha256(ckpt_mbt)
    calib = json.loads((package_mbt / "calib.json").read_text())
    assert len(calib["crops"]) == 4 and calib["source"] == "skimage"
    assert calib["activation_ranges"]["g_a"]  # ranges recorded for the INT8 graphs
    assert not any(p.name.startswith(".") for p in package_mbt.parent.iterdir())  # no temporary left


def test_fp32_onnx_matches_pytorch_on_a_real_image(package_mbt: Path, ckpt_mbt: Path) -> None:
    """On an image the export never saw (a calibration-free, non-square one), every stage within 1e-4."""
    from lic_deploy.export.calibration import skimage_folder
    from lic_deploy.runtime.images import load_rgb, pad_to_multiple

    img, _ = load_rgb(skimage_folder() / "coffee.png")  # 400x600
    x, _, _ = pad_to_multiple(img, 64)
    spec = get_adapter("mbt2018-mean").spec(load_model(ckpt_mbt).model)
    inputs = stage_inputs(spec, x[None])
    engine = create_engine(Package.open(package_mbt), "ort", "fp32")
    for stage in STAGES:
        ref = torch_run(spec.stages[stage].module, inputs[stage])
        got = engine.run(stage, inputs[stage])
        assert got.shape == ref.shape
        assert rel_error(ref, got) <= 1e-4, stage


def test_int8_graphs_are_symmetric_per_channel_qdq(package_mbt: Path) -> None:
    for stage in STAGES:
        graph = onnx.load(str(package_mbt / f"{stage}.int8.onnx")).graph
        inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        ops = [n.op_type for n in graph.node]
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
        producers = {o: n for n in graph.node for o in n.output}
        n_convs = 0
        for node in graph.node:
            if node.op_type not in ("Conv", "ConvTranspose") or "/norm/" in node.name:
                continue
            n_convs += 1
            act_dq, w_dq = producers[node.input[0]], producers[node.input[1]]
            assert act_dq.op_type == w_dq.op_type == "DequantizeLinear"
            w_q, w_scale, w_zp = (inits[i] for i in w_dq.input)
            out_axis = 1 if node.op_type == "ConvTranspose" else 0
            axis = next(a.i for a in w_dq.attribute if a.name == "axis")
            assert w_q.dtype == np.int8 and axis == out_axis
            assert w_scale.shape == (w_q.shape[out_axis],)  # one scale per output channel
            assert w_zp.dtype == np.int8 and not w_zp.any()  # symmetric: zero point 0
            assert np.abs(w_q.astype(int)).max() <= 127
            a_scale, a_zp = inits[act_dq.input[1]], inits[act_dq.input[2]]
            assert a_scale.size == 1 and a_zp.dtype == np.int8 and int(a_zp) == 0  # per-tensor, symmetric
        assert n_convs >= 3, stage


def test_fp16_graphs_hold_fp16(package_mbt: Path) -> None:
    graph = onnx.load(str(package_mbt / "g_s.fp16.onnx")).graph
    big = [i for i in graph.initializer if np.prod(i.dims) > 64]
    assert big and all(i.data_type == onnx.TensorProto.FLOAT16 for i in big)


def test_engines_share_one_contract(package_mbt: Path) -> None:
    pkg = Package.open(package_mbt)
    rng = np.random.default_rng(0)
    x = rng.random((1, 3, 128, 192), dtype=np.float32)
    ort_fp32, ort_int8, torch_fp32 = (create_engine(pkg, b, p, threads=1)
                                      for b, p in (("ort", "fp32"), ("ort", "int8"), ("torch", "fp32")))
    y = torch_fp32.run("g_a", x)
    assert y.shape == (1, 192, 8, 12) and y.dtype == np.float32
    for engine in (ort_fp32, ort_int8):
        got = engine.run("g_a", x)
        assert got.shape == y.shape and got.dtype == np.float32
    assert rel_error(y, ort_fp32.run("g_a", x)) < 1e-4
    assert rel_error(y, ort_int8.run("g_a", x)) < 0.2
    assert torch_fp32.run("g_s", np.round(y)).shape == (1, 3, 128, 192)


def test_existing_output_is_refused_and_kept(ckpt_mbt: Path, tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PackageError, match="already exists"):
        export_package(ckpt_mbt, out, log=lambda _: None)
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_export_leaves_nothing(ckpt_mbt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lic_deploy.export.package_writer as writer

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("quantizer crashed")

    monkeypatch.setattr(writer, "quantize_int8", boom)
    with pytest.raises(RuntimeError, match="quantizer crashed"):
        export_package(ckpt_mbt, tmp_path / "pkg", options=ExportOptions(precisions=("fp32", "int8")),
                       log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_a_graph_with_a_baked_in_shape_is_refused(ckpt_mbt: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Every FP32 graph is run at a second size: an export without dynamic height and width fails there with a
    PackageError naming the stage, and leaves nothing behind."""
    import warnings

    import torch

    import lic_deploy.export.package_writer as writer

    def static_export(module: object, example: torch.Tensor, path: Path) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["output"])

    monkeypatch.setattr(writer, "export_onnx", static_export)
    with pytest.raises(PackageError, match="stage g_a: the ONNX graph does not run at input size"):
        export_package(ckpt_mbt, tmp_path / "pkg", options=ExportOptions(calib_count=1), log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_bad_calibration_folder(ckpt_mbt: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        export_package(ckpt_mbt, tmp_path / "pkg", options=ExportOptions(calib=tmp_path / "empty"),
                       log=lambda _: None)
    assert not (tmp_path / "pkg").exists()


def test_corrupt_package_file_is_detected(package_mbt: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(package_mbt, copy)
    data = bytearray((copy / "g_s.fp32.onnx").read_bytes())
    data[-10] ^= 1
    (copy / "g_s.fp32.onnx").write_bytes(bytes(data))
    engine = create_engine(Package.open(copy), "ort", "fp32")
    with pytest.raises(PackageError, match="does not match its sha256"):
        engine.run("g_s", np.zeros((1, 192, 4, 4), np.float32))
    with pytest.raises(PackageError, match="not a codec package"):
        Package.open(tmp_path)


def test_calibration_methods_give_their_own_ranges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On heavy-tailed activations, entropy (KL) and percentile clip below min-max, and entropy is not min-max
    (onnxruntime's 128-bin default would make it so). Calibration runs in passes of at most CALIB_CHUNK inputs
    (bounded memory), and min-max over passes is still the largest value of all."""
    import onnxruntime.quantization.calibrate as ort_calibrate
    import torch

    from lic_deploy.export import quantize
    from lic_deploy.export.onnx_export import INPUT, OUTPUT

    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 1))
    fp32 = tmp_path / "net.fp32.onnx"
    torch.onnx.export(conv, (torch.zeros(1, 3, 64, 64),), str(fp32), input_names=[INPUT], output_names=[OUTPUT],
                      dynamo=False)
    rng = np.random.default_rng(0)
    calib = [rng.standard_t(2, size=(1, 3, 64, 64)).astype(np.float32) for _ in range(2 * quantize.CALIB_CHUNK + 3)]
    calib[-1][0, 0, 0, 0] = 1.5 * max(float(np.abs(x).max()) for x in calib)  # the peak in the last pass
    passes: list[int] = []

    def counting(self: object, original: Any, reader: object) -> None:
        sizes = []
        get_next = reader.get_next  # type: ignore[attr-defined]
        reader.get_next = lambda: (lambda x: (sizes.append(1) if x else None, x)[1])(get_next())  # type: ignore[attr-defined]
        original(self, reader)  # type: ignore[arg-type]
        passes.append(len(sizes))

    for cls in (ort_calibrate.MinMaxCalibrater, ort_calibrate.HistogramCalibrater):
        monkeypatch.setattr(cls, "collect_data", functools.partialmethod(counting, cls.collect_data))
    ranges = {}
    for method in ("minmax", "percentile", "entropy"):
        quantize.quantize_int8(fp32, tmp_path / f"net.{method}.onnx", calib, method=method)
        ranges[method] = quantize.activation_ranges(tmp_path / f"net.{method}.onnx")[INPUT]
    peak = max(float(np.abs(x).max()) for x in calib)
    assert ranges["minmax"] == pytest.approx(peak, rel=1e-3)
    assert ranges["entropy"] < 0.8 * ranges["minmax"] and ranges["percentile"] < ranges["minmax"]
    chunk = quantize.CALIB_CHUNK
    # per method: our passes, then quantize_static's own calibration (overridden) on one input
    assert passes == [chunk, chunk, 3, 1] * 3
