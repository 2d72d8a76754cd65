"""`lic-deploy bench --device cuda` without a GPU: the option's refusal, the variants it plans, the GPU rows and
report sections (with a CPU stand-in for PyTorch CUDA), synchronised latency through a stub, and merging a CPU
run with a GPU run. Nothing here runs on a GPU; the stand-in says so in its name."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from lic_deploy.errors import BackendUnavailable, LicError
from tests.conftest import make_checkpoint, write_images


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpu-bench")
    write_images(root / "images", [(128, 128), (64, 128)])
    return {"root": root, "images": root / "images",
            "a": make_checkpoint(root / "tiny-a.pt", "mbt2018-mean", 16, 24, seed=0),
            "b": make_checkpoint(root / "tiny-b.pt", "mbt2018-mean", 16, 24, seed=1)}


def test_device_cuda_without_a_gpu_is_one_line_and_exit_2(tiny: dict[str, Path],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from lic_deploy.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    for device, words in (("cuda", "sees no such CUDA device"), ("cuda:x", "use cpu, cuda or cuda:N")):
        code = main(["bench", str(tiny["a"]), "--data", str(tiny["images"]), "-o", str(tiny["root"] / "refused"),
                     "--label", "tiny-a=adam:0.013", "--device", device])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and words in err[0]
    assert not (tiny["root"] / "refused" / "results.json").exists()


def test_plan_variants_on_cuda() -> None:
    from lic_deploy.bench.runner import BenchOptions, Model, plan_variants

    model = Model("m", Path("m.pt"), "checkpoint", "soap", 0.013, 100, False, "0" * 64)
    opts = BenchOptions(data=Path("."), out=Path("."), precisions=("fp32", "fp16", "bf16", "int8"),
                        backends=("ort", "torch", "tensorrt"), device="cuda:1")
    plan = plan_variants(model, opts)
    keys = {v.key: v.device for v in plan}
    assert keys == {"ort:fp32": "cpu", "ort:fp16": "cpu", "ort:int8:minmax": "cpu",
                    "torch-cuda:fp32": "cuda:1", "torch-cuda:fp16": "cuda:1", "torch-cuda:bf16": "cuda:1",
                    "tensorrt:fp32": "cuda:1", "tensorrt:fp16": "cuda:1", "tensorrt:int8:minmax": "cuda:1"}
    cpu = {v.key for v in plan_variants(model, BenchOptions(data=Path("."), out=Path("."),
                                                            precisions=("fp32", "bf16"), backends=("ort", "torch")))}
    assert cpu == {"ort:fp32", "torch:fp32"}  # bf16 is a CUDA precision of the torch engine only


def test_synchronised_latency_through_a_stub() -> None:
    """Every timed run sits between two synchronisations; warm-up runs are not timed; the stage timer (input on
    the device) is used where the engine has one."""
    from lic_deploy.bench.latency import median_seconds
    from lic_deploy.bench.runner import synced_stage_ms

    calls: list[str] = []
    median_seconds(lambda: calls.append("run"), repeat=3, warmup=2, sync=lambda: calls.append("sync"))
    assert calls == ["run", "run", *["sync", "run", "sync"] * 3]

    from lic_deploy.runtime.package import Package

    class Stub:
        geometry: ClassVar[dict[str, int]] = {"pad_multiple": 64}
        pad = Package.pad

        def __init__(self) -> None:
            self.calls: list[tuple[str, ...]] = []

        def run(self, stage: str, x: np.ndarray) -> np.ndarray:
            self.calls.append(("run", stage))
            return np.ones((1, 4, x.shape[2] // 16, x.shape[3] // 16), np.float32)

        def synchronize(self) -> None:
            self.calls.append(("sync",))

        def stage_timer(self, stage: str, x: np.ndarray):
            self.calls.append(("stage", stage, str(x.shape)))
            return lambda: self.calls.append(("device", stage))

    stub = Stub()
    out = synced_stage_ms(stub, stub, np.zeros((3, 100, 70), np.float32), repeat=2, warmup=1)
    assert out["mode"] == "device-resident" and set(out["ms"]) == {"g_a", "h_a", "g_s"}
    assert ("stage", "g_a", "(1, 3, 128, 128)") in stub.calls and ("stage", "g_s", "(1, 4, 8, 8)") in stub.calls
    g_s = stub.calls[stub.calls.index(("stage", "g_s", "(1, 4, 8, 8)")) + 1:]
    assert g_s == [("device", "g_s"), ("sync",), ("device", "g_s"), ("sync",), ("sync",), ("device", "g_s"),
                   ("sync",)]


class CudaStandIn:
    """Stands in for the PyTorch CUDA engine on a machine without a GPU: the CPU torch engine in FP32 under the
    CUDA engine's name and precision (so its numbers are not GPU numbers; only the plumbing is tested)."""

    def __init__(self, inner: object, precision: str) -> None:
        self.inner, self.name, self.precision = inner, "torch", precision

    def run(self, stage: str, x: np.ndarray) -> np.ndarray:
        y = self.inner.run(stage, x)
        return y if self.precision == "fp32" else (y * (1 + 1e-3)).astype(np.float32)

    def synchronize(self) -> None:
        return None

    def stage_timer(self, stage: str, x: np.ndarray):
        return lambda: self.inner.run(stage, x)


