"""NVIDIA backends: what can be checked without a GPU is checked here; the rest is marked `gpu` and skips.

No test below pretends to be TensorRT: the cache tests inject a build function returning marker bytes, and the
bookkeeping test drives TensorRTEngine through recording stubs of tensorrt/cuda-python that compute nothing; it
checks lic-deploy's own buffer, shape and clean-up logic only.
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest

from lic_deploy.cli import main
from lic_deploy.errors import BackendUnavailable, LicError
from lic_deploy.runtime.engines import create_engine
from lic_deploy.runtime.engines import tensorrt as trt_engine
from lic_deploy.runtime.engines.tensorrt import (
    INSTALL_HINT,
    PlanSpec,
    Profile,
    TensorRTEngine,
    cache_key,
    cached_plan,
    default_profile,
    load_or_build,
)
from lic_deploy.runtime.package import Package
from tests.conftest import Perturbed, make_checkpoint, write_images


@pytest.fixture(scope="module")
def tiny_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mbt2018-mean N=32, M=48 with random weights, exported with FP32 and INT8 graphs."""
    from lic_deploy.export.package_writer import ExportOptions, export_package

    root = tmp_path_factory.mktemp("trt")
    ckpt = make_checkpoint(root / "tiny.pt", "mbt2018-mean", 32, 48)
    opts = ExportOptions(precisions=("fp32", "int8"), calib_count=2, calib_size=128)
    return export_package(ckpt, root / "pkg", options=opts, log=lambda _: None)


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `import tensorrt` fail, even on a machine that has it."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def test_profile_parsing_and_validation() -> None:
    p = Profile()
    assert (p.min, p.opt, p.max) == ((256, 256), (512, 768), (2048, 2048))
    assert str(p) == "256x256:512x768:2048x2048" and Profile.parse(str(p)) == p
    assert Profile.parse(" 64x128 : 128x128 : 192x256 ") == Profile((64, 128), (128, 128), (192, 256))
    bad = {"256x256:512x768": "MIN:OPT:MAX", "256x256:512:2048x2048": "MIN:OPT:MAX", "a:b:c": "MIN:OPT:MAX",
           "256x250:512x768:2048x2048": "multiples of 64", "0x0:64x64:64x64": "multiples of 64",
           "512x512:256x256:2048x2048": "min <= opt <= max", "256x256:512x768:2048x512": "min <= opt <= max"}
    for text, needle in bad.items():
        with pytest.raises(LicError, match=needle):
            Profile.parse(text)
    assert p.contains(512, 768) and p.contains(256, 2048) and not p.contains(192, 512) and not p.contains(512, 4096)


def test_stage_shapes_follow_the_manifest(tiny_package: Path) -> None:
    stages = Package.open(tiny_package).manifest["stages"]
    p = Profile()
    shapes = {s: p.stage_shapes(int(v["in_channels"]), int(v["stride"])) for s, v in stages.items()}
    assert shapes["g_a"] == ((1, 3, 256, 256), (1, 3, 512, 768), (1, 3, 2048, 2048))
    assert shapes["h_a"] == ((1, 48, 16, 16), (1, 48, 32, 48), (1, 48, 128, 128))
    assert shapes["h_s"] == ((1, 32, 4, 4), (1, 32, 8, 12), (1, 32, 32, 32))
    assert shapes["g_s"] == shapes["h_a"]
    with pytest.raises(LicError, match="does not divide"):
        p.stage_shapes(3, 128)


def _spec(**changes: object) -> PlanSpec:
    base = {"stage": "g_a", "precision": "int8", "onnx_sha256": "a" * 64, "trt_version": "10.13.0",
            "compute_capability": "9.0", "profile": Profile()}
    return PlanSpec(**{**base, **changes})  # type: ignore[arg-type]


def test_cache_key_changes_with_each_input() -> None:
    args = ["a" * 64, "10.13.0", "9.0", Profile(), "int8"]
    key = cache_key(*args)
    assert len(key) == 16 and int(key, 16) >= 0 and cache_key(*args) == key
    changed = [["b" * 64, *args[1:]], [args[0], "11.0.0", *args[2:]], [*args[:2], "8.9", *args[3:]],
               [*args[:3], Profile.parse("256x256:512x768:1024x1024"), args[4]], [*args[:4], "fp16"]]
    keys = {cache_key(*c) for c in changed}
    assert len(keys) == 5 and key not in keys
    assert _spec().path(Path("c")).name == f"g_a.int8.{key}.plan"


