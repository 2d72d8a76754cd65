"""`make demo`: the main job on the embedded default (ONNX Runtime on CPU).

With the shipped Adam/SOAP pairs in `models/`: a quick `lic-deploy bench` (a few Kodak images, FP32 and INT8,
min-max calibration) that prints the headline table, INT8 PTQ loss for Adam and for SOAP.
Without them (a fresh checkout before the model set is trained): the pipeline end to end on a SOAP model
trained for a minute: export with INT8 Q/DQ graphs, encode test images with FP32 and INT8 transforms, decode
every stream with both, and print rate, quality and timing, checking that all decodes agree on the latents.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from lic_deploy.bench.latency import format_table

SHIPPED = Path("models/mbt-soap-0.013.safetensors")


def quick_bench(models: list[Path], data: Path, out: Path) -> None:
    from lic_deploy.bench.compare import analyse
    from lic_deploy.bench.report import headline_text, write_report
    from lic_deploy.bench.runner import BenchOptions, run_bench

    calib = "calib/train-64.json" if (data / "train").is_dir() else None
    if calib:
        os.environ.setdefault("LIC_DEPLOY_DATA", str(data.resolve()))
    opts = BenchOptions(data=data / "kodak", out=out / "bench", precisions=("fp32", "int8"), images=2,
                        calib=calib, calib_count=4, repeat=2, outlier_images=1)
    results = run_bench(models, opts)
    an = analyse(results)
    write_report(results, opts.out, an=an)
    print(headline_text(an))
    print(f"\nfull report: {opts.out / 'report.md'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data", help="folder with kodak/ and train/ (optional)")
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args()
    from lic_deploy.export.calibration import SKIMAGE_PHOTOS, skimage_folder
    from lic_deploy.export.package_writer import ExportOptions, export_package
    from lic_deploy.runtime.codec import Codec
    from lic_deploy.runtime.images import list_images, load_rgb, psnr, to_uint8
    from lic_deploy.runtime.package import Package

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    pairs = sorted(p for p in Path("models").glob("mbt-*.safetensors") if "-eq-" not in p.name)
    if len(pairs) >= 2 and (data / "kodak").is_dir():
        quick_bench(pairs, data, out)
        return
    kodak, train_dir = data / "kodak", data / "train"
    tests = list_images(kodak)[: args.images] if kodak.is_dir() else \
        [skimage_folder() / n for n in SKIMAGE_PHOTOS[: args.images]]
    ckpt = SHIPPED
    if not ckpt.is_file():
        from lic_deploy.train.loop import TrainConfig, train

        print(f"{SHIPPED} not found: training a small SOAP model for 150 steps first")
        ckpt = out / "demo-soap.pt"
        source = str(train_dir) if train_dir.is_dir() else str(skimage_folder())
        train(TrainConfig(data=source, output=str(ckpt), optimizer="soap", N=32, M=48, steps=150, batch=4,
                          patch=128, log_every=50, align_every=50, ckpt_every=150, val_every=150, threads=2,
                          resume=str(ckpt) if ckpt.is_file() else None))
    t0 = time.perf_counter()
    pkg = export_package(ckpt, out / "package", options=ExportOptions(
        precisions=("fp32", "int8"), calib=train_dir if train_dir.is_dir() else None, overwrite=True, footprint=True))
    footprint = Package.open(pkg).manifest["footprint"]
    print(f"export: {time.perf_counter() - t0:.1f} s; decoding needs about {footprint['bytes_per_pixel']} bytes of "
          "memory per pixel (measured)\n")
    codecs = {p: Codec(pkg, "ort", p, threads=2) for p in ("fp32", "int8")}
    rows = []
    for path in tests:
        img, _ = load_rgb(path)
        ref = to_uint8(img)
        for enc_p, codec in codecs.items():
            t = time.perf_counter()
            data_bytes, y_hat = codec.encode_array(img)
            enc_ms = 1000 * (time.perf_counter() - t)
            for dec_p, dec in codecs.items():
                t = time.perf_counter()
                decoded = dec.decode(data_bytes)
                dec_ms = 1000 * (time.perf_counter() - t)
                assert np.array_equal(decoded.y_hat, y_hat), "latents differ across precisions"
                rows.append([path.name, enc_p, dec_p, len(data_bytes), 8 * len(data_bytes) / (img.shape[1] *
                             img.shape[2]), psnr(decoded.image, ref), enc_ms, dec_ms])
    print(format_table(["image", "encode", "decode", "bytes", "bpp", "PSNR dB", "encode ms", "decode ms"], rows))
    print("\nevery stream decoded with both precisions to the encoder's latents, bit for bit")


if __name__ == "__main__":
    main()
