"""`lic-deploy bench`: the quantization-robustness harness, as a library.

For every model (a checkpoint, exported here once per calibration method, or a finished package used as it is)
and every variant (backend x precision x calibration method, optionally INT8 with FP32 fallback), each image is
really encoded and decoded: rate is the byte length of the .lic stream, quality is PSNR and MS-SSIM of the
decoded 8-bit image against the 8-bit source. Latency is the median over `repeat` timed encode+decode runs of
the first image, after `warmup` untimed ones, per step of the codec (g_a, h_a, entropy encode, entropy decode
(which includes the integer h_s), g_s). Outlier statistics come from the PyTorch model (`outliers.collect`).
Everything lands in one JSON document (`SCHEMA`, `SCHEMA_VERSION`); `compare` and `report` read only that.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lic_deploy.atomic import atomic_path
from lic_deploy.bench.textfile import read_text
from lic_deploy.errors import LicError

SCHEMA = "lic-deploy/bench"
SCHEMA_VERSION = 1
STEPS = ("g_a", "h_a", "entropy_encode", "entropy_decode", "g_s")
TRANSFORM_STEPS = ("g_a", "h_a", "g_s")  # the float transforms an engine runs
FLOAT_ONLY_BACKENDS = ("torch",)  # backends without INT8 graphs: only float variants are tried
GPU_BACKENDS = ("torch", "tensorrt")  # the backends that run on --device cuda (ONNX Runtime stays on the CPU)
EQUAL_QUALITY_TAG = "-eq-"  # a model name containing this is an "equal FP32 quality" model


@dataclass
class BenchOptions:
    """What to measure. `labels` maps a model's name or path to "OPTIMIZER:LAMBDA[:FAMILY]" (overrides
    metadata)."""

    data: Path
    out: Path
    precisions: Sequence[str] = ("fp32", "fp16", "int8")
    calib_methods: Sequence[str] = ("minmax",)
    backends: Sequence[str] = ("ort",)
    images: int = 0  # the first N images of `data`; 0 = all
    repeat: int = 5  # timed encode+decode runs per variant for the latency medians
    warmup: int = 1  # untimed runs before anything is timed
    threads: int | None = 2
    calib: str | None = None  # folder or manifest .json; None = export's default (scikit-image photos)
    calib_count: int = 16
    calib_size: int = 256
    labels: Mapping[str, str] = field(default_factory=dict)
    outlier_images: int = 2  # images for the outlier statistics; 0 = skip them
    fallback_target: float | None = None  # percent: also bench INT8 with automatic FP32 fallback (first method)
    resume: bool = False  # keep the models already measured in OUT/results.partial.json by the same command
    device: str = "cpu"  # "cuda[:N]": torch and tensorrt run there (see `plan_variants`)


@dataclass
class Model:
    name: str
    path: Path
    kind: str  # "checkpoint" or "package"
    optimizer: str
    lmbda: float
    steps: int | None
    equal_quality: bool
    sha256: str
    family: str = ""  # the run family (see `run_family`); "" = the optimizer's name

    @property
    def curve(self) -> str:
        """The R-D curve this model belongs to: its run family, with "-eq" for equal-quality models."""
        family = self.family or self.optimizer
        return f"{family}-eq" if self.equal_quality else family


@dataclass(frozen=True)
class Variant:
    backend: str
    precision: str  # a package precision (fp32, fp16, int8, int8-u8s8), or bf16 for the torch engine on CUDA
    calib: str | None = None  # calibration method of INT8 graphs
    fallback: bool = False  # INT8 with automatic FP32 fallback
    device: str = "cpu"  # "cpu" or "cuda[:N]"

    @property
    def engine(self) -> str:
        """The engine as rows name it: "ort", "torch" (CPU), "torch-cuda", "tensorrt" (always a GPU)."""
        return f"{self.backend}-cuda" if self.backend == "torch" and self.device != "cpu" else self.backend

    @property
    def key(self) -> str:
        """"ort:fp32", "ort:int8:minmax", "ort:int8-fb:minmax", "torch-cuda:bf16", "tensorrt:int8:minmax", ..."""
        name = f"{self.precision}-fb" if self.fallback else self.precision
        return f"{self.engine}:{name}" + (f":{self.calib}" if self.calib else "")


def parse_label(text: str) -> tuple[str, float, str | None]:
    """"adam:0.013" -> ("adam", 0.013, None); "adam:0.013:adam-lr5e-4" -> (..., "adam-lr5e-4"); LicError
    otherwise."""
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3) or not parts[0] or (len(parts) == 3 and not parts[2]):
            raise ValueError
        lmbda = float(parts[1])
        if not (math.isfinite(lmbda) and lmbda > 0):
            raise ValueError
        return parts[0].lower(), lmbda, parts[2] if len(parts) == 3 else None
    except ValueError:
        raise LicError(f"label {text!r} is not OPTIMIZER:LAMBDA[:FAMILY] with a positive LAMBDA (for example "
                       "adam:0.013 or adam:0.013:adam-lr5e-4)") from None


def run_family(optimizer: str, metadata: Mapping[str, Any]) -> str:
    """The family of runs a model belongs to, so that two runs of one optimizer at one lambda with different
    hyperparameters make two curves: the metadata's `family` if set, else the optimizer, suffixed with
    "-lr<lr>" when the training learning rate differs from lic-deploy's default for that optimizer."""
    from lic_deploy.export.fallback import training_value
    from lic_deploy.train.optim import DEFAULTS

    family = training_value(metadata, "family")
    if family:
        return str(family)
    hp = training_value(metadata, "hyperparameters")
    lr = hp.get("lr") if isinstance(hp, Mapping) else None
    default = DEFAULTS.get(optimizer, {}).get("lr")
    if lr is None or default is None or math.isclose(float(lr), default, rel_tol=1e-6):
        return optimizer
    return f"{optimizer}-lr{float(lr):g}"


