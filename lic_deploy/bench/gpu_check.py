"""`scripts/gpu_check.sh`: what runs on this NVIDIA machine, whether it is right, and how fast, in one command.

1. environment: TensorRT, cuda-python and torch.cuda (versions, GPU name, compute capability);
2. a package: the one given, or a random-weight mbt2018-mean N=128 M=192 exported with fp32 + int8 + fp16;
3. TensorRT engines for each precision the package has (built, or found fresh in PKG/engines/), timed;
4. every stage of every GPU engine against ONNX Runtime FP32 on the CPU, on real inputs: relative error and SQNR
   (fp32 must stay within 1e-3; fp16 and int8 above an absolute SQNR floor, `SQNR_FLOOR_DB`);
5. images (Kodak from $LIC_DEPLOY_DATA/kodak, else scikit-image's photos) encoded on the GPU and decoded on the CPU
   (ONNX Runtime FP32) and the other way round: decoded latents must equal the encoder's bit for bit;
6. per-stage latency, host to host (copies included), medians after warm-up runs, against PyTorch CUDA FP32
   measured in the same run.

Writes OUT/gpu_check.json after every step; exit code 0 when every check passed. `--dry-run` runs the same logic
on the CPU only (ONNX Runtime stands in for TensorRT, PyTorch CPU for PyTorch CUDA) and says so in its output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from lic_deploy.bench.latency import format_table, median_seconds
from lic_deploy.bench.synthetic import random_checkpoint
from lic_deploy.runtime.engines import Engine, create_engine
from lic_deploy.runtime.package import Package

STAGES = ("g_a", "h_a", "h_s", "g_s")
FP32_TOLERANCE = 1e-3  # relative L2 error of an FP32 engine against ORT FP32 (float reordering gives ~1e-6)
# fp16/int8 stages: the SQNR (dB, against ORT FP32) a correct engine stays above with margin. Measured on an H200:
# torch-cuda FP16 60-65 dB, ORT CPU FP16 66-72 dB (it computes in higher precision inside), so a floor relative to
# ORT's own FP16 (the first criterion, "within 3 dB") failed correct engines. INT8 stages of trained models reach
# 17-45 dB with ORT (entropy calibration lowest); a wrong scale, axis or weight layout gives a few dB at most.
SQNR_FLOOR_DB = {"fp16": 45.0, "int8": 15.0}
DRY_RUN_LABEL = ("DRY RUN on the CPU: ONNX Runtime stands in for TensorRT and PyTorch CPU for PyTorch CUDA; "
                 "nothing here ran on a GPU")


@dataclass
class Variant:
    """An engine under test. `stands_in_for` names what a dry run's CPU engine replaces."""

    label: str  # e.g. "tensorrt:int8", "torch-cuda:fp32"
    make: Callable[[], Engine]
    precision: str
    stands_in_for: str | None = None


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _json_value(obj: Any) -> Any:
    """JSON for what `json` cannot write: numpy scalars as their Python values (a numpy bool stays a boolean,
    never the truthy string "False"), paths and anything else as strings."""
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


def environment() -> dict[str, Any]:
    """Versions and devices as each library sees them; a missing library is reported with its import error."""
    import onnxruntime

    env: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                           "cpu_count": os.cpu_count(), "onnxruntime": onnxruntime.__version__}
    try:
        import torch

        cuda = torch.cuda.is_available()
        env["torch"] = {"version": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": cuda,
                        "devices": [{"name": torch.cuda.get_device_name(i),
                                     "capability": "{}.{}".format(*torch.cuda.get_device_capability(i))}
                                    for i in range(torch.cuda.device_count())] if cuda else []}
    except ImportError as exc:
        env["torch"] = {"version": None, "error": _error(exc)}
    try:
        import tensorrt

        env["tensorrt"] = {"version": tensorrt.__version__}
    except (ImportError, OSError) as exc:
        env["tensorrt"] = {"version": None, "error": _error(exc)}
    env["cuda_python"] = _cuda_python()
    return env


