"""TensorRT on NVIDIA GPUs: each stage's ONNX graph compiled into a strongly typed engine, cached in the package.

Precision comes from the graph, never from builder flags (TensorRT 11 removed BuilderFlag.FP16/INT8 and the
calibrators): `int8` graphs carry explicit Q/DQ, `fp16` graphs FP16 tensors, and TF32 is switched off so that
`fp32` means FP32. `int8-u8s8` (unsigned activations) is the CPU form and is refused.

Cache: `PKG/engines/<stage>.<precision>.<key>.plan` plus a JSON sidecar with the key's inputs (ONNX sha256,
TensorRT version, compute capability, profile, precision) and the plan's sha256. A plan whose sidecar is missing,
names other inputs or another sha256 is stale or foreign: it is rebuilt, never loaded. Files are written to a
temporary name and renamed. Tactic timings are shared through `PKG/engines/timing.cache`.

Everything above `TensorRTEngine` is GPU-free; tensorrt and cuda-python are imported only when an engine is made.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lic_deploy.atomic import write_bytes
from lic_deploy.errors import BackendUnavailable, LicError
from lic_deploy.runtime.package import Package

TRT_PRECISIONS = ("fp32", "fp16", "int8")
INSTALL_HINT = ("--backend tensorrt needs TensorRT and cuda-python: pip install 'lic-deploy[tensorrt]' "
                "(NVIDIA's index: --extra-index-url https://pypi.nvidia.com)")
ENGINE_DIR, TIMING_CACHE, PROFILE_FILE = "engines", "timing.cache", "profile.json"
WORKSPACE_BYTES = 2 << 30  # builder scratch memory limit
MULTIPLE = 64  # packages pad images to multiples of 64, so every stage's input size is whole
_SIZE = re.compile(r"(\d+)x(\d+)")

Size = tuple[int, int]  # (height, width) in pixels


@dataclass(frozen=True)
class Profile:
    """Image sizes (height, width) in pixels an engine accepts: multiples of 64, min <= opt <= max per side.
    TensorRT tunes its kernels for `opt` (Kodak's 512x768 by default) and refuses sizes outside [min, max]."""

    min: Size = (256, 256)
    opt: Size = (512, 768)
    max: Size = (2048, 2048)

    def __post_init__(self) -> None:
        for size in (self.min, self.opt, self.max):
            if len(size) != 2 or any(s < MULTIPLE or s % MULTIPLE for s in size):
                raise LicError(f"profile sizes must be multiples of {MULTIPLE} pixels, got {size}")
        if not all(self.min[i] <= self.opt[i] <= self.max[i] for i in range(2)):
            raise LicError(f"profile needs min <= opt <= max in height and in width, got {self}")

    @classmethod
    def parse(cls, text: str) -> Profile:
        """"MINxMIN:OPTxOPT:MAXxMAX", each height x width, e.g. "256x256:512x768:2048x2048"."""
        found = [_SIZE.fullmatch(part.strip()) for part in text.split(":")]
        if len(found) != 3 or not all(found):
            raise LicError(f"profile {text!r} is not MIN:OPT:MAX with sizes HxW, e.g. 256x256:512x768:2048x2048")
        return cls(*[(int(m.group(1)), int(m.group(2))) for m in found if m])

    def __str__(self) -> str:
        return ":".join(f"{h}x{w}" for h, w in (self.min, self.opt, self.max))

    def contains(self, height: int, width: int) -> bool:
        return self.min[0] <= height <= self.max[0] and self.min[1] <= width <= self.max[1]

    def stage_shapes(self, in_channels: int, stride: int) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) input shapes [1, in_channels, H/stride, W/stride] of a stage with that stride."""
        if MULTIPLE % stride:
            raise LicError(f"stage stride {stride} does not divide {MULTIPLE}")
        return tuple((1, in_channels, h // stride, w // stride) for h, w in (self.min, self.opt, self.max))


def cache_key(onnx_sha256: str, trt_version: str, compute_capability: str, profile: Profile, precision: str) -> str:
    """16 hex digits of sha256 over everything a serialized engine depends on."""
    inputs = [onnx_sha256, trt_version, compute_capability, str(profile), precision]
    return hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PlanSpec:
    """One stage's engine as the cache knows it: the inputs of its key, and its file name."""

    stage: str
    precision: str
    onnx_sha256: str
    trt_version: str
    compute_capability: str  # "major.minor", e.g. "9.0"
    profile: Profile

    def inputs(self) -> dict[str, str]:
        return {"stage": self.stage, "precision": self.precision, "onnx_sha256": self.onnx_sha256,
                "tensorrt": self.trt_version, "compute_capability": self.compute_capability,
                "profile": str(self.profile)}

    def path(self, cache_dir: Path) -> Path:
        key = cache_key(self.onnx_sha256, self.trt_version, self.compute_capability, self.profile, self.precision)
        return cache_dir / f"{self.stage}.{self.precision}.{key}.plan"