def resolve_model(path: str | os.PathLike, labels: Mapping[str, str]) -> Model:
    """A checkpoint file or package folder with its optimizer, lambda and steps (metadata, or `labels`)."""
    from lic_deploy.export.fallback import training_value

    p = Path(path)
    if p.is_dir():
        from lic_deploy.runtime.package import Package

        source = Package.open(p).manifest["source"]
        meta, sha, name, kind = source.get("metadata") or {}, source["sha256"], p.name, "package"
    else:
        from lic_deploy.archs.checkpoint import read_checkpoint
        from lic_deploy.runtime.package import file_sha256

        _, meta = read_checkpoint(p)
        sha, name, kind = file_sha256(p), p.stem, "checkpoint"
    label = labels.get(name) or labels.get(str(path))
    family = None
    if label:
        optimizer, lmbda, family = parse_label(label)
    else:
        optimizer, lmbda = training_value(meta, "optimizer"), training_value(meta, "lmbda")
        if optimizer is None or lmbda is None:
            raise LicError(f"{path}: no optimizer/lambda in its metadata; pass --label {name}=OPTIMIZER:LAMBDA")
    optimizer = str(optimizer).lower()
    steps = training_value(meta, "steps")
    eq = bool(training_value(meta, "equal_quality")) or EQUAL_QUALITY_TAG in name
    return Model(name, p, kind, optimizer, float(lmbda), None if steps is None else int(steps), eq, sha,
                 family or run_family(optimizer, meta))


def engine_device(backend: str, device: str) -> str:
    """Where a backend runs in this bench: ONNX Runtime on the CPU; torch and TensorRT on `device` when it is a
    GPU (TensorRT needs one: on a CPU-only bench it runs on cuda and is skipped with the reason if absent)."""
    if backend not in GPU_BACKENDS:
        return "cpu"
    return device if device != "cpu" or backend == "torch" else "cuda"