def test_stale_and_foreign_plans_are_rebuilt_never_loaded(tmp_path: Path) -> None:
    builds: list[bytes] = []

    def build() -> bytes:  # marker bytes standing for a plan; the cache never looks inside
        builds.append(f"plan {len(builds)}".encode())
        return builds[-1]

    spec = _spec()
    plan, built = load_or_build(spec, tmp_path, build, log=lambda _: None)
    assert built and plan == b"plan 0" and cached_plan(spec.path(tmp_path), spec) == (b"plan 0", "fresh")
    assert load_or_build(spec, tmp_path, build, log=lambda _: None) == (b"plan 0", False)
    sidecar = json.loads(spec.path(tmp_path).with_suffix(".json").read_text())
    assert sidecar["inputs"] == spec.inputs() and sidecar["inputs"]["tensorrt"] == "10.13.0"
    # new ONNX graph, TensorRT, GPU or profile: another key, another file, a fresh build
    other = _spec(onnx_sha256="b" * 64)
    assert load_or_build(other, tmp_path, build, log=lambda _: None) == (b"plan 1", True)
    # a foreign plan under this spec's name (copied from elsewhere, with its own sidecar)
    path = spec.path(tmp_path)
    path.write_bytes(other.path(tmp_path).read_bytes())
    path.with_suffix(".json").write_text(other.path(tmp_path).with_suffix(".json").read_text())
    assert cached_plan(path, spec) == (None, "built from other inputs")
    assert load_or_build(spec, tmp_path, build, log=lambda _: None) == (b"plan 2", True)
    # a plan changed after its sidecar was written, a lost sidecar, an unreadable one
    path.write_bytes(b"tampered")
    assert cached_plan(path, spec) == (None, "plan does not match its sidecar")
    path.with_suffix(".json").unlink()
    assert cached_plan(path, spec) == (None, "no readable sidecar")
    messages: list[str] = []
    assert load_or_build(spec, tmp_path, build, log=messages.append) == (b"plan 3", True)
    assert messages == [f"building {path.name} (no readable sidecar)"]
    assert load_or_build(spec, tmp_path, build, force=True, log=lambda _: None) == (b"plan 4", True)
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


def test_default_profile_comes_from_the_cache(tmp_path: Path) -> None:
    assert default_profile(tmp_path) == Profile()
    (tmp_path / "profile.json").write_text(json.dumps({"profile": "256x256:256x256:1024x1024"}))
    assert default_profile(tmp_path) == Profile((256, 256), (256, 256), (1024, 1024))
    (tmp_path / "profile.json").write_text("{")
    with pytest.raises(LicError, match="unreadable"):
        default_profile(tmp_path)


def test_missing_tensorrt_and_refused_precisions(tiny_package: Path, no_tensorrt: None) -> None:
    pkg = Package.open(tiny_package)
    with pytest.raises(BackendUnavailable) as exc:
        create_engine(pkg, "tensorrt", "int8")
    assert str(exc.value) == INSTALL_HINT
    with pytest.raises(LicError, match="CPU form of INT8"):
        TensorRTEngine(pkg, "int8-u8s8")
    with pytest.raises(LicError, match="not 'fp64'"):
        TensorRTEngine(pkg, "fp64")
    with pytest.raises(LicError, match="unknown device"):
        create_engine(pkg, "torch", "fp32", device="gpu")
    with pytest.raises(LicError, match="runs on the CPU"):
        create_engine(pkg, "ort", "fp32", device="cuda")


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err.strip()


