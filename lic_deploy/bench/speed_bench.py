"""`make bench-speed`: where the codec's time goes, step by step, against CompressAI's own float codec.

For each checkpoint (exported here with FP32 and INT8 graphs) and each image, in one run on this machine:
lic-deploy with ONNX Runtime FP32 and INT8, encode and decode split into g_a, h_a, integer h_s (TCM: every
integer program, slices and LRP included), the rest of the entropy side (tables, range coding; ELIC's integer
context networks), container (packing / parsing the .lic file) and g_s; and CompressAI's `compress` /
`decompress` of the same model (PyTorch FP32, its float entropy path), with its g_a and g_s timed alone on the
same input. Medians over `--repeat` runs per image after one warm-up, the runs of all paths interleaved (one of
each per round), so that the machine's drift falls on all alike.

    python -m lic_deploy.bench.speed_bench CKPT... --data ../shared/data/kodak [--images 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

from lic_deploy.bench.latency import format_table
from lic_deploy.errors import LicError

LIC_STEPS = ("g_a", "h_a", "entropy_hs", "entropy_rest", "container")
DEC_STEPS = ("container", "entropy_hs", "entropy_rest", "g_s")


def lic_once(codec: Any, image: Any) -> dict[str, float]:
    """Seconds of each encode and decode step and of both wholes, for one encode + decode."""
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
    return row | {"encode": t1 - t0, "decode": t2 - t1}


def compressai_once(model: Any, x: Any) -> dict[str, float]:
    """Seconds of CompressAI's compress and decompress, and of its g_a and g_s alone, once each."""
    import torch

    t = torch.from_numpy(x)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.compress(t)
        t1 = time.perf_counter()
        model.decompress(out["strings"], out["shape"])
        t2 = time.perf_counter()
        y = model.g_a(t)
        t3 = time.perf_counter()
        model.g_s(torch.round(y))
        t4 = time.perf_counter()
    return {"encode": t1 - t0, "decode": t2 - t1, "g_a": t3 - t2, "g_s": t4 - t3}


def interleaved_profile(runs: dict[str, Any], repeat: int) -> dict[str, dict[str, float]]:
    """Median milliseconds per step for each of `runs` (name -> zero-argument function returning seconds per
    step), after one warm-up each; the repetitions are interleaved (each name once per round), so that drift in
    the machine's speed falls on every path alike."""
    for fn in runs.values():
        fn()
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, fn in runs.items():
            rounds[name].append(fn())
    return {name: {k: 1000 * statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in rounds.items()}


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
                        help="lic-deploy paths, BACKEND[-cuda]:PRECISION[@INTNET], comma-separated (default "
                        "ort:fp32,ort:int8; on a GPU: torch-cuda:fp32,torch-cuda:fp16, whose integer networks then run "
                        "on the GPU; @ort, @numpy or @torch:DEVICE chooses where the integer networks run)")
    parser.add_argument("--entropy-bits", default="16",
                        help="activation widths of the integer entropy model to export and time, comma-separated: "
                        "16 (default), 8 (`export --entropy-bits 8`; its paths are labelled e8) or 16,8")
    args = parser.parse_args(argv)
    bits_list = [b.strip() for b in args.entropy_bits.split(",") if b.strip()]
    if not bits_list or any(b not in ("8", "16") for b in bits_list):
        raise LicError(f"--entropy-bits {args.entropy_bits!r}: expected 16, 8 or 16,8")
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    from lic_deploy.entropy import evaluators
    from lic_deploy.runtime.engines import check_device
    from lic_deploy.runtime.package import ENGINE_PRECISIONS

    for path in paths:
        engine_path, _, intnet = path.partition("@")
        backend, _, precision = engine_path.partition(":")
        if backend not in ("ort", "torch", "torch-cuda") or precision not in ENGINE_PRECISIONS:
            raise LicError(f"--paths {path!r}: expected ort:PRECISION, torch:fp32 or torch-cuda:PRECISION")
        if intnet:
            evaluators.check(intnet)
        if backend == "torch-cuda":
            check_device("cuda", "run the GPU paths on a machine with an NVIDIA GPU")
    import torch

    from lic_deploy.archs.checkpoint import load_model
    from lic_deploy.export.package_writer import ExportOptions, export_package
    from lic_deploy.runtime.codec import Codec
    from lic_deploy.runtime.images import list_images, load_rgb

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = list_images(args.data)[: args.images or None]
    results: dict[str, Any] = {"images": [f.name for f in files], "threads": args.threads, "repeat": args.repeat,
                               "models": {}}
    rows, totals = [], []
    for ckpt in args.checkpoints:
        name = Path(ckpt).stem
        graphs = sorted({p.partition("@")[0].split(":")[1] for p in paths if p.startswith("ort")} | {"fp32"})
        pkgs = {bits: export_package(ckpt, out / (name if bits == "16" else f"{name}.e{bits}"), log=lambda _: None,
                                     options=ExportOptions(precisions=graphs, entropy_act_bits=int(bits),
                                                           overwrite=True)) for bits in bits_list}
        loaded = load_model(ckpt)
        model = loaded.model.eval()
        model.update(force=True)
        codecs = {}
        for path in paths:
            engine_path, _, intnet = path.partition("@")
            backend, precision = engine_path.split(":")
            engine, _, device = backend.partition("-")
            for bits, pkg in pkgs.items():
                codecs[path if bits == "16" else f"{path} e{bits}"] = Codec(
                    pkg, engine, precision, threads=args.threads, device=device or "cpu", intnet=intnet or None)
        per_image: dict[str, list[dict[str, float]]] = {**{p: [] for p in codecs}, "compressai": []}
        for f in files:
            image, _ = load_rgb(f)
            x = next(iter(codecs.values())).package.pad(image)[0][None]
            runs = {p: partial(lic_once, codec, image) for p, codec in codecs.items()}
            runs["compressai"] = partial(compressai_once, model, x)
            for p, r in interleaved_profile(runs, args.repeat).items():
                per_image[p].append({"image": f.name, **r})
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
        format_table(["model", "path", "enc+dec vs CompressAI", "integer h_s (TCM: every program), % of decode",
                      "decode fps"], totals)])
    print(text)
    (out / "report.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
