"""`make bench-export`: export time and per-stage latency of ONNX Runtime (FP32, INT8 Q/DQ, INT8 U8S8, FP16)
against PyTorch FP32 on one 768x512 image, medians after warm-up, all in one run on this machine."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from lic_deploy.bench.latency import format_table, median_seconds
from lic_deploy.runtime.engines import create_engine
from lic_deploy.runtime.images import data_folder, load_rgb
from lic_deploy.runtime.package import Package


def bench_image() -> tuple[np.ndarray, str]:
    """Kodak's kodim01 (768x512) when $LIC_DEPLOY_DATA has kodak/, else scikit-image's astronaut edge-padded."""
    kodak = data_folder("kodak")
    if kodak and (kodak / "kodim01.png").is_file():
        img, _ = load_rgb(kodak / "kodim01.png")
        return img[None], "kodim01.png"
    from lic_deploy.export.calibration import skimage_folder

    img, _ = load_rgb(skimage_folder() / "astronaut.png")
    return np.pad(img, ((0, 0), (0, 0), (0, 256)), mode="edge")[None], "astronaut.png padded to 768x512"


def stage_latencies(package: Package, image: np.ndarray, variants: list[tuple[str, str]], *, threads: int,
                    repeat: int) -> dict[str, dict[str, float]]:
    """Median seconds per (backend:precision) and stage, each stage fed its real input from the FP32 path."""
    ref = create_engine(package, "ort", "fp32", threads=threads)
    x, _, _ = package.pad(image[0])
    y = ref.run("g_a", x[None])
    z = ref.run("h_a", y)
    inputs = {"g_a": x[None], "h_a": y, "h_s": np.round(z), "g_s": np.round(y)}
    out: dict[str, dict[str, float]] = {}
    for backend, precision in variants:
        engine = create_engine(package, backend, precision, threads=threads)
        out[f"{backend}:{precision}"] = {
            stage: median_seconds(lambda s=stage, e=engine: e.run(s, inputs[s]), repeat=repeat, warmup=2)
            for stage in ("g_a", "h_a", "h_s", "g_s")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", help="checkpoint to export (default: random mbt2018-mean N=128 M=192)")
    parser.add_argument("--out", default="out/bench-export")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    import torch

    from lic_deploy.export.package_writer import ExportOptions, export_package

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = args.checkpoint
    if ckpt is None:
        from lic_deploy.bench.synthetic import random_checkpoint

        ckpt = random_checkpoint(out / "random-mbt2018-mean-128-192.pt")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pkg_dir = export_package(ckpt, out / "package", options=ExportOptions(
        precisions=("fp32", "int8", "int8-u8s8", "fp16"), overwrite=True), log=lambda _: None)
    export_s = time.perf_counter() - t0
    package = Package.open(pkg_dir)
    image, name = bench_image()
    variants = [("torch", "fp32"), ("ort", "fp32"), ("ort", "int8"), ("ort", "int8-u8s8"), ("ort", "fp16")]
    lat = stage_latencies(package, image, variants, threads=args.threads, repeat=args.repeat)
    base = lat["torch:fp32"]
    rows = []
    for key, stages in lat.items():
        gags = stages["g_a"] + stages["g_s"]
        rows.append([key, *(1000 * stages[s] for s in ("g_a", "h_a", "h_s", "g_s")), 1000 * gags,
                     gags / (base["g_a"] + base["g_s"])])
    print(f"export (fp32+int8+int8-u8s8+fp16, {args.threads} threads): {export_s:.1f} s")
    print(f"image: {name}, {image.shape[3]}x{image.shape[2]}; medians of {args.repeat} runs after 2 warm-up, "
          f"{args.threads} threads")
    print(format_table(["engine", "g_a ms", "h_a ms", "h_s ms", "g_s ms", "g_a+g_s ms", "vs torch fp32"], rows))
    (out / "results.json").write_text(json.dumps({"export_seconds": export_s, "image": name,
                                                  "threads": args.threads, "median_seconds": lat}, indent=1))


if __name__ == "__main__":
    main()