@pytest.fixture(scope="module")
def gpu_doc(tiny: dict[str, Path]) -> dict:
    """A bench with --device cuda where torch on CUDA is the CPU stand-in and TensorRT is missing."""
    from lic_deploy.bench import runner
    from lic_deploy.runtime import codec as codec_module
    from lic_deploy.runtime import engines
    from lic_deploy.runtime.engines import create_engine

    def fake_create(package, backend="ort", precision="fp32", *, threads=None, device="cpu"):
        if backend == "tensorrt":
            raise BackendUnavailable("--backend tensorrt needs TensorRT: not installed (test stand-in)")
        if backend == "torch" and device != "cpu":
            return CudaStandIn(create_engine(package, "torch", "fp32", threads=threads), precision)
        return create_engine(package, backend, precision, threads=threads, device=device)

    mp = pytest.MonkeyPatch()
    mp.setattr(engines, "check_device", lambda device, hint: None)
    mp.setattr(codec_module, "create_engine", fake_create)
    try:
        opts = runner.BenchOptions(data=tiny["images"], out=tiny["root"] / "gpu", precisions=("fp32", "fp16", "bf16"),
                                   backends=("ort", "torch", "tensorrt"), repeat=1, threads=1, outlier_images=0,
                                   device="cuda", labels={"tiny-a": "adam:0.013", "tiny-b": "soap:0.013"})
        return runner.run_bench([tiny["a"], tiny["b"]], opts)
    finally:
        mp.undo()


def test_gpu_rows_latency_and_report(gpu_doc: dict, tiny: dict[str, Path]) -> None:
    from lic_deploy.bench.report import write_report

    engines = {(r["variant"], r["engine"], r["device"]) for r in gpu_doc["rows"]}
    assert engines == {("ort:fp32", "ort", "cpu"), ("ort:fp16", "ort", "cpu"),
                       ("torch-cuda:fp32", "torch-cuda", "cuda"), ("torch-cuda:fp16", "torch-cuda", "cuda"),
                       ("torch-cuda:bf16", "torch-cuda", "cuda")}
    gpu_lat = [r for r in gpu_doc["latency"] if r["device"] == "cuda"]
    assert len(gpu_lat) == 6 and all(set(r["synced"]["ms"]) == {"g_a", "h_a", "g_s"} for r in gpu_lat)
    assert {s["variant"] for s in gpu_doc["skipped"]} == {"tensorrt:fp32", "tensorrt:fp16"}
    an = gpu_doc["analysis"]
    table = {r["variant"]: r for r in an["gpu_latency"]}
    assert set(table) == {"torch-cuda:fp32", "torch-cuda:fp16", "torch-cuda:bf16"}
    assert table["torch-cuda:fp32"]["codec_vs_baseline"] == pytest.approx(1.0)
    assert table["torch-cuda:fp16"]["decode_fps"] == pytest.approx(1000 / table["torch-cuda:fp16"]["decode_ms"])
    assert {e["variant"]: e["anchor"] for e in an["ptq_loss"] if e["variant"].startswith("torch-cuda")} == \
        {"torch-cuda:fp16": "torch-cuda:fp32", "torch-cuda:bf16": "torch-cuda:fp32"}
    assert "--device cuda" in gpu_doc["command"]
    report = write_report(gpu_doc, tiny["root"] / "gpu-report").read_text()
    assert "## GPU latency" in report and "| torch-cuda:bf16 | cuda |" in report
    assert "tensorrt:fp32 (2 models: tiny-a, tiny-b): --backend tensorrt needs TensorRT" in report
    assert (tiny["root"] / "gpu-report" / "gpu_latency.png").read_bytes()[:4] == b"\x89PNG"


