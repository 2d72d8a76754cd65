"""`make bench-codec`: the deterministic codec against CompressAI's own float path, same models, same images.

For each checkpoint (ideally four lambdas of one model family) and image it measures, with real bitstreams:
- lic-deploy, ONNX Runtime FP32 and INT8 transforms, integer entropy model with int16 activations (default)
  and with int8 activations: bytes of the .lic file (container included), PSNR, encode and decode seconds;
- CompressAI `compress`/`decompress` (float h_s, float tables, its rANS), PyTorch FP32: bytes, PSNR, seconds
  (for TCM, the model's own float reference codec, `archs.tcm_model.TCM.compress`/`decompress`);
- entropy coder throughput on the real y symbols: constriction range coder vs CompressAI's rANS.
Then BD-rate (pchip) of the integer entropy model against the float one. Medians over images after warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from lic_deploy.bench.bdrate import bd_text, try_bd_rate
from lic_deploy.bench.latency import format_table, median_seconds
from lic_deploy.entropy.bitstream import unpack
from lic_deploy.runtime.images import list_images, load_rgb, pad_to_multiple, psnr, to_uint8


def compressai_run(model: Any, x: np.ndarray, h: int, w: int) -> dict[str, float]:
    """CompressAI's float path on a padded image [1, 3, Hp, Wp]: bytes, PSNR and seconds."""
    import torch

    t = torch.from_numpy(x)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.compress(t)
        t1 = time.perf_counter()
        rec = model.decompress(out["strings"], out["shape"])["x_hat"]
        t2 = time.perf_counter()
    nbytes = sum(len(s) for strings in out["strings"] for s in strings)
    img = to_uint8(rec[0].numpy()[:, :h, :w])
    return {"bytes": nbytes, "psnr": psnr(img, to_uint8(x[0, :, :h, :w])), "enc_s": t1 - t0, "dec_s": t2 - t1}


def lic_run(codec: Any, image: np.ndarray) -> dict[str, float]:
    t0 = time.perf_counter()
    data, _ = codec.encode_array(image)
    t1 = time.perf_counter()
    out = codec.decode(data)
    t2 = time.perf_counter()
    return {"bytes": len(data), "psnr": psnr(out.image, to_uint8(image)), "enc_s": t1 - t0, "dec_s": t2 - t1,
            "payload_bytes": sum(len(p) for p in unpack(data)[1])}


def _mean_bpp(rows: list[dict[str, float]], images: list[np.ndarray], key: str) -> float:
    """Mean bits per pixel of each row's `key` bytes (CompressAI's rows have only `bytes`: all payload)."""
    return float(np.mean([8 * r.get(key, r["bytes"]) / (i.shape[1] * i.shape[2])
                          for r, i in zip(rows, images, strict=True)]))