def test_cli_without_nvidia_says_what_is_missing(tiny_package: Path, tmp_path: Path, no_tensorrt: None,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    img = write_images(tmp_path / "img", [(64, 64)])[0]
    cases = [
        (["encode", str(tiny_package), str(img), "--backend", "tensorrt", "-o", str(tmp_path / "o1")],
         "pip install 'lic-deploy[tensorrt]'"),
        (["build", str(tiny_package), "--precision", "int8"], "pip install 'lic-deploy[tensorrt]'"),
        (["build", str(tiny_package), "--profile", "100x100:512x768:2048x2048"], "multiples of 64"),
        (["encode", str(tiny_package), str(img), "--backend", "torch", "--device", "cuda", "-o", str(tmp_path / "o2")],
         "sees no CUDA device"),
        (["encode", str(tiny_package), str(img), "--backend", "tensorrt", "--precision", "int8-u8s8", "-o",
          str(tmp_path / "o3")], "CPU form of INT8"),
    ]
    for args, needle in cases:
        code, err = _cli(args, capsys)
        assert code == 2 and len(err.splitlines()) == 1 and needle in err, (args, err)
    assert not list(tmp_path.glob("o*/*.lic"))
    assert not (tiny_package / "engines").exists()


class _StubCudart(types.ModuleType):
    """Records allocations and copies; computes nothing."""

    cudaError_t = SimpleNamespace(cudaSuccess=0)
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def __init__(self) -> None:
        super().__init__("cuda.bindings.runtime")
        self.live: dict[int, int] = {}
        self.mallocs, self.copies, self.streams = 0, 0, 0

    def cudaGetDeviceCount(self) -> tuple:
        return 0, 1

    def cudaSetDevice(self, device: int) -> tuple:
        return (0,)

    def cudaGetDeviceProperties(self, device: int) -> tuple:
        return 0, SimpleNamespace(name=b"stub", major=9, minor=0)

    def cudaStreamCreate(self) -> tuple:
        self.streams += 1
        return 0, 7

    def cudaStreamDestroy(self, stream: int) -> tuple:
        self.streams -= 1
        return (0,)

    def cudaStreamSynchronize(self, stream: int) -> tuple:
        return (0,)

    def cudaMalloc(self, nbytes: int) -> tuple:
        self.mallocs += 1
        self.live[0x1000 * self.mallocs] = nbytes
        return 0, 0x1000 * self.mallocs

    def cudaFree(self, ptr: int) -> tuple:
        del self.live[ptr]
        return (0,)

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> tuple:
        self.copies += 1
        return (0,)


class _StubContext:
    def __init__(self) -> None:
        self.shapes: list[tuple] = []
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        self.shapes.append(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        return (1, 2, *self.shapes[-1][2:])

    def set_tensor_address(self, name: str, ptr: int) -> None:
        self.addresses[name] = ptr

    def execute_async_v3(self, stream: int) -> bool:
        return stream == 7


class _StubLogger:
    WARNING = 2

    def __init__(self, level: int) -> None:
        self.level = level


class _StubEngine:
    num_io_tensors = 2
    contexts: ClassVar[list[_StubContext]] = []

    def get_tensor_name(self, i: int) -> str:
        return ("input", "output")[i]

    def get_tensor_mode(self, name: str) -> str:
        return "IN" if name == "input" else "OUT"

    def get_tensor_dtype(self, name: str) -> str:
        return "float"

    def create_execution_context(self) -> _StubContext:
        self.contexts.append(_StubContext())
        return self.contexts[-1]


def test_engine_bookkeeping_with_recording_stubs(tiny_package: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cudart = _StubCudart()
    trt = SimpleNamespace(__version__="0.0-stub", Logger=_StubLogger, TensorIOMode=SimpleNamespace(INPUT="IN"),
                          nptype=lambda dtype: np.float32,
                          Runtime=lambda logger: SimpleNamespace(
                              deserialize_cuda_engine=lambda plan: _StubEngine() if plan == b"stub plan" else None))
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart  # type: ignore[attr-defined]
    cuda = types.ModuleType("cuda")
    cuda.bindings = bindings  # type: ignore[attr-defined]
    for name, module in (("tensorrt", trt), ("cuda", cuda), ("cuda.bindings", bindings),
                         ("cuda.bindings.runtime", cudart)):
        monkeypatch.setitem(sys.modules, name, module)
    built: list[tuple] = []
    monkeypatch.setattr(trt_engine, "_build_plan", lambda *args: built.append(args[3]) or b"stub plan")

    pkg = Package.open(tiny_package)
    engine = TensorRTEngine(pkg, "fp32", cache_dir=tmp_path, log=lambda _: None)
    assert (engine.device_name, engine.compute_capability) == ("stub", "9.0")
    small, large = np.zeros((1, 3, 256, 256), np.float32), np.zeros((1, 3, 512, 768), np.float32)
    assert engine.run("g_a", small).shape == (1, 2, 256, 256)
    engine.run("g_a", small)
    assert cudart.mallocs == 2 and cudart.copies == 4  # shapes repeat: buffers and bindings kept
    engine.run("g_a", large)
    assert cudart.mallocs == 4 and len(cudart.live) == 2  # grown: old buffers freed first
    engine.run("g_a", small)
    assert cudart.mallocs == 4  # smaller: the large buffers are reused
    context = _StubEngine.contexts[-1]
    assert context.shapes == [small.shape, large.shape, small.shape]
    assert set(context.addresses.values()) == set(cudart.live)
    with pytest.raises(LicError, match="outside the TensorRT profile"):
        engine.run("g_a", np.zeros((1, 3, 64, 4096), np.float32))
    assert built == [Profile().stage_shapes(3, 1)]
    assert engine.prepare("g_a").parent == tmp_path and engine.prepare("g_a").is_file()
    engine.close()
    assert cudart.live == {} and cudart.streams == 0
    engine.close()  # idempotent

    again = TensorRTEngine(pkg, "fp32", cache_dir=tmp_path, log=lambda _: None)
    again.prepare("g_a")
    assert len(built) == 1  # loaded from the cache, not rebuilt
    again.close()


class _Recorder:
    """Stands in for TensorRT's builder, network, parser, config and profile: records calls, builds nothing."""

    RETURNS: ClassVar[dict[str, object]] = {"parse_from_file": True, "set_timing_cache": True,
                                            "get_input": SimpleNamespace(name="input"),
                                            "build_serialized_network": b"marker", "serialize": b"timings"}

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name: str):
        def call(*args: object) -> object:
            self.calls.append((name, *args))
            return self.RETURNS.get(name, self)
        return call


def test_build_plan_is_strongly_typed_and_sets_no_precision_flags(tmp_path: Path) -> None:
    rec = _Recorder()
    trt = SimpleNamespace(Builder=lambda logger: rec, OnnxParser=lambda network, logger: rec,
                          NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1),
                          BuilderFlag=SimpleNamespace(TF32=7),  # as in TensorRT 11: no FP16, no INT8
                          MemoryPoolType=SimpleNamespace(WORKSPACE="workspace"))
    shapes = Profile().stage_shapes(3, 1)
    timing = tmp_path / "timing.cache"
    assert trt_engine._build_plan(trt, None, tmp_path / "g_a.int8.onnx", shapes, timing, 123) == b"marker"
    assert ("create_network", 1 << 1) in rec.calls and ("clear_flag", 7) in rec.calls
    assert ("set_memory_pool_limit", "workspace", 123) in rec.calls and ("set_shape", "input", *shapes) in rec.calls
    assert not [c for c in rec.calls if c[0] == "set_flag"] and timing.read_bytes() == b"timings"
    trt_engine._build_plan(trt, None, tmp_path / "g_a.int8.onnx", shapes, timing, 123)
    assert ("create_timing_cache", b"timings") in rec.calls  # the second build starts from the first's timings


def test_gpu_check_dry_run_writes_its_report(tiny_package: Path, tmp_path: Path) -> None:
    from lic_deploy.bench import gpu_check

    code = gpu_check.main([str(tiny_package), "--dry-run", "--out", str(tmp_path), "--images", "1",
                           "--repeat", "1", "--warmup", "0"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert code == 0 and report["summary"] == {"ok": True, "failures": []}
    assert report["dry_run"] and report["label"].startswith("DRY RUN")
    assert {"python", "onnxruntime", "torch", "tensorrt", "cuda_python"} <= set(report["environment"])
    engines = ["ort:fp32", "ort:int8", "torch-cpu:fp32"]
    assert list(report["engines"]) == engines
    assert report["engines"]["ort:int8"]["stands_in_for"] == "tensorrt:int8"
    assert report["baseline"] == "torch-cpu:fp32" and report["package"]["exported_here"] is False
    assert [b["engine"] for b in report["builds"]] == engines and all(b["ok"] for b in report["builds"])
    checks = report["stage_checks"]
    assert len(checks) == 12 and all(c["ok"] is True for c in checks)  # JSON booleans, not "True" strings
    assert all("ort_sqnr_db" in c and c["floor_db"] == gpu_check.SQNR_FLOOR_DB["int8"]
               for c in checks if c["engine"] == "ort:int8")
    rows = report["cross_device"]["rows"]
    assert len(rows) == 2 * len(engines) and all(r["latents_identical"] is True for r in rows)
    assert {(r["encoder"], r["decoder"]) for r in rows} >= {("ort:int8", "ort:fp32"), ("ort:fp32", "ort:int8")}
    assert all(r["nonzero_latents"] > 0.01 for r in rows)
    ms = report["latency"]["median_ms"]
    assert set(ms) == {*engines, "ort-cpu:fp32"} and all(set(v) == {"g_a", "h_a", "h_s", "g_s"} for v in ms.values())


@pytest.mark.parametrize(("precision", "eps", "ok"), [("fp16", 1e-3, True), ("fp16", 3e-2, False),
                                                      ("int8", 3e-2, True), ("int8", 0.5, False)])
def test_gpu_check_judges_fp16_and_int8_by_an_absolute_floor(tiny_package: Path, precision: str, eps: float,
                                                             ok: bool) -> None:
    """Relative noise eps gives an SQNR of about -20 log10(eps): 1e-3 is 60 dB, what torch-cuda FP16 reached on an
    H200 (below ORT CPU FP16's 66-72 dB, and right), 3e-2 is 30 dB (a broken FP16 engine, a fine INT8 one)."""
    from lic_deploy.bench import gpu_check

    package = Package.open(tiny_package)
    ref = create_engine(package, "ort", "fp32")
    noisy = Perturbed(ref, eps, seed=3)
    image = np.random.default_rng(0).uniform(0, 1, (3, 128, 128)).astype(np.float32)
    inputs = gpu_check.stage_inputs(package, ref, image)
    variant = gpu_check.Variant(f"stub:{precision}", lambda: noisy, precision)
    rows = gpu_check.stage_checks(package, {variant.label: noisy}, [variant], ref, inputs)
    assert len(rows) == 4 and all(r["ok"] is ok and r["floor_db"] == gpu_check.SQNR_FLOOR_DB[precision]
                                  for r in rows)
    assert all(abs(r["sqnr_db"] + 20 * math.log10(eps)) < 3 for r in rows)
    assert json.loads(json.dumps(rows, default=gpu_check._json_value))[0]["ok"] is ok


def test_gpu_check_json_keeps_numpy_booleans_boolean() -> None:
    from lic_deploy.bench import gpu_check

    text = json.dumps({"ok": np.bool_(False), "x": np.float32(0.5), "p": Path("a")}, default=gpu_check._json_value)
    assert json.loads(text) == {"ok": False, "x": 0.5, "p": "a"}


def _nvidia_ready() -> str | None:
    """None when TensorRT, cuda-python and a CUDA device are all there; else why not."""
    try:
        trt_engine._select_device(trt_engine._import_nvidia()[1], 0)
    except LicError as exc:
        return str(exc)
    return None


@pytest.mark.gpu
def test_tensorrt_stage_matches_onnx_runtime(tiny_package: Path, tmp_path: Path) -> None:
    """A real TensorRT build and run of g_a, FP32 and INT8, against ONNX Runtime on the same input."""
    reason = _nvidia_ready()
    if reason:
        pytest.skip(reason)
    from lic_deploy.export.onnx_export import rel_error, sqnr_db

    pkg = Package.open(tiny_package)
    profile = Profile.parse("256x256:256x256:512x512")
    x = np.random.default_rng(0).uniform(0, 1, (1, 3, 256, 256)).astype(np.float32)
    ref = create_engine(pkg, "ort", "fp32").run("g_a", x)
    engine = TensorRTEngine(pkg, "fp32", profile=profile, cache_dir=tmp_path)
    assert rel_error(ref, engine.run("g_a", x)) < 1e-3
    engine.close()
    ort_int8 = sqnr_db(ref, create_engine(pkg, "ort", "int8").run("g_a", x))
    engine = TensorRTEngine(pkg, "int8", profile=profile, cache_dir=tmp_path)
    assert sqnr_db(ref, engine.run("g_a", x)) > ort_int8 - 3.0
    engine.close()