def test_report_says_why_without_gpu_rows(gpu_doc: dict) -> None:
    from lic_deploy.bench.compare import analyse
    from lic_deploy.bench.report import render

    cpu_only = copy.deepcopy(gpu_doc)
    for key in ("rows", "summaries", "latency"):
        cpu_only[key] = [r for r in cpu_only[key] if r.get("device") == "cpu"]
    cpu_only["skipped"] = [{**s, "reason": "--device cuda: no GPU here"} for s in cpu_only["skipped"]]
    text = render(cpu_only, analyse(cpu_only))
    assert "No GPU rows: --device cuda: no GPU here." in text


def test_merge_a_cpu_run_and_a_gpu_run(gpu_doc: dict, tiny: dict[str, Path],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from lic_deploy.bench.merge import merge_results
    from lic_deploy.bench.runner import write_json
    from lic_deploy.cli import main

    cpu = copy.deepcopy(gpu_doc)
    gpu = copy.deepcopy(gpu_doc)
    for doc, keep in ((cpu, "cpu"), (gpu, "cuda")):
        for key in ("rows", "summaries", "latency"):
            doc[key] = [r for r in doc[key] if r["device"] == keep or (keep == "cuda" and r["variant"] == "ort:fp32")]
    for r in gpu["summaries"]:  # the GPU machine's own ort:fp32 differs: the first run's must win
        r["psnr"] += 1.0 if r["variant"] == "ort:fp32" else 0.0
    cpu["skipped"] = [{"model": "tiny-a", "variant": "torch-cuda:fp32", "reason": "no GPU", "device": "cuda"}]
    gpu["settings"] = {**gpu["settings"], "repeat": cpu["settings"]["repeat"] + 7}
    merged = merge_results([cpu, gpu], ["cpu.json", "gpu.json"])
    variants = {(s["model"], s["variant"]) for s in merged["summaries"]}
    assert len(variants) == len(merged["summaries"]) == 2 * 5
    ort = [s for s in merged["summaries"] if s["variant"] == "ort:fp32"]
    assert ort == [s for s in cpu["summaries"] if s["variant"] == "ort:fp32"]
    assert all(s["variant"].startswith("tensorrt") for s in merged["skipped"])  # torch-cuda was measured after all
    assert [s["file"] for s in merged["sources"]] == ["cpu.json", "gpu.json"] and "analysis" not in merged
    for path, doc in (("cpu.json", cpu), ("gpu.json", gpu)):
        write_json(tiny["root"] / path, doc)
    out = tiny["root"] / "merged"
    assert main(["report", str(tiny["root"] / "cpu.json"), str(tiny["root"] / "gpu.json"), "-o", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "Merged by `lic-deploy report` from 2 runs" in report and "## GPU latency" in report
    for doc in (cpu, gpu):  # each run's own settings, not the first run's for both
        assert f"latency: median of {doc['settings']['repeat']} runs" in report
    assert "settings differ between the runs" in report
    assert json.loads((out / "results.json").read_text())["sources"][1]["file"].endswith("gpu.json")
    assert main(["report", str(tiny["root"] / "cpu.json"), str(tiny["root"] / "gpu.json")]) == 2
    assert "needs -o DIR" in capsys.readouterr().err
    other = copy.deepcopy(gpu)
    other["settings"]["images"] = ["img0.png"]
    with pytest.raises(LicError, match="other images"):
        merge_results([cpu, other])
    other = copy.deepcopy(gpu)
    other["models"][0]["sha256"] = "f" * 64
    with pytest.raises(LicError, match="another file"):
        merge_results([cpu, other])


def test_prepared_gpu_script_refuses_without_a_gpu(tiny: dict[str, Path]) -> None:
    """scripts/bench_gpu.sh: usage without models; on a machine without CUDA, the bench's one-line refusal."""
    import subprocess
    import sys

    import torch

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.sh"
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PY": sys.executable, "DATA": str(tiny["images"]),
           "OUT": str(tiny["root"] / "script-out")}
    usage = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "usage: scripts/bench_gpu.sh MODEL" in usage.stderr
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    run = subprocess.run(["bash", str(script), str(tiny["a"]), "--label", "tiny-a=adam:0.013"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].startswith("lic-deploy: error: --device cuda")