def _cuda_python() -> dict[str, Any]:
    versions = {}
    for dist in ("cuda-python", "cuda-bindings"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
        err, count = cudart.cudaGetDeviceCount()
        devices = []
        for i in range(count if err == cudart.cudaError_t.cudaSuccess else 0):
            _, props = cudart.cudaGetDeviceProperties(i)
            name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
            devices.append({"name": name.rstrip("\x00"), "capability": f"{props.major}.{props.minor}"})
        return {"versions": versions, "device_count_status": getattr(err, "name", str(err)), "devices": devices}
    except (ImportError, OSError, RuntimeError) as exc:
        return {"versions": versions, "error": _error(exc), "devices": []}


def variants(package: Package, dry_run: bool, env: dict[str, Any],
             profile: str | None) -> tuple[list[Variant], list[str]]:
    """The engines this machine can test, TensorRT per precision and PyTorch CUDA (dry run: their CPU stand-ins),
    and why the others are not tested."""
    have = [p for p in ("fp32", "fp16", "int8") if p in package.precisions("g_a")]
    if dry_run:
        out = [Variant(f"ort:{p}", lambda p=p: create_engine(package, "ort", p), p, f"tensorrt:{p}") for p in have]
        return [*out, Variant("torch-cpu:fp32", lambda: create_engine(package, "torch", "fp32"), "fp32",
                              "torch-cuda:fp32")], ["tensorrt and torch-cuda: dry run"]
    out, missing = [], []
    if not env["tensorrt"]["version"] or not env["cuda_python"]["devices"]:
        missing.append(f"tensorrt: {env['tensorrt'].get('error') or env['cuda_python'].get('error') or 'no GPU'}")
    else:
        from lic_deploy.runtime.engines.tensorrt import Profile, TensorRTEngine

        prof = Profile.parse(profile) if profile else None
        out += [Variant(f"tensorrt:{p}", lambda p=p: TensorRTEngine(package, p, profile=prof), p) for p in have]
    if not env["torch"].get("cuda_available"):
        missing.append(f"torch-cuda: {env['torch'].get('error') or 'torch.cuda.is_available() is False'}")
    else:
        import torch

        torch.backends.cudnn.allow_tf32 = False  # FP32 means FP32 here, as in the TensorRT engines
        torch.backends.cuda.matmul.allow_tf32 = False
        out += [Variant(f"torch-cuda:{p}", lambda p=p: create_engine(package, "torch", p, device="cuda"), p)
                for p in ("fp32", "fp16")]
    return out, missing


def images(count: int) -> tuple[list[Path], str]:
    """The first `count` Kodak images under $LIC_DEPLOY_DATA, else scikit-image's colour photographs."""
    from lic_deploy.runtime.images import data_folder, list_images

    kodak = data_folder("kodak")
    if kodak:
        return list_images(kodak)[:count], str(kodak)
    from lic_deploy.export.calibration import SKIMAGE_PHOTOS, skimage_folder

    return [skimage_folder() / name for name in SKIMAGE_PHOTOS[:count]], "scikit-image photos"


def stage_inputs(package: Package, ref: Engine, image: np.ndarray) -> dict[str, np.ndarray]:
    """Real inputs of every stage for one image [3, H, W], by the FP32 reference path."""
    x, _, _ = package.pad(image)
    y = ref.run("g_a", x[None])
    z = ref.run("h_a", y)
    return {"g_a": x[None], "h_a": y, "h_s": np.round(z), "g_s": np.round(y)}


def stage_checks(package: Package, engines: dict[str, Engine], tested: list[Variant], ref: Engine,
                 inputs: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Each engine's stages against ORT FP32; fp16/int8 judged by `SQNR_FLOOR_DB` (ORT's own SQNR at that
    precision is recorded beside it, for information)."""
    from lic_deploy.export.onnx_export import rel_error, sqnr_db

    expected = {s: ref.run(s, inputs[s]) for s in STAGES}
    ort_sqnr: dict[tuple[str, str], float] = {}
    rows = []
    for v in tested:
        if v.label not in engines:
            continue
        if v.precision in package.precisions("g_a") and v.precision != "fp32" and (v.precision, "g_a") not in ort_sqnr:
            same = create_engine(package, "ort", v.precision)
            ort_sqnr.update({(v.precision, s): sqnr_db(expected[s], same.run(s, inputs[s])) for s in STAGES})
        for s in STAGES:
            try:
                out = engines[v.label].run(s, inputs[s])
            except Exception as exc:  # recorded; the engine is dropped from the later steps
                rows.append({"engine": v.label, "stage": s, "ok": False, "error": _error(exc)})
                del engines[v.label]
                break
            row: dict[str, Any] = {"engine": v.label, "stage": s, "shape": list(out.shape)}
            if out.shape != expected[s].shape:
                rows.append({**row, "ok": False, "error": f"shape {out.shape}, expected {expected[s].shape}"})
                continue
            row.update(rel_error=float(rel_error(expected[s], out)), sqnr_db=float(sqnr_db(expected[s], out)))
            if v.precision == "fp32":
                row["ok"] = bool(row["rel_error"] <= FP32_TOLERANCE)
            else:
                row["ort_sqnr_db"] = ort_sqnr.get((v.precision, s))
                row["floor_db"] = SQNR_FLOOR_DB[v.precision]
                row["ok"] = bool(row["sqnr_db"] >= row["floor_db"])
            rows.append(row)
    return rows


def cross_device(package: Package, engines: dict[str, Engine], ref: Engine, files: list[Path],
                 deadline: float) -> list[dict[str, Any]]:
    """Encode on each GPU engine, decode on the CPU reference, and the other way round; compare latents."""
    from lic_deploy.runtime.codec import Codec
    from lic_deploy.runtime.images import load_rgb, psnr, to_uint8

    cpu = Codec(package, engine=ref)
    rows: list[dict[str, Any]] = []
    for path in files:
        if time.perf_counter() > deadline:
            rows.append({"image": path.name, "skipped": "time budget spent"})
            continue
        image, _ = load_rgb(path, warn=False)
        original = to_uint8(image)
        cpu_data, cpu_y = cpu.encode_array(image)
        for label, engine in engines.items():
            gpu = Codec(package, engine=engine)
            try:
                gpu_data, gpu_y = gpu.encode_array(image)
                on_cpu, on_gpu = cpu.decode(gpu_data), gpu.decode(cpu_data)
            except Exception as exc:  # recorded as a failure; the other engines and images go on
                rows.append({"image": path.name, "encoder": label, "decoder": "ort:fp32", "error": _error(exc)})
                continue
            for enc, dec, data, y, decoded in ((label, "ort:fp32", gpu_data, gpu_y, on_cpu),
                                               ("ort:fp32", label, cpu_data, cpu_y, on_gpu)):
                rows.append({"image": path.name, "encoder": enc, "decoder": dec, "bytes": len(data),
                             "bpp": 8.0 * len(data) / original[..., 0].size, "psnr_db": psnr(decoded.image, original),
                             "nonzero_latents": float(np.count_nonzero(y)) / y.size,
                             "latents_identical": bool(np.array_equal(decoded.y_hat, y))})
    return rows


def latencies(engines: dict[str, Engine], inputs: dict[str, np.ndarray], repeat: int,
              warmup: int) -> dict[str, dict[str, float]]:
    """Median milliseconds per engine and stage, host to host, after `warmup` untimed runs."""
    return {label: {s: 1000 * median_seconds(lambda s=s, e=e: e.run(s, inputs[s]), repeat=repeat, warmup=warmup)
                    for s in STAGES} for label, e in engines.items()}


def latency_table(ms: dict[str, dict[str, float]], baseline: str) -> str:
    base = ms.get(baseline)
    rows = []
    for label, st in ms.items():
        total = st["g_a"] + st["g_s"]
        ratio = total / (base["g_a"] + base["g_s"]) if base else "n/a"
        rows.append([label, *(st[s] for s in STAGES), total, ratio])
    return format_table(["engine", *(f"{s} ms" for s in STAGES), "g_a+g_s ms", f"vs {baseline}"], rows)


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    """All six steps; the report is rewritten to OUT/gpu_check.json after each one."""
    t0 = time.perf_counter()
    deadline = t0 + args.budget
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"dry_run": args.dry_run, "label": DRY_RUN_LABEL if args.dry_run else "GPU run"}

    def save(step: str) -> None:
        report["seconds"] = round(time.perf_counter() - t0, 2)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=_json_value))
        print(f"[{report['seconds']:7.1f} s] {step}", flush=True)

    report["environment"] = env = environment()
    save("environment")
    if args.package:
        pkg_dir, exported = Path(args.package), False
    else:
        from lic_deploy.export.package_writer import ExportOptions, export_package

        ckpt = random_checkpoint(out / "random-mbt2018-mean-128-192.pt")
        pkg_dir = export_package(ckpt, out / "package", options=ExportOptions(
            precisions=("fp32", "int8", "fp16"), overwrite=True), log=lambda _: None)
        exported = True
    package = Package.open(pkg_dir)
    report["package"] = {"path": str(pkg_dir), "exported_here": exported, "arch": package.arch,
                         "config": package.manifest["config"], "precisions": package.precisions("g_a"),
                         "fingerprint": package.manifest["fingerprint"]}
    tested, report["not_tested"] = variants(package, args.dry_run, env, args.profile)
    report["engines"] = {v.label: {"precision": v.precision, "stands_in_for": v.stands_in_for} for v in tested}
    baseline = "torch-cpu:fp32" if args.dry_run else "torch-cuda:fp32"
    report["baseline"] = baseline
    save("package")

    engines: dict[str, Engine] = {}
    report["builds"] = builds = []
    for v in tested:
        t = time.perf_counter()
        try:
            engine = v.make()  # TensorRT builds (or loads) its plans here; other engines load on first use
            plans = [str(engine.prepare(s)) for s in STAGES] if hasattr(engine, "prepare") else []
            engines[v.label] = engine
            builds.append({"engine": v.label, "seconds": round(time.perf_counter() - t, 2), "ok": True,
                           "plans": plans})
        except Exception as exc:  # one failing engine must not hide the others' results
            builds.append({"engine": v.label, "seconds": round(time.perf_counter() - t, 2), "ok": False,
                           "error": _error(exc)})
    save("engines")

    ref = create_engine(package, "ort", "fp32")
    from lic_deploy.bench.export_bench import bench_image

    image, name = bench_image()
    inputs = stage_inputs(package, ref, image[0])
    report["stage_checks"] = stage_checks(package, engines, tested, ref, inputs)
    save("stage checks")

    files, source = images(args.images)
    report["cross_device"] = {"images": source, "rows": cross_device(package, engines, ref, files, deadline)}
    save("cross-device encode/decode")

    ms = latencies({**engines, "ort-cpu:fp32": ref}, inputs, args.repeat, args.warmup)
    report["latency"] = {"image": name, "size": list(image.shape[2:]), "repeat": args.repeat, "warmup": args.warmup,
                         "unit": "ms, host to host", "median_ms": ms, "baseline": baseline}
    failures = [f"build {b['engine']}: {b['error']}" for b in builds if not b["ok"]]
    failures += [f"stage {r['engine']}/{r['stage']}: {r.get('error', 'out of tolerance')}"
                 for r in report["stage_checks"] if not r["ok"]]
    failures += [f"latents {r['encoder']} -> {r['decoder']} on {r['image']}: {r.get('error', 'differ')}"
                 for r in report["cross_device"]["rows"] if "error" in r or r.get("latents_identical") is False]
    if not engines:
        failures.append("no engine under test (no TensorRT, no torch.cuda); try --dry-run")
    report["summary"] = {"ok": not failures, "failures": failures}
    save("latency")
    print(f"\n{report['label']}\nlatency ({name}, {image.shape[3]}x{image.shape[2]}, medians of {args.repeat} runs "
          f"after {args.warmup} warm-up, host to host):")
    print(latency_table(ms, baseline))
    print("all checks passed" if not failures else "FAILED:\n  " + "\n  ".join(failures))
    for engine in engines.values():
        getattr(engine, "close", lambda: None)()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", nargs="?", help="codec package (default: export a random mbt2018-mean 128/192)")
    parser.add_argument("--out", default="out/gpu-check", help="folder for gpu_check.json (and the package)")
    parser.add_argument("--dry-run", action="store_true", help="CPU only: ORT for TensorRT, torch CPU for CUDA")
    parser.add_argument("--images", type=int, default=24, help="images to encode and decode (24)")
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per stage (10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per stage first (2)")
    parser.add_argument("--profile", help="TensorRT profile MIN:OPT:MAX (default: the package's, or "
                        "256x256:512x768:2048x2048)")
    parser.add_argument("--budget", type=float, default=360.0,
                        help="seconds after which remaining images are skipped (360)")
    report = run_check(parser.parse_args(argv))
    return 0 if report["summary"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