def coder_throughput(package: Path, image: np.ndarray, model: Any) -> dict[str, float]:
    """Symbols per second of both coders on one image's y symbols and table indexes (median of 5 runs)."""
    from compressai.ans import RansDecoder, RansEncoder

    from lic_deploy.entropy.coder import EscapeReader
    from lic_deploy.runtime.codec import Codec

    codec = Codec(package)
    x, _, _ = pad_to_multiple(image, 64)
    em = codec.entropy
    y = codec.engine.run("g_a", x[None])[0]
    z = codec.engine.run("h_a", y[None])[0]
    index, mean_fp = em.params(em.z_symbols(z))
    sym = np.floor(y - mean_fp / 2**em.param_frac_bits + 0.5).astype(np.int64)
    n = sym.size
    esc: list[int] = []
    data = em.y_coder.encode(sym, index, esc)
    from lic_deploy.entropy.coder import encode_escapes

    esc_bytes = encode_escapes(esc)
    c_enc = median_seconds(lambda: em.y_coder.encode(sym, index, []), repeat=5)
    c_dec = median_seconds(lambda: em.y_coder.decode(data, index, EscapeReader(esc_bytes)), repeat=5)
    model.update(force=True)  # CompressAI's tables; its C++ coder reads out of bounds without them
    gc = model.gaussian_conditional
    cdf, lengths, offsets = gc._quantized_cdf.tolist(), gc._cdf_length.tolist(), gc._offset.tolist()
    s_list, i_list = sym.reshape(-1).tolist(), index.reshape(-1).astype(np.int32).tolist()
    rans = RansEncoder().encode_with_indexes(s_list, i_list, cdf, lengths, offsets)
    r_enc = median_seconds(lambda: RansEncoder().encode_with_indexes(s_list, i_list, cdf, lengths, offsets), repeat=5)
    r_dec = median_seconds(lambda: RansDecoder().decode_with_indexes(rans, i_list, cdf, lengths, offsets), repeat=5)
    return {"symbols": n, "constriction_enc_msym_s": n / c_enc / 1e6, "constriction_dec_msym_s": n / c_dec / 1e6,
            "rans_enc_msym_s": n / r_enc / 1e6, "rans_dec_msym_s": n / r_dec / 1e6,
            "constriction_bytes": len(data), "rans_bytes": len(rans)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoints of one family at different lambdas")
    parser.add_argument("--data", required=True, help="test images (Kodak)")
    parser.add_argument("--images", type=int, default=0, help="use only the first N images (0: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="out/bench-codec")
    args = parser.parse_args()
    import torch

    from lic_deploy.archs.checkpoint import load_model
    from lic_deploy.export.package_writer import ExportOptions, export_package
    from lic_deploy.runtime.codec import Codec

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = list_images(args.data)[: args.images or None]
    images = [load_rgb(f)[0] for f in files]
    results: dict[str, Any] = {"images": [f.name for f in files], "threads": args.threads, "models": {}}
    for ckpt in args.checkpoints:
        name = Path(ckpt).stem
        loaded = load_model(ckpt)
        model = loaded.model
        # int8 entropy activations are an option of the hyperprior family and ELIC (TCM's programs are int16)
        widths = (16,) if loaded.arch == "tcm" else (16, 8)
        pkgs = {bits: export_package(ckpt, out / f"{name}.e{bits}", log=lambda _: None, options=ExportOptions(
            precisions=("fp32", "int8"), entropy_act_bits=bits, overwrite=True)) for bits in widths}
        model.update(force=True)
        variants = {"lic-ort-fp32": Codec(pkgs[16], "ort", "fp32", threads=args.threads),
                    "lic-ort-int8": Codec(pkgs[16], "ort", "int8", threads=args.threads)}
        if 8 in pkgs:
            variants["lic-ort-fp32-e8"] = Codec(pkgs[8], "ort", "fp32", threads=args.threads)
        pad = variants["lic-ort-fp32"].package.pad
        rows: dict[str, list[dict[str, float]]] = {k: [] for k in (*variants, "compressai")}
        lic_run(variants["lic-ort-fp32"], images[0])  # warm-up
        compressai_run(model, pad(images[0])[0][None], *images[0].shape[1:])
        for img in images:
            for key, codec in variants.items():
                rows[key].append(lic_run(codec, img))
            rows["compressai"].append(compressai_run(model, pad(img)[0][None], *img.shape[1:]))
        summary = {k: {"bpp": _mean_bpp(v, images, "bytes"), "payload_bpp": _mean_bpp(v, images, "payload_bytes"),
                       "psnr": float(np.mean([r["psnr"] for r in v])),
                       "enc_s": statistics.median(r["enc_s"] for r in v),
                       "dec_s": statistics.median(r["dec_s"] for r in v)} for k, v in rows.items()}
        results["models"][name] = {"summary": summary, "rows": rows}
        print(f"{name}: " + ", ".join(f"{k} {s['bpp']:.4f} bpp {s['psnr']:.2f} dB" for k, s in summary.items()))
    first = load_model(args.checkpoints[0])
    if first.arch not in ("elic", "tcm"):  # the throughput comparison codes one hyperprior y tensor with both coders
        results["coder"] = coder_throughput(out / f"{Path(args.checkpoints[0]).stem}.e16", images[0], first.model)
    _report(results, out)


def _report(results: dict[str, Any], out: Path) -> None:
    models = results["models"]
    lines = [f"images: {len(results['images'])}, threads: {results['threads']}"]
    rows = []
    for name, m in models.items():
        s = m["summary"]
        base = s["compressai"]
        for key, v in s.items():
            rows.append([name, key, v["bpp"], v["psnr"], 1000 * v["enc_s"], 1000 * v["dec_s"],
                         (v["enc_s"] + v["dec_s"]) / (base["enc_s"] + base["dec_s"])])
    lines.append(format_table(["model", "path", "bpp", "PSNR dB", "encode ms", "decode ms",
                               "enc+dec vs CompressAI"], rows))
    lines.append("Per model against CompressAI (same model and images): bpp change %, PSNR change dB")
    lines.append(format_table(["model", "path", "bpp change %", "PSNR change dB"], [
        [name, key, 100 * (v["bpp"] / m["summary"]["compressai"]["bpp"] - 1),
         v["psnr"] - m["summary"]["compressai"]["psnr"]]
        for name, m in models.items() for key, v in m["summary"].items() if key != "compressai"]))
    if len(models) >= 4:
        curve = {k: ([m["summary"][k]["bpp"] for m in models.values()],
                     [m["summary"][k]["psnr"] for m in models.values()])
                 for k in next(iter(models.values()))["summary"]}
        bd = {k: try_bd_rate(*curve["compressai"], *curve[k]) for k in curve if k != "compressai"}
        results["bd_rate_vs_compressai_percent"] = {k: v for k, (v, _) in bd.items()}
        lines.append("BD-rate (pchip) against CompressAI's float entropy path, same model, real bitstreams:")
        lines += [f"  {k}: {bd_text(*v)}" for k, v in bd.items()]
        # the streams alone: the entropy path's own cost, without the .lic container's fixed bytes
        payload = {k: try_bd_rate(*curve["compressai"], [m["summary"][k]["payload_bpp"] for m in models.values()],
                                  curve[k][1]) for k in curve if k != "compressai"}
        results["payload_bd_rate_vs_compressai_percent"] = {k: v for k, (v, _) in payload.items()}
        lines.append("the same, payload only (the streams without the .lic container):")
        lines += [f"  {k}: {bd_text(*v)}" for k, v in payload.items()]
    c = results.get("coder")
    if c is not None:
        lines.append(f"entropy coder on {c['symbols']} y symbols: constriction {c['constriction_enc_msym_s']:.1f} / "
                     f"{c['constriction_dec_msym_s']:.1f} Msym/s encode/decode, CompressAI rANS "
                     f"{c['rans_enc_msym_s']:.1f} / {c['rans_dec_msym_s']:.1f} Msym/s (including its list "
                     f"conversion); {c['constriction_bytes']} vs {c['rans_bytes']} bytes")
    text = "\n".join(lines)
    print(text)
    (out / "report.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