def plan_variants(model: Model, opts: BenchOptions) -> dict[Variant, str | None]:
    """Variant -> package folder name under OUT/packages for a checkpoint (None: the model itself, a package).
    bf16 is a torch-on-CUDA precision only (no graph of its own); it is not planned for other engines."""
    precisions = ["fp32", *[p for p in opts.precisions if p != "fp32"]]
    out: dict[Variant, str | None] = {}

    def variant(backend: str, p: str, calib: str | None = None, fallback: bool = False) -> Variant | None:
        device = engine_device(backend, opts.device)
        if p == "bf16" and not (backend == "torch" and device != "cpu"):
            return None
        return Variant(backend, p, calib, fallback, device)

    if model.kind == "package":
        from lic_deploy.runtime.package import Package

        manifest = Package.open(model.path).manifest
        have = manifest["stages"]["g_a"]["files"]
        method, fb = manifest["calibration"]["method"], "fallback" in manifest
        for backend in opts.backends:
            for p in precisions:
                q = p.startswith("int8")
                v = variant(backend, p, method if q else None, fb and q)
                if v and (p in have or p == "bf16") and not (q and backend in FLOAT_ONLY_BACKENDS):
                    out[v] = None
        return out
    quantized = [p for p in precisions if p.startswith("int8")]
    first = f"{model.name}.{opts.calib_methods[0]}" if quantized else model.name
    for backend in opts.backends:
        for p in precisions:
            if p not in quantized:
                v = variant(backend, p)
                if v:
                    out[v] = first
            elif backend not in FLOAT_ONLY_BACKENDS:
                for m in opts.calib_methods:
                    out[variant(backend, p, m)] = f"{model.name}.{m}"
                    if opts.fallback_target is not None and m == opts.calib_methods[0]:
                        out[variant(backend, p, m, True)] = f"{model.name}.{m}.fb"
    return out


def export_for(model: Model, variants: Mapping[Variant, str | None], opts: BenchOptions,
               log: Callable[[str], None]) -> dict[str, Path]:
    """Export the packages the variants need (each once); folder name -> package path."""
    from lic_deploy.export.package_writer import ExportOptions, export_package

    folders: dict[str, Path] = {}
    for variant, folder in variants.items():
        if folder is None or folder in folders:
            continue
        precisions = sorted({v.precision for v, f in variants.items() if f == folder and v.precision != "bf16"}
                            | {"fp32"})
        options = ExportOptions(precisions=precisions, calib=opts.calib, calib_count=opts.calib_count,
                                calib_size=opts.calib_size,
                                calib_method=variant.calib or opts.calib_methods[0], overwrite=True,
                                fallback="auto" if variant.fallback else "none",
                                fallback_target=opts.fallback_target or 0.0, lmbda=model.lmbda)
        t0 = time.perf_counter()
        folders[folder] = export_package(model.path, opts.out / "packages" / folder, options=options,
                                         log=lambda _: None)
        log(f"exported {folder} ({', '.join(precisions)}) in {time.perf_counter() - t0:.1f} s")
    return folders


def _encode_decode(codec: Any, image: np.ndarray) -> tuple[bytes, Any, dict[str, float], float, float]:
    """One real round trip: (stream, decoded, step seconds, encode seconds, decode seconds)."""
    t0 = time.perf_counter()
    data, y_hat = codec.encode_array(image)
    t1 = time.perf_counter()
    enc = dict(codec.timings)
    decoded = codec.decode(data)
    t2 = time.perf_counter()
    dec = dict(codec.timings)
    if not np.array_equal(decoded.y_hat, y_hat):
        raise RuntimeError("decoded latents differ from the encoder's: the codec is broken")
    steps = {"g_a": enc["g_a"], "h_a": enc["h_a"], "entropy_encode": enc["entropy"],
             "entropy_decode": dec["entropy"], "g_s": dec["g_s"]}
    return data, decoded, steps, t1 - t0, t2 - t1


