"""Mixed precision (`export --int8 --fallback auto`): keep the INT8-sensitive layers in FP32 until the PTQ loss on
the calibration crops is under a target.

The loss is the rate-equivalent PTQ loss of one model at its own training lambda, in percent of the FP32 rate:

    loss = 100 * ((R_int8 + lambda * MSE_int8) - (R_fp32 + lambda * MSE_fp32)) / R_fp32

R in bits per pixel from the real .lic streams of the crops, MSE on 8-bit RGB (0..255), both means over the
first MAX_CROPS calibration crops (in-sample: the crops also set the INT8 scales). Training minimised
R + lambda * 255^2 * MSE_[0,1] = R + lambda * MSE, so at the model's operating point the R-D curve has slope
dR/dMSE = -lambda: lambda * (MSE change) is the rate that change is worth, and the loss is a first-order estimate
of the BD-rate of INT8 against FP32 at this lambda, from one model.

Order: layers by INT8 SQNR on the calibration crops (`sensitivity.layer_sqnr`, min-max scales), lowest first.
Each step keeps the next layer in float (ONNX Runtime's `nodes_to_exclude`), re-quantizes its stage with the same
calibration and measures again; it stops at the target or when every layer is float. Only g_a, h_a and g_s are
candidates: the codec runs h_s as the integer entropy network, never as an ONNX graph.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lic_deploy.errors import LicError

CODEC_STAGES = ("g_a", "h_a", "g_s")
MAX_CROPS = 16  # calibration crops the ranking and the loss use (the first ones: crops come in seeded random order)
METRIC = "rate-equivalent PTQ loss on the calibration crops, % of the FP32 rate"


def training_value(metadata: Mapping[str, Any], key: str) -> Any:
    """`key` from a checkpoint's training metadata (the `training` entry of published models, else top level)."""
    training = metadata.get("training")
    if isinstance(training, Mapping) and key in training:
        return training[key]
    return metadata.get(key)


def fallback_lmbda(lmbda: float | None, metadata: Mapping[str, Any]) -> float:
    """The lambda the loss uses: the one given, else the checkpoint's; LicError when neither exists."""
    value = lmbda if lmbda is not None else training_value(metadata, "lmbda")
    if value is None:
        raise LicError("--fallback auto needs the model's training lambda: the checkpoint has none in its "
                       "metadata; pass --lmbda")
    return float(value)


def calib_rd(package: Any, precision: str, crops: Sequence[np.ndarray]) -> tuple[float, float]:
    """(mean bpp from real .lic bytes, mean MSE on 0..255) of the crops through the codec, ONNX Runtime."""
    from lic_deploy.runtime.codec import Codec
    from lic_deploy.runtime.images import to_uint8

    codec = Codec(package, "ort", precision)
    bpps, mses = [], []
    for crop in crops:
        data, _ = codec.encode_array(crop)
        img = codec.decode(data).image.astype(np.float64)
        bpps.append(8.0 * len(data) / (crop.shape[1] * crop.shape[2]))
        mses.append(float(np.mean((img - to_uint8(crop)) ** 2)))
    return float(np.mean(bpps)), float(np.mean(mses))


def rate_equivalent_loss(fp32: tuple[float, float], test: tuple[float, float], lmbda: float) -> float:
    """100 * (J_test - J_fp32) / R_fp32 with J = bpp + lambda * MSE (0..255 scale); see the module docstring."""
    (r0, d0), (r1, d1) = fp32, test
    return 100.0 * ((r1 + lmbda * d1) - (r0 + lmbda * d0)) / r0


def auto_fallback(root: Path, stages: dict[str, Any], spec: Any, calib_inputs: Sequence[Mapping[str, np.ndarray]],
                  crops: Sequence[np.ndarray], verify: Mapping[str, np.ndarray], *, method: str, target_pct: float,
                  lmbda: float, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Re-quantize the INT8 graphs under `root` with the most sensitive layers in float until the loss is at most
    `target_pct`. Updates `stages` (the manifest's stage entries: INT8 files' sha256 and SQNR) in place and
    returns the manifest's `fallback` record: ranking, loss after each step, the nodes kept in float."""
    from lic_deploy.export.onnx_export import deployable, sqnr_db
    from lic_deploy.export.quantize import INT8_VARIANTS, quantize_int8
    from lic_deploy.export.sensitivity import conv_layers, layer_sqnr, onnx_node
    from lic_deploy.runtime.engines import create_engine
    from lic_deploy.runtime.package import Package, file_sha256

    crops, subset = crops[:MAX_CROPS], list(calib_inputs[:MAX_CROPS])
    modules = {s: deployable(spec.stages[s].module) for s in CODEC_STAGES}
    sqnr = layer_sqnr(modules, subset)
    layers = conv_layers(modules)
    ranking = [{"layer": name, "stage": onnx_node(name, layers[name])[0], "node": onnx_node(name, layers[name])[1],
                "sqnr_db": sqnr[name]} for name in sorted(sqnr, key=sqnr.get)]
    variants = [p for p in INT8_VARIANTS if p in stages[CODEC_STAGES[0]]["files"]]
    package = Package(root, {"arch": spec.arch, "stages": stages, "fingerprint": "0" * 32,
                             "geometry": {"pad_multiple": spec.pad_multiple, "z_stride": spec.z_stride},
                             "entropy": {"file": "entropy.npz", "sha256": file_sha256(root / "entropy.npz")}})
    fp32 = calib_rd(package, "fp32", crops)
    rd = calib_rd(package, "int8", crops)
    loss = rate_equivalent_loss(fp32, rd, lmbda)
    steps = [{"kept": None, "bpp": rd[0], "mse": rd[1], "loss_pct": loss}]
    log(f"  fallback: INT8 loss on {len(crops)} calibration crops {loss:+.3f} % (target {target_pct} %)")
    kept: dict[str, list[str]] = {}
    for entry in ranking:
        if loss <= target_pct:
            break
        stage = entry["stage"]
        kept.setdefault(stage, []).append(entry["node"])
        for variant in variants:
            files = stages[stage]["files"]
            quantize_int8(root / files["fp32"]["file"], root / files[variant]["file"],
                          [c[stage] for c in calib_inputs], method=method, variant=variant, exclude=kept[stage])
            files[variant]["sha256"] = file_sha256(root / files[variant]["file"])
        rd = calib_rd(package, "int8", crops)
        loss = rate_equivalent_loss(fp32, rd, lmbda)
        steps.append({"kept": entry["layer"], "bpp": rd[0], "mse": rd[1], "loss_pct": loss})
        log(f"  fallback: {entry['layer']} ({stage} {entry['node']}, SQNR {entry['sqnr_db']:.1f} dB) in FP32: "
            f"loss {loss:+.3f} %")
    for stage in kept:
        files = stages[stage]["files"]
        ref = create_engine(package, "ort", "fp32").run(stage, verify[stage])
        for variant in variants:
            files[variant]["sqnr_db"] = sqnr_db(ref, create_engine(package, "ort", variant).run(stage, verify[stage]))
    return {"metric": METRIC, "target_pct": target_pct, "lmbda": lmbda, "calib_method": method, "crops": len(crops),
            "fp32": {"bpp": fp32[0], "mse": fp32[1]}, "ranking": ranking, "steps": steps, "loss_pct": loss,
            "met": loss <= target_pct, "kept_float": kept,
            "kept_layers": [s["kept"] for s in steps if s["kept"] is not None]}
