"""`export`: checkpoint -> codec package, written to a temporary directory and renamed into place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lic_deploy import __version__
from lic_deploy.errors import LicError, PackageError
from lic_deploy.export.calibration import calibration_set
from lic_deploy.export.onnx_export import (
    FP32_TOLERANCE,
    deployable,
    export_onnx,
    rel_error,
    sqnr_db,
    torch_run,
)
from lic_deploy.export.quantize import INT8_VARIANTS, activation_ranges, convert_fp16, quantize_int8
from lic_deploy.runtime.memory import measure_footprint
from lic_deploy.runtime.package import MANIFEST, SCHEMA, SCHEMA_VERSION, file_sha256, fingerprint

STAGE_ORDER = ("g_a", "h_a", "h_s", "g_s")  # the stages every architecture has, exported in every precision


@dataclass
class ExportOptions:
    """What to export. `precisions` always includes fp32; `calib` is a folder, a manifest, or None (skimage)."""

    precisions: Sequence[str] = ("fp32",)
    calib: str | os.PathLike | None = None
    calib_count: int = 16
    calib_method: str = "minmax"
    calib_seed: int = 0
    calib_size: int = 256
    entropy_act_bits: int = 16
    overwrite: bool = False
    fallback: str = "none"  # "auto": keep INT8-sensitive layers in FP32 (lic_deploy.export.fallback)
    fallback_target: float = 1.0  # percent, rate-equivalent PTQ loss on the calibration crops
    lmbda: float | None = None  # the model's training lambda for the fallback loss (default: its metadata)
    footprint: bool = False  # measure the decode memory per pixel (runtime/memory.py; `lic-deploy export` does)


def _verification_images(spec: Any) -> list[np.ndarray]:
    """scikit-image's astronaut (512x512 RGB photo) as float32 [1, 3, 512, 512], and a 300x400 crop of it padded
    as the codec pads it: every FP32 graph is checked at two sizes (a graph that baked in a shape fails one)."""
    from lic_deploy.export.calibration import skimage_folder
    from lic_deploy.runtime.images import load_rgb, pad_to_multiple

    img, _ = load_rgb(skimage_folder() / "astronaut.png", warn=False)
    crop = pad_to_multiple(img[:, 100:400, 50:450], spec.pad_multiple, spec.min_size)[0]
    return [img[None], crop[None]]


def stage_inputs(spec: Any, image: np.ndarray) -> dict[str, np.ndarray]:
    """The float input of every stage for one padded image [1, 3, H, W], by the torch reference path.
    (ELIC's context stages: their first input; `agg{k}` that of the non-anchor pass.)"""
    import torch

    model_pieces = {k: deployable(s.module) for k, s in spec.stages.items()}
    y = torch_run(model_pieces["g_a"], image)
    z = torch_run(model_pieces["h_a"], y)
    med = spec.tables["z_median"].astype(np.float32).reshape(1, -1, 1, 1)
    z_hat = (np.round(z - med) + med).astype(np.float32)
    if spec.arch == "tcm":  # no single h_s stage; the entropy programs calibrate on z_hat and the y_hat slices
        with torch.no_grad():
            y_hat, before, after = spec.context.reference_slices(torch.from_numpy(y), torch.from_numpy(z_hat))
        return {"g_a": image, "h_a": y, "h_s": z_hat, "g_s": y_hat.numpy(),
                **{f"tcm_before{i}": v.numpy() for i, v in enumerate(before)},
                **{f"tcm_after{i}": v.numpy() for i, v in enumerate(after)}}
    params = torch_run(model_pieces["h_s"], z_hat)
    inputs = {"g_a": image, "h_a": y, "h_s": z_hat}
    if spec.context is not None:
        from lic_deploy.archs.elic import reference_pass

        y_hat, seen = reference_pass(spec.context, torch.from_numpy(y), torch.from_numpy(params))
        return inputs | {k: v[-1].numpy() for k, v in seen.items()} | {"g_s": y_hat.numpy()}
    means = params[:, spec.y_channels:] if spec.has_means else 0.0
    return inputs | {"g_s": (np.round(y - means) + means).astype(np.float32)}


def export_package(checkpoint: str | os.PathLike, out: str | os.PathLike, *, arch: str | None = None,
                   options: ExportOptions | None = None,
                   log: Callable[[str], None] = print) -> Path:
    """Export `checkpoint` to the package directory `out` and return its path.

    Raises PackageError if `out` exists (unless overwrite, and then only a package or an empty folder is
    replaced) and LicError subclasses for bad input; on any failure nothing is left at, or lost from, `out`.
    Missing parent folders are created.
    """
    from lic_deploy.archs.checkpoint import load_model
    from lic_deploy.archs.registry import get_adapter
    from lic_deploy.export.entropy_build import build_entropy

    opts = options or ExportOptions()
    out = Path(out)
    precisions = ["fp32", *[p for p in opts.precisions if p != "fp32"]]
    unknown = [p for p in precisions if p not in ("fp32", "fp16", *INT8_VARIANTS)]
    if unknown:
        raise LicError(f"unknown precision {unknown[0]!r}")
    dest = Path(os.path.realpath(out))  # (not Path.resolve: it raises on a symlink loop)
    _check_output(out, dest, opts.overwrite)
    t0 = time.perf_counter()
    loaded = load_model(checkpoint, arch)
    spec = get_adapter(loaded.arch).spec(loaded.model)
    log(f"loaded {loaded.arch} {loaded.config} from {checkpoint}")
    lmbda = None
    if opts.fallback == "auto":
        from lic_deploy.export.fallback import fallback_lmbda

        if "int8" not in precisions:
            raise LicError("--fallback auto applies to INT8 graphs: add --int8")
        lmbda = fallback_lmbda(opts.lmbda, loaded.metadata)
    crops, calib_manifest = calibration_set(opts.calib, opts.calib_count, seed=opts.calib_seed,
                                            size=opts.calib_size, multiple=spec.pad_multiple,
                                            min_size=spec.min_size)
    calib_inputs = [stage_inputs(spec, c[None]) for c in crops]
    verify, verify2 = (stage_inputs(spec, v) for v in _verification_images(spec))

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    except OSError as exc:
        raise PackageError(f"cannot write the package {out} ({exc.strerror or exc})") from None
    try:
        stages: dict[str, Any] = {}
        for name, stage in spec.stages.items():
            module = deployable(stage.module)
            fp32 = tmp / f"{name}.fp32.onnx"
            export_onnx(module, spec.example_input(name), fp32)
            x = verify[name]
            ref = torch_run(module, x)
            x2 = verify2[name]
            err = max(rel_error(ref, _ort_checked(fp32, x, name)),
                      rel_error(torch_run(module, x2), _ort_checked(fp32, x2, name)))
            log(f"  {name}: fp32 ONNX Runtime vs PyTorch relative error {err:.2e} (largest of two sizes)")
            if not err <= FP32_TOLERANCE:
                raise PackageError(f"stage {name}: ONNX Runtime differs from PyTorch by {err:.2e} "
                                   f"(tolerance {FP32_TOLERANCE:.0e}); the export is wrong")
            files: dict[str, Any] = {"fp32": {"file": fp32.name, "rel_error": err}}
            for precision in precisions[1:] if name in STAGE_ORDER else ():  # ELIC's context nets: FP32 only
                path = tmp / f"{name}.{precision}.onnx"
                if precision == "fp16":
                    convert_fp16(fp32, path)
                else:  # an INT8 variant (precisions are checked on entry)
                    quantize_int8(fp32, path, [c[name] for c in calib_inputs],
                                  method=opts.calib_method, variant=precision)
                sq = sqnr_db(ref, _ort_run(path, x))
                files[precision] = {"file": path.name, "sqnr_db": sq}
                log(f"  {name}: {precision} SQNR {sq:.1f} dB")
            for entry in files.values():
                entry["sha256"] = file_sha256(tmp / entry["file"])
            stages[name] = {"in_channels": stage.in_channels, "out_channels": stage.out_channels,
                            "stride": stage.stride, "files": files}

        try:
            arrays, entropy_info = build_entropy(spec, calib_inputs, act_bits=opts.entropy_act_bits)
        except ValueError as exc:  # a bound the integer builder cannot meet for these weights
            raise PackageError(f"{checkpoint}: the integer entropy model cannot represent it ({exc})") from None
        np.savez(tmp / "entropy.npz", **arrays)
        fallback = None
        if lmbda is not None:
            from lic_deploy.export.fallback import auto_fallback

            fallback = auto_fallback(tmp, stages, spec, calib_inputs, crops, verify, method=opts.calib_method,
                                     target_pct=opts.fallback_target, lmbda=lmbda, log=log)
        ranges = {name: activation_ranges(tmp / files["file"])
                  for name, st in stages.items() for p, files in st["files"].items() if p == "int8"}
        calib_doc = {**calib_manifest, "method": opts.calib_method, "activation_ranges": ranges}
        (tmp / "calib.json").write_text(json.dumps(calib_doc, indent=1))
        _save_weights(loaded, tmp / "model.safetensors")

        manifest: dict[str, Any] = {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "lic_deploy_version": __version__,
            "arch": loaded.arch, "config": loaded.config,
            "source": {"checkpoint": Path(checkpoint).name, "sha256": loaded.sha256,
                       "metadata": _jsonable(loaded.metadata)},
            "geometry": {"pad_multiple": spec.pad_multiple, "min_size": spec.min_size, "y_channels": spec.y_channels,
                         "y_stride": spec.y_stride, "z_channels": spec.z_channels, "z_stride": spec.z_stride,
                         "has_means": spec.has_means},
            "stages": stages,
            "entropy": {"file": "entropy.npz", "sha256": file_sha256(tmp / "entropy.npz"), **entropy_info},
            "calibration": {"file": "calib.json", "method": opts.calib_method, "count": len(crops),
                            "source": calib_manifest["source"], "seed": calib_manifest.get("seed")},
            "torch_weights": {"file": "model.safetensors", "sha256": file_sha256(tmp / "model.safetensors")},
            **({"fallback": fallback} if fallback else {}),
        }
        manifest["fingerprint"] = fingerprint(manifest)
        if opts.footprint:
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            log("measuring the decode memory footprint (a 1024x1024 probe decode)")
            manifest["footprint"] = measure_footprint(tmp)
        manifest["export_seconds"] = round(time.perf_counter() - t0, 2)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for path in [tmp, *tmp.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        _check_output(out, dest, opts.overwrite)  # again: the folder may have changed meanwhile
        if dest.exists():  # --force: move the old package aside, put the new one in place, then delete the old
            old = tmp.with_name(f"{tmp.name}.old")
            os.replace(dest, old)
            try:
                os.replace(tmp, dest)
            except BaseException:
                os.replace(old, dest)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out} (fingerprint {manifest['fingerprint'][:8]}, {manifest['export_seconds']} s)")
    return out


def _check_output(out: Path, dest: Path, overwrite: bool) -> None:
    """PackageError unless the package can be written at `out` (`dest`: resolved): the nearest existing folder
    above it is a folder, and `out` is absent or, with overwrite, a codec package or an empty folder that does
    not hold the current directory."""
    try:
        parent = next((p for p in dest.parents if p.exists() or p.is_symlink()), dest)
        problem = _output_problem(out, dest, overwrite) if parent.is_dir() else f"{parent} is not a folder"
    except OSError as exc:  # a folder on the way that cannot be read
        problem = exc.strerror or str(exc)
    if problem:
        raise PackageError(f"cannot write the package {out}: {problem}")


def _output_problem(out: Path, dest: Path, overwrite: bool) -> str | None:
    """Why `out` cannot be (re)placed, or None."""
    if not (out.exists() or out.is_symlink()):
        return None
    if not overwrite:
        return "it already exists; choose another -o or pass --force"
    if out.is_symlink() or not out.is_dir():
        return "it is not a folder; --force only replaces a codec package, nothing was deleted"
    cwd = Path.cwd().resolve()
    if cwd == dest or cwd.is_relative_to(dest):
        return "it holds the current directory; --force never replaces it, nothing was deleted"
    if not any(dest.iterdir()):
        return None
    owned = _package_files(dest)
    if owned is None:
        return (f"it is not a codec package (no lic-deploy {MANIFEST}); --force only replaces a package or an "
                "empty folder, nothing was deleted")
    foreign = next((p for p in sorted(dest.iterdir())
                    if p.name not in owned or (p.is_dir() and not p.is_symlink())), None)
    if foreign is not None:
        name = foreign.name + ("/" if foreign.is_dir() else "")
        return (f"it holds {name!r}, which is not part of the codec "
                "package; --force only replaces a folder holding nothing but a package, nothing was deleted")
    return None


def _package_files(folder: Path) -> set[str] | None:
    """The names of the files a lic-deploy package in `folder` consists of (its manifest and every file it names:
    graphs, entropy model, calibration record, torch weights), or None when `folder` holds no package manifest."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        return None

    def named(entry: Any) -> list[str]:
        file = entry.get("file") if isinstance(entry, dict) else None
        return [file] if isinstance(file, str) else []

    owned = {MANIFEST}
    stages = manifest.get("stages")
    for stage in stages.values() if isinstance(stages, dict) else ():
        files = stage.get("files") if isinstance(stage, dict) else None
        for entry in files.values() if isinstance(files, dict) else ():
            owned.update(named(entry))
    for key in ("entropy", "calibration", "torch_weights"):
        owned.update(named(manifest.get(key)))
    return owned


def _ort_checked(path: Path, x: np.ndarray, stage: str) -> np.ndarray:
    """`_ort_run`, with PackageError when the graph does not run at x's size."""
    try:
        return _ort_run(path, x)
    except Exception as exc:  # ORT raises its own types for shape errors
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise PackageError(f"stage {stage}: the ONNX graph does not run at input size {x.shape[2:]} ({first}); "
                           "the export baked in a shape") from None


def _ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.astype(np.float32)})[0]


def _save_weights(loaded: Any, path: Path) -> None:
    """The torch weights (for the PyTorch reference engine), with arch and config in the metadata."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in loaded.model.state_dict().items()
             if not k.endswith(("_quantized_cdf", "_offset", "_cdf_length"))}
    save_file(state, str(path), metadata={"arch": json.dumps(loaded.arch), "config": json.dumps(loaded.config)})


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