def run_variant(codec: Any, images: Sequence[tuple[str, np.ndarray, np.ndarray]], opts: BenchOptions,
                tick: Callable[[], None]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-image rows and the latency record of one codec (already warmed up) over the images."""
    from lic_deploy.bench.metrics import bpp, ms_ssim, psnr

    rows = []
    for name, image, ref in images:
        data, decoded, steps, enc_s, dec_s = _encode_decode(codec, image)
        h, w = image.shape[1:]
        rows.append({"image": name, "height": h, "width": w, "bytes": len(data), "bpp": bpp(len(data), h, w),
                     "psnr": psnr(ref, decoded.image), "ms_ssim": ms_ssim(ref, decoded.image),
                     "encode_s": enc_s, "decode_s": dec_s, "steps": steps})
        tick()
    runs = [_encode_decode(codec, images[0][1]) for _ in range(max(1, opts.repeat))]
    latency = {"image": images[0][0], "height": images[0][1].shape[1], "width": images[0][1].shape[2],
               "repeat": len(runs), "warmup": opts.warmup,
               "median_s": {s: statistics.median(r[2][s] for r in runs) for s in STEPS},
               "encode_s": statistics.median(r[3] for r in runs), "decode_s": statistics.median(r[4] for r in runs)}
    return rows, latency


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means over images of bpp, PSNR and MS-SSIM (images too small for MS-SSIM left out of its mean)."""
    ssim = [r["ms_ssim"] for r in rows if not math.isnan(r["ms_ssim"])]
    return {"images": len(rows), "bpp": float(np.mean([r["bpp"] for r in rows])),
            "psnr": float(np.mean([r["psnr"] for r in rows])),
            "ms_ssim": float(np.mean(ssim)) if ssim else float("nan"), "ms_ssim_images": len(ssim)}


def environment(threads: int | None) -> dict[str, Any]:
    """Machine, threads and library versions, for the results' metadata."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    versions = {}
    for pkg in ("lic-deploy", "torch", "onnxruntime", "onnx", "compressai", "numpy", "bjontegaard",
                "pytorch-msssim", "constriction", "tensorrt"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"platform": platform.platform(), "cpu": cpu, "cpus_available": affinity, "python": sys.version.split()[0],
            "threads": threads, "versions": versions}


def command_line(models: Sequence[str | os.PathLike], opts: BenchOptions) -> str:
    """The `lic-deploy bench` command that repeats this measurement, every option spelled out."""
    import shlex

    parts = ["lic-deploy", "bench", *map(str, models), "--data", str(opts.data), "-o", str(opts.out),
             "--precisions", ",".join(opts.precisions), "--calib-methods", ",".join(opts.calib_methods),
             "--backends", ",".join(opts.backends), "--images", str(opts.images), "--repeat", str(opts.repeat),
             "--warmup", str(opts.warmup), "--calib-count", str(opts.calib_count),
             "--calib-size", str(opts.calib_size),
             "--outlier-images", str(opts.outlier_images)]
    parts += ["--threads", str(opts.threads)] if opts.threads else []
    parts += ["--calib", str(opts.calib)] if opts.calib else []
    parts += ["--device", opts.device] if opts.device != "cpu" else []
    parts += ["--fallback-target", f"{opts.fallback_target:g}"] if opts.fallback_target is not None else []
    for name, label in opts.labels.items():
        parts += ["--label", f"{name}={label}"]
    return shlex.join(parts)


def finite(obj: Any) -> Any:
    """`obj` with every nan/inf float replaced by None, so that the JSON is strict (RFC 8259)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def run_bench(models: Sequence[str | os.PathLike], opts: BenchOptions) -> dict[str, Any]:
    """Measure every model and variant; write OUT/results.json and return the results document.
    Progress goes to stderr (a tqdm bar, one line per export or skipped variant)."""
    import torch
    from tqdm import tqdm

    from lic_deploy.bench.compare import analyse
    from lic_deploy.export.calibration import calibration_set
    from lic_deploy.runtime.images import list_images, load_rgb, to_uint8

    if not models:
        raise LicError("no models given")
    from lic_deploy.runtime.engines import check_device

    check_device(opts.device, "GPU rows need an NVIDIA GPU, run without --device here")
    known = {str(m) for m in models} | {Path(m).stem for m in models} | {Path(m).name for m in models}
    for name, label in opts.labels.items():
        parse_label(label)  # LicError for a malformed label, even one whose model has metadata
        if name not in known:
            raise LicError(f"--label {name}=...: no model of this bench is called {name!r} (use its file stem)")
    resolved = [resolve_model(m, opts.labels) for m in models]
    names = [m.name for m in resolved]
    if len(set(names)) != len(names):
        raise LicError(f"two models share a name ({', '.join(names)}); rename one")
    files = list_images(opts.data)[: opts.images or None]
    images = []
    for f in files:
        img, _ = load_rgb(f)
        images.append((f.name, img, to_uint8(img)))
    opts.out.mkdir(parents=True, exist_ok=True)
    plans = {m.name: plan_variants(m, opts) for m in resolved}
    crops = calibration_set(opts.calib, opts.calib_count, size=opts.calib_size)[0] if opts.outlier_images else []
    results: dict[str, Any] = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(models, opts), "environment": environment(opts.threads),
        "settings": {**{k: v for k, v in asdict(opts).items() if k not in ("data", "out", "labels", "resume")},
                     "data": str(opts.data), "images": [f.name for f in files], "steps": list(STEPS)},
        "models": [], "rows": [], "summaries": [], "latency": [], "skipped": [], "fallback": [], "outliers": [],
    }
    partial = opts.out / PARTIAL
    done = resume_from(partial, results, {m.name: m.sha256 for m in resolved}) if opts.resume else set()
    todo = [m for m in resolved if m.name not in done]
    bar = tqdm(total=sum(len(plans[m.name]) for m in todo) * len(images), unit="img", file=sys.stderr,
               dynamic_ncols=True)
    if done:
        bar.write(f"resumed {len(done)} measured model(s) from {partial}: {', '.join(sorted(done))}")
    torch_threads = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)  # export, the torch engine and the outlier statistics
    try:
        for model in todo:
            bench_model(model, plans[model.name], images, crops, opts, results, bar)
            write_json(partial, finite(results))
    finally:
        bar.close()
        torch.set_num_threads(torch_threads)
    results["analysis"] = analyse(results)
    results = finite(results)
    write_json(opts.out / "results.json", results)
    partial.unlink(missing_ok=True)
    return results


