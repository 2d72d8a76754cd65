"""`make bench-speed`: where the codec's time goes, step by step, against CompressAI's own float codec.

For each checkpoint (exported here with FP32 and INT8 graphs) and each image, in one run on this machine:
lic-deploy with ONNX Runtime FP32 and INT8, encode and decode split into g_a, h_a, integer h_s, the rest of the
entropy side (tables, range coding; ELIC's integer context networks), container (packing / parsing the .lic file)
and g_s; and CompressAI's `compress` / `decompress` of the same model (PyTorch FP32, its float entropy path),
with its g_a and g_s timed alone on the same input. Medians over `--repeat` runs per image after one warm-up.

    python -m lic_deploy.bench.speed_bench CKPT... --data ../shared/data/kodak [--images 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from lic_deploy.bench.latency import format_table, median_seconds
from lic_deploy.errors import LicError

LIC_STEPS = ("g_a", "h_a", "entropy_hs", "entropy_rest", "container")
DEC_STEPS = ("container", "entropy_hs", "entropy_rest", "g_s")


def lic_profile(codec: Any, image: Any, repeat: int) -> dict[str, float]:
    """Median milliseconds of each encode and decode step and of both wholes, over `repeat` runs."""
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        data, _ = codec.encode_array(image)
        t1 = time.perf_counter()
        enc = dict(codec.timings)
        codec.decode(data)
        t2 = time.perf_counter()
        dec = dict(codec.timings)
        row = {f"enc_{k}": enc[k] for k in ("g_a", "h_a", "entropy_hs", "container")}
        row["enc_entropy_rest"] = enc["entropy"] - enc["entropy_hs"]
        row |= {f"dec_{k}": dec[k] for k in ("container", "entropy_hs", "g_s")}
        row["dec_entropy_rest"] = dec["entropy"] - dec["entropy_hs"]
        row |= {"encode": t1 - t0, "decode": t2 - t1}
        runs.append(row)
    return {k: 1000 * statistics.median(r[k] for r in runs) for k in runs[0]}


def compressai_profile(model: Any, x: Any, repeat: int) -> dict[str, float]:
    """Median milliseconds of CompressAI's compress and decompress, and of its g_a and g_s alone."""
    import torch

    t = torch.from_numpy(x)
    with torch.no_grad():
        out = model.compress(t)
        y = model.g_a(t)
        times = {"encode": median_seconds(lambda: model.compress(t), repeat=repeat),
                 "decode": median_seconds(lambda: model.decompress(out["strings"], out["shape"]), repeat=repeat),
                 "g_a": median_seconds(lambda: model.g_a(t), repeat=repeat),
                 "g_s": median_seconds(lambda: model.g_s(torch.round(y)), repeat=repeat)}
    return {k: 1000 * v for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; a path this machine cannot run (no CUDA, an unknown precision) is one line, exit 2."""
    import sys

    try:
        return run(argv)
    except LicError as exc:
        print(f"speed_bench: error: {exc}", file=sys.stderr)
        return 2


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoints or .safetensors of any supported architecture")
    parser.add_argument("--data", required=True, help="test images (Kodak)")
    parser.add_argument("--images", type=int, default=4, help="the first N images (4; 0 = all)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per image and path (3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="out/bench-speed")
    parser.add_argument("--paths", default="ort:fp32,ort:int8",
                        help="lic-deploy paths, BACKEND[-cuda]:PRECISION, comma-separated (default ort:fp32,ort:int8; "
                        "on a GPU: torch-cuda:fp32,torch-cuda:fp16, whose integer networks then run on the GPU)")
    args = parser.parse_args(argv)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    from lic_deploy.runtime.engines import check_device
    from lic_deploy.runtime.package import ENGINE_PRECISIONS

    for path in paths:
        backend, _, precision = path.partition(":")
        if backend not in ("ort", "torch", "torch-cuda") or precision not in ENGINE_PRECISIONS:
            raise LicError(f"--paths {path!r}: expected ort:PRECISION, torch:fp32 or torch-cuda:PRECISION")
        if backend == "torch-cuda":
            check_device("cuda", "run the GPU paths on a machine with an NVIDIA GPU")
    import torch

    from lic_deploy.archs.checkpoint import load_model
    from lic_deploy.export.package_writer import ExportOptions, export_package
    from lic_deploy.runtime.codec import Codec
    from lic_deploy.runtime.images import list_images, load_rgb, pad_to_multiple

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = list_images(args.data)[: args.images or None]
    results: dict[str, Any] = {"images": [f.name for f in files], "threads": args.threads, "repeat": args.repeat,
                               "models": {}}
    rows, totals = [], []
    for ckpt in args.checkpoints:
        name = Path(ckpt).stem
        graphs = sorted({p.split(":")[1] for p in paths if p.startswith("ort")} | {"fp32"})
        pkg = export_package(ckpt, out / name, log=lambda _: None,
                             options=ExportOptions(precisions=graphs, overwrite=True))
        loaded = load_model(ckpt)
        model = loaded.model.eval()
        model.update(force=True)
        codecs = {}
        for path in paths:
            backend, precision = path.split(":")
            engine, _, device = backend.partition("-")
            codecs[path] = Codec(pkg, engine, precision, threads=args.threads, device=device or "cpu")
        per_image: dict[str, list[dict[str, float]]] = {**{p: [] for p in codecs}, "compressai": []}
        for f in files:
            image, _ = load_rgb(f)
            x = pad_to_multiple(image, next(iter(codecs.values())).package.geometry["pad_multiple"])[0][None]
            for p, codec in codecs.items():
                codec.decode(codec.encode_array(image)[0])  # warm-up
                per_image[p].append({"image": f.name, **lic_profile(codec, image, args.repeat)})
            compressai_profile(model, x, 1)
            per_image["compressai"].append({"image": f.name, **compressai_profile(model, x, args.repeat)})
        results["models"][name] = {"arch": loaded.arch, "config": loaded.config, "per_image": per_image}
        for i, f in enumerate(files):
            ca = per_image["compressai"][i]
            for p in codecs:
                r = per_image[p][i]
                rows.append([name, f.name, p, *(r[f"enc_{s}"] for s in LIC_STEPS), r["encode"],
                             *(r[f"dec_{s}"] for s in DEC_STEPS), r["decode"], 1000 / r["decode"],
                             (r["encode"] + r["decode"]) / (ca["encode"] + ca["decode"])])
            rows.append([name, f.name, "CompressAI", ca["g_a"], "", "", "", "", ca["encode"], "", "", "", ca["g_s"],
                         ca["decode"], 1000 / ca["decode"], 1.0])
        for p in codecs:
            ratio = statistics.median((r["encode"] + r["decode"]) / (c["encode"] + c["decode"])
                                      for r, c in zip(per_image[p], per_image["compressai"], strict=True))
            hs = statistics.median(r["dec_entropy_hs"] / r["decode"] for r in per_image[p])
            fps = statistics.median(1000 / r["decode"] for r in per_image[p])
            totals.append([name, p, ratio, 100 * hs, fps])
    headers = ["model", "image", "path", *(f"enc {s} ms" for s in LIC_STEPS), "encode ms",
               *(f"dec {s} ms" for s in DEC_STEPS), "decode ms", "decode fps", "enc+dec vs CompressAI"]
    text = "\n".join([
        f"{len(files)} images, {args.threads} threads, medians of {args.repeat} runs after a warm-up (ms). "
        "CompressAI: compress/decompress whole, its g_a and g_s timed alone on the same input.",
        format_table(headers, rows), "",
        "Per model and path, medians over the images:",
        format_table(["model", "path", "enc+dec vs CompressAI", "integer h_s, % of decode", "decode fps"], totals)])
    print(text)
    (out / "report.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