def cached_plan(path: Path, spec: PlanSpec) -> tuple[bytes | None, str]:
    """(plan bytes, "fresh") if the plan at `path` was built from exactly `spec`, else (None, why it is not)."""
    if not path.is_file():
        return None, "not built yet"
    try:
        record = json.loads(path.with_suffix(".json").read_text())
        plan = path.read_bytes()
    except (OSError, ValueError):
        return None, "no readable sidecar"
    if not isinstance(record, dict) or record.get("inputs") != spec.inputs():
        return None, "built from other inputs"
    if record.get("plan_sha256") != hashlib.sha256(plan).hexdigest():
        return None, "plan does not match its sidecar"
    return plan, "fresh"




def load_or_build(spec: PlanSpec, cache_dir: Path, build: Callable[[], bytes], *, force: bool = False,
                  log: Callable[[str], None] = print) -> tuple[bytes, bool]:
    """The cached plan for `spec`, or `build()`'s, written to the cache first. Returns (plan, whether built)."""
    path = spec.path(cache_dir)
    plan, why = (None, "rebuild requested") if force else cached_plan(path, spec)
    if plan is not None:
        return plan, False
    log(f"building {path.name} ({why})")
    t0 = time.perf_counter()
    plan = build()
    record = {"inputs": spec.inputs(), "plan_sha256": hashlib.sha256(plan).hexdigest(),
              "build_seconds": round(time.perf_counter() - t0, 2), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_bytes(path, plan)
        write_bytes(path.with_suffix(".json"), json.dumps(record, indent=1).encode())
    except OSError as exc:
        raise LicError(f"cannot write the TensorRT engine cache {cache_dir} ({exc})") from None
    return plan, True


def default_profile(cache_dir: Path) -> Profile:
    """The profile that `lic-deploy build --profile` recorded for this cache, else the default Profile()."""
    path = cache_dir / PROFILE_FILE
    if not path.is_file():
        return Profile()
    try:
        return Profile.parse(json.loads(path.read_text())["profile"])
    except (OSError, ValueError, KeyError, TypeError):
        raise LicError(f"{path} is unreadable; delete it or rebuild with lic-deploy build --profile") from None


def _stderr(message: str) -> None:
    print(f"lic-deploy: {message}", file=sys.stderr)


def _import_nvidia() -> tuple[Any, Any]:
    """(tensorrt, cudart) from cuda-python >= 12.6 (cuda.bindings) or older (cuda.cudart)."""
    try:
        import tensorrt as trt

        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
    except (ImportError, OSError):
        raise BackendUnavailable(INSTALL_HINT) from None
    return trt, cudart


def _cuda(cudart: Any, result: tuple, what: str) -> Any:
    """Unwrap a cuda-python call's (error, value...) tuple; LicError unless cudaSuccess."""
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        raise LicError(f"CUDA {what} failed: {getattr(err, 'name', err)}")
    return values[0] if values else None


def _select_device(cudart: Any, device: int) -> tuple[str, str]:
    """Make `device` current; returns (its name, compute capability "major.minor")."""
    try:
        err, count = cudart.cudaGetDeviceCount()
    except RuntimeError as exc:  # cuda-python raises when it cannot load the driver library
        raise BackendUnavailable(f"--backend tensorrt found no CUDA driver ({exc})") from None
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        raise BackendUnavailable(f"--backend tensorrt found no CUDA device ({getattr(err, 'name', err)})")
    if not 0 <= device < count:
        raise BackendUnavailable(f"CUDA device {device} does not exist ({count} found)")
    _cuda(cudart, cudart.cudaSetDevice(device), "cudaSetDevice")
    props = _cuda(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return name.rstrip("\x00"), f"{props.major}.{props.minor}"


def _build_plan(trt: Any, logger: Any, onnx_path: Path, shapes: tuple[tuple[int, ...], ...], timing_path: Path,
                workspace: int) -> bytes:
    """Compile one single-input ONNX graph: strongly typed, one optimization profile, shared timing cache."""
    builder = trt.Builder(logger)
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # 11.x: always strongly typed
    network = builder.create_network(0 if strongly is None else 1 << int(strongly))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise LicError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None:
        config.clear_flag(tf32)
    profile = builder.create_optimization_profile()
    profile.set_shape(network.get_input(0).name, *shapes)
    config.add_optimization_profile(profile)
    old = timing_path.read_bytes() if timing_path.is_file() else b""
    try:  # a cache from another GPU or TensorRT version is refused: start afresh
        reused = bool(old) and config.set_timing_cache(config.create_timing_cache(old), False)
    except Exception:
        reused = False
    if not reused:
        config.set_timing_cache(config.create_timing_cache(b""), False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise LicError(f"TensorRT could not build an engine from {onnx_path.name} (see its log above)")
    with contextlib.suppress(OSError):  # the timing cache only speeds up later builds
        write_bytes(timing_path, bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


@dataclass
class _Stage:
    engine: Any
    context: Any
    input: str
    output: str
    in_dtype: np.dtype
    out_dtype: np.dtype
    stride: int
    path: Path
    shape: tuple[int, ...] = ()
    out: np.ndarray | None = None
    buffers: dict[str, tuple[int, int]] = field(default_factory=dict)  # tensor -> (device pointer, bytes)


class TensorRTEngine:
    """The package's `precision` graphs as TensorRT engines on CUDA device `device`, built lazily per stage.

    `run` copies host -> device, executes on one CUDA stream and copies back; device buffers are kept while shapes
    repeat and grow when needed. Release them with `close()` (also called on garbage collection).
    """

    name = "tensorrt"

    def __init__(self, package: Package, precision: str = "fp32", *, profile: Profile | None = None,
                 device: int = 0, cache_dir: str | os.PathLike | None = None, workspace: int = WORKSPACE_BYTES,
                 log: Callable[[str], None] = _stderr) -> None:
        if precision == "int8-u8s8":
            raise LicError("int8-u8s8 (unsigned activations) is the CPU form of INT8 and TensorRT does not take it; "
                           "use --precision int8 (symmetric Q/DQ)")
        if precision not in TRT_PRECISIONS:
            raise LicError(f"TensorRT runs {', '.join(TRT_PRECISIONS)}, not {precision!r}")
        self.package, self.precision, self._log, self._workspace = package, precision, log, workspace
        self.cache_dir = Path(cache_dir) if cache_dir else package.root / ENGINE_DIR
        self.profile = profile or default_profile(self.cache_dir)
        self._stages: dict[str, _Stage] = {}
        self._trt, self._cudart = _import_nvidia()
        self.device_name, self.compute_capability = _select_device(self._cudart, device)
        self._logger = self._trt.Logger(self._trt.Logger.WARNING)
        self._runtime = self._trt.Runtime(self._logger)
        self._stream = _cuda(self._cudart, self._cudart.cudaStreamCreate(), "cudaStreamCreate")

    def prepare(self, stage: str) -> Path:
        """Load `stage`'s engine from the cache (building it first if stale or missing); returns the plan's path."""
        if stage not in self._stages:
            self._stages[stage] = self._load(stage)
        return self._stages[stage].path

    def _deserialize(self, plan: bytes) -> Any:
        try:
            return self._runtime.deserialize_cuda_engine(plan)
        except Exception:  # a plan this driver cannot load: treated like None, i.e. rebuilt
            return None

    def _load(self, stage: str) -> _Stage:
        trt = self._trt
        onnx = self.package.stage_path(stage, self.precision)  # checks the sha256 recorded in the manifest
        info = self.package.manifest["stages"][stage]
        spec = PlanSpec(stage, self.precision, info["files"][self.precision]["sha256"], trt.__version__,
                        self.compute_capability, self.profile)
        shapes = self.profile.stage_shapes(int(info["in_channels"]), int(info["stride"]))

        def build() -> bytes:
            return _build_plan(trt, self._logger, onnx, shapes, self.cache_dir / TIMING_CACHE, self._workspace)

        plan, built = load_or_build(spec, self.cache_dir, build, log=self._log)
        engine = self._deserialize(plan)
        if engine is None and not built:  # fresh by its record, yet not loadable here (driver change)
            engine = self._deserialize(load_or_build(spec, self.cache_dir, build, force=True, log=self._log)[0])
        if engine is None:
            raise LicError(f"TensorRT cannot load the engine built from {onnx.name}")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise LicError(f"{onnx.name}: expected one input and one output, TensorRT sees {names}")
        dtype = [np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in (inputs[0], outputs[0])]
        return _Stage(engine, engine.create_execution_context(), inputs[0], outputs[0], dtype[0], dtype[1],
                      int(info["stride"]), spec.path(self.cache_dir))

    def _reshape(self, st: _Stage, shape: tuple[int, ...]) -> None:
        """Set the input shape, (re)allocate device buffers that are too small and bind their addresses."""
        cudart = self._cudart
        height, width = (shape[2] * st.stride, shape[3] * st.stride) if len(shape) == 4 else (0, 0)
        if len(shape) != 4 or shape[0] != 1 or not self.profile.contains(height, width):
            raise LicError(f"input {shape} (a {height}x{width} image) is outside the TensorRT profile {self.profile};"
                           f" rebuild with lic-deploy build --profile MIN:OPT:MAX")
        if not st.context.set_input_shape(st.input, shape):
            raise LicError(f"TensorRT refused input shape {shape}")
        st.out = np.empty(tuple(st.context.get_tensor_shape(st.output)), st.out_dtype)
        for name, nbytes in ((st.input, int(np.prod(shape)) * st.in_dtype.itemsize), (st.output, st.out.nbytes)):
            ptr, capacity = st.buffers.get(name, (0, 0))
            if nbytes > capacity:
                if ptr:
                    _cuda(cudart, cudart.cudaFree(ptr), "cudaFree")
                    del st.buffers[name]
                ptr = _cuda(cudart, cudart.cudaMalloc(nbytes), "cudaMalloc")
                st.buffers[name] = (ptr, nbytes)
            st.context.set_tensor_address(name, ptr)
        st.shape = shape

    def run(self, stage: str, x: np.ndarray) -> np.ndarray:
        self.prepare(stage)
        st, cudart, kind = self._stages[stage], self._cudart, self._cudart.cudaMemcpyKind
        x = np.ascontiguousarray(x, dtype=st.in_dtype)
        if x.shape != st.shape:
            self._reshape(st, x.shape)
        assert st.out is not None
        _cuda(cudart, cudart.cudaMemcpyAsync(st.buffers[st.input][0], x.ctypes.data, x.nbytes,
                                             kind.cudaMemcpyHostToDevice, self._stream), "cudaMemcpyAsync")
        if not st.context.execute_async_v3(int(self._stream)):
            raise LicError(f"TensorRT execution of {stage} failed")
        _cuda(cudart, cudart.cudaMemcpyAsync(st.out.ctypes.data, st.buffers[st.output][0], st.out.nbytes,
                                             kind.cudaMemcpyDeviceToHost, self._stream), "cudaMemcpyAsync")
        _cuda(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return st.out.astype(np.float32)  # a copy: st.out is reused by the next call

    def close(self) -> None:
        """Free device buffers, execution contexts, engines and the stream. Idempotent."""
        cudart = getattr(self, "_cudart", None)
        for st in getattr(self, "_stages", {}).values():
            for ptr, _ in st.buffers.values():
                cudart.cudaFree(ptr)
            st.buffers.clear()
            st.context = st.engine = None  # the context goes before its engine
        self._stages = {}
        if getattr(self, "_stream", None) is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def build_engines(package: Package, precisions: list[str] | tuple[str, ...], profile: Profile | None = None, *,
                  device: int = 0, cache_dir: str | os.PathLike | None = None,
                  log: Callable[[str], None] = _stderr) -> list[Path]:
    """Ahead of time: build (or find fresh in the cache) and load every stage's engine for each precision.

    Returns the plan paths. An explicit `profile` is recorded as the cache's default, so later engines made
    without one (`--backend tensorrt`) use the same plans.
    """
    cache = Path(cache_dir) if cache_dir else package.root / ENGINE_DIR
    paths = []
    for precision in precisions:
        engine = TensorRTEngine(package, precision, profile=profile, device=device, cache_dir=cache, log=log)
        try:
            paths += [engine.prepare(stage) for stage, entry in package.manifest["stages"].items()
                      if precision in entry["files"]]  # ELIC's context stages exist in FP32 only
        finally:
            engine.close()
    if profile is not None:
        write_bytes(cache / PROFILE_FILE, json.dumps({"profile": str(profile)}).encode())
    return paths