PARTIAL = "results.partial.json"
MODEL_KEYS = ("models", "rows", "summaries", "latency", "skipped", "fallback", "outliers")


def resume_from(partial: Path, results: dict[str, Any], shas: Mapping[str, str]) -> set[str]:
    """Copy the per-model records of an interrupted run into `results`; the names of its finished models.
    Only a run with the same command line (models, data, every option) is resumed; otherwise nothing is; and of
    it only the models whose file is still the one measured (`shas`: name -> sha256 now)."""
    try:
        old = json.loads(partial.read_text())
    except (OSError, ValueError):
        return set()
    same = {k: json.loads(json.dumps(finite(results[k]))) for k in ("command", "settings")}  # tuples -> lists
    if not isinstance(old, dict) or any(old.get(k) != v for k, v in same.items()):
        return set()
    kept = {m.get("name") for m in old.get("models", []) if shas.get(m.get("name")) == m.get("sha256")}
    for key in MODEL_KEYS:
        results[key] += [r for r in old.get(key, []) if r.get("name" if key == "models" else "model") in kept]
    return kept


def synced_stage_ms(engine: Any, package: Any, image: np.ndarray, repeat: int, warmup: int) -> dict[str, Any]:
    """Per float stage of one image, median milliseconds between two device synchronisations: with the input
    already on the device where the engine offers `stage_timer` (torch), else host to host through `run`."""
    from lic_deploy.bench.latency import median_seconds
    x = package.pad(image)[0][None]
    y = engine.run("g_a", x)
    inputs = {"g_a": x, "h_a": y, "g_s": np.round(y)}
    sync = getattr(engine, "synchronize", None)
    timer = getattr(engine, "stage_timer", None)
    ms = {s: 1000 * median_seconds(timer(s, v) if timer else (lambda s=s, v=v: engine.run(s, v)), repeat=repeat,
                                   warmup=warmup, sync=sync) for s, v in inputs.items()}
    return {"ms": ms, "mode": "device-resident" if timer else "host to host"}


def bench_model(model: Model, plan: Mapping[Variant, str | None],
                images: Sequence[tuple[str, np.ndarray, np.ndarray]], crops: Sequence[np.ndarray],
                opts: BenchOptions, results: dict[str, Any], bar: Any) -> None:
    """Export, run every variant and collect outliers of one model, appending to `results`."""
    from lic_deploy.runtime.codec import Codec
    from lic_deploy.runtime.package import Package

    folders = export_for(model, plan, opts, bar.write)
    manifest = Package.open(next(iter(folders.values()), model.path)).manifest
    results["models"].append({**asdict(model), "path": str(model.path), "curve": model.curve,
                              "arch": manifest["arch"], "config": manifest["config"],
                              "packages": {k: str(v) for k, v in folders.items()}})
    for variant, folder in plan.items():
        bar.set_description(f"{model.name} {variant.key}")
        tag = {"model": model.name, "variant": variant.key, "engine": variant.engine, "device": variant.device}
        try:
            codec = Codec(model.path if folder is None else folders[folder], variant.backend, variant.precision,
                          threads=opts.threads, device=variant.device)
            for _ in range(max(1, opts.warmup)):
                _encode_decode(codec, images[0][1])
        except LicError as exc:  # backend or precision not available here
            results["skipped"].append({**tag, "reason": str(exc)})
            bar.write(f"skipped {model.name} {variant.key}: {exc}")
            bar.update(len(images))
            continue
        rows, latency = run_variant(codec, images, opts, lambda: bar.update(1))
        if variant.device != "cpu":
            latency["synced"] = synced_stage_ms(codec.engine, codec.package, images[0][1], opts.repeat,
                                                max(1, opts.warmup))
        results["rows"] += [{**tag, **r} for r in rows]
        results["summaries"].append({**tag, **asdict(variant), **summarize(rows)})
        results["latency"].append({**tag, **latency})
        if variant.fallback and "fallback" in codec.package.manifest:
            results["fallback"].append({**tag, **codec.package.manifest["fallback"]})
    if opts.outlier_images:
        used = [img for _, img, _ in images[: opts.outlier_images]]
        results["outliers"].append({"model": model.name, **outlier_record(model, used, crops)})


def outlier_record(model: Model, images: Sequence[np.ndarray], crops: Sequence[np.ndarray]) -> dict[str, Any]:
    """Per-layer outlier statistics and INT8 SQNR of one model on `images`, INT8 scales from `crops`."""
    from lic_deploy.archs.checkpoint import load_model
    from lic_deploy.archs.registry import get_adapter
    from lic_deploy.bench.outliers import collect
    from lic_deploy.runtime.package import Package

    weights = model.path
    if model.kind == "package":
        pkg = Package.open(model.path)
        weights = pkg.verified_path(pkg.manifest["torch_weights"])
    loaded = load_model(weights)
    spec = get_adapter(loaded.arch).spec(loaded.model)
    return {"images": len(images), "calib_crops": len(crops), "layers": collect(spec, images, crops)}


def write_json(path: Path, doc: Mapping[str, Any]) -> None:
    """Write strict JSON atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")


RESULT_FIELDS = {"models": ("name",), "rows": ("model", "variant", "image", "bpp", "psnr"),
                 "summaries": ("model", "variant")}  # what the report reads of each section


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """A results.json written by `run_bench`; LicError for anything else or another schema version."""
    try:
        doc = json.loads(read_text(path, "a lic-deploy bench results file"))
    except ValueError as exc:
        raise LicError(f"{path}: not a readable results file ({exc})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise LicError(f"{path}: not a lic-deploy bench results file")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise LicError(f"{path}: results schema {doc.get('schema_version')} is not supported "
                       f"(this build reads {SCHEMA_VERSION}); rerun lic-deploy bench")
    for key, fields in RESULT_FIELDS.items():
        entries = doc.get(key)
        if not isinstance(entries, list) or not all(isinstance(e, dict) and all(f in e for f in fields)
                                                    for e in entries):
            raise LicError(f"{path}: its {key!r} is not a list of entries with {', '.join(fields)}")
    return doc
