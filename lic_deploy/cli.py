"""`lic-deploy` command line: a thin face over the library. Heavy modules are imported inside each command."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lic_deploy import __version__
from lic_deploy.atomic import write_bytes
from lic_deploy.errors import LicError

EPILOG = """examples:
  lic-deploy export ckpt.pt --int8 --fp16 -o pkg/            # FP32 + INT8 (Q/DQ) + FP16 codec package
  lic-deploy encode pkg/ photo.png -o out/                  # -> out/photo.lic
  lic-deploy decode pkg/ out/photo.lic -o out/              # -> out/photo.png
"""


def _export(args: argparse.Namespace) -> int:
    from lic_deploy.export.package_writer import ExportOptions, export_package

    if args.cpu_int8 and not args.int8:
        raise LicError("--cpu-int8 adds the unsigned-activation INT8 graphs to --int8: give both")
    precisions = ["fp32"]
    if args.fp16:
        precisions.append("fp16")
    if args.int8:
        precisions += ["int8", "int8-u8s8"] if args.cpu_int8 else ["int8"]
    opts = ExportOptions(precisions=precisions, calib=args.calib, calib_count=args.calib_count,
                         calib_method=args.calib_method, calib_seed=args.calib_seed, calib_size=args.calib_size,
                         entropy_act_bits=args.entropy_bits, overwrite=args.force, fallback=args.fallback,
                         fallback_target=args.fallback_target, lmbda=args.lmbda, footprint=not args.no_footprint)
    export_package(args.checkpoint, args.output, arch=args.arch, options=opts)
    return 0


def _progress(items: list, desc: str):
    """A tqdm bar on stderr for more than one item, else the items as they are."""
    if len(items) < 2:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="img", file=sys.stderr, leave=False)


def _out_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise LicError(f"-o {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _targets(files: list[Path], out: Path, suffix: str, force: bool) -> list[Path]:
    """out/STEM.suffix for each input; LicError when two inputs (x.png, x.jpg) would write the same file, or one
    exists already (a source image, say) and `force` is off."""
    seen: dict[Path, Path] = {}
    for path in files:
        target = out / f"{path.stem}.{suffix}"
        if target in seen:
            raise LicError(f"{seen[target]} and {path} would both be written to {target}: give them separately, "
                           "each with its own -o")
        if target.exists() and not force:
            raise LicError(f"{target} exists; pass --force to replace it (or choose another -o)")
        seen[target] = path
    return list(seen)


def _encode(args: argparse.Namespace) -> int:
    from lic_deploy.bench.latency import format_table
    from lic_deploy.runtime.images import expand_inputs, load_rgb, psnr, to_uint8

    files = expand_inputs(args.images)
    out = _out_dir(args.output)
    targets = _targets(files, out, "lic", args.force)
    codec = _codec(args)
    rows = []
    for path, target in _progress(list(zip(files, targets, strict=True)), "encode"):
        image, grey = load_rgb(path, max_pixels=codec.max_pixels)
        data, y_hat = codec.encode_array(image, grey=grey)
        write_bytes(target, data)
        h, w = image.shape[1:]
        row: list[object] = [path.name, len(data), 8.0 * len(data) / (h * w)]
        if not args.no_psnr:
            row.append(psnr(codec.reconstruct(y_hat, h, w), to_uint8(image)))
        rows.append(row)
    headers = ["image", "bytes", "bpp"] + ([] if args.no_psnr else ["PSNR dB"])
    if len(rows) > 1:
        rows.append(["mean", sum(r[1] for r in rows) / len(rows),
                     *[sum(r[i] for r in rows) / len(rows) for i in range(2, len(headers))]])
    print(format_table(headers, rows))
    return 0


def _decode(args: argparse.Namespace) -> int:
    from lic_deploy.errors import BitstreamError, DataError
    from lic_deploy.runtime.images import expand_inputs, save_image

    files = expand_inputs(args.streams, (".lic",))
    out = _out_dir(args.output)
    targets = _targets(files, out, args.format, args.force)
    codec = _codec(args)
    for path, target in _progress(list(zip(files, targets, strict=True)), "decode"):
        try:
            decoded = codec.decode(path.read_bytes())
        except (BitstreamError, DataError) as exc:
            raise type(exc)(f"{path}: {exc}") from None
        img = decoded.image
        save_image(target, img if img.ndim == 3 else img[..., None].repeat(3, axis=2), grey=img.ndim == 2)
        print(f"{path.name} -> {target} ({img.shape[1]}x{img.shape[0]})")
    return 0


def _convergence(args: argparse.Namespace) -> int:
    import json

    from lic_deploy.bench.convergence import compare, plot, run_differences, summary, to_json

    result = compare(args.adam, args.soap)
    for difference in run_differences(args.adam, args.soap):
        print(f"lic-deploy: warning: the two runs differ in {difference}", file=sys.stderr)
    out = _out_dir(args.output)
    plot(args.adam, args.soap, out / "convergence.png")
    write_bytes(out / "convergence.json", json.dumps(to_json(result), indent=1).encode())
    print(summary(result))
    print(f"wrote {out / 'convergence.png'} and {out / 'convergence.json'}")
    return 0


def _calib(args: argparse.Namespace) -> int:
    import json

    from lic_deploy.export.calibration import manifest, select_crops

    out = Path(args.output)
    if out.exists() and not args.force:
        raise LicError(f"{out} already exists; pass --force to replace it")
    crops = select_crops(args.folder, args.count, seed=args.seed, size=args.size)
    write_bytes(out, (json.dumps(manifest(args.folder, crops, seed=args.seed, size=args.size), indent=1)
                        + "\n").encode())
    print(f"wrote {out}: {len(crops)} crops from {len({c.file for c in crops})} files")
    return 0


def _arch_options(text: str) -> dict[str, int]:
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip().isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"expected KEY=POSITIVE_INT[,KEY=...], got {item!r}")
        if key.strip() in out:
            raise argparse.ArgumentTypeError(f"{key.strip()} is given twice in {text!r}")
        out[key.strip()] = int(value)
    return out


def _two_widths(text: str) -> tuple[int, int]:
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected two positive integers A,B, got {text!r}")
    return int(parts[0]), int(parts[1])


def _milestones(text: str) -> tuple[float, ...]:
    from lic_deploy.train.schedule import parse_milestones

    try:
        return parse_milestones(text)
    except LicError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _train(args: argparse.Namespace) -> int:
    from lic_deploy.train.loop import TrainConfig, train

    cfg = TrainConfig(data=args.data, output=args.output, arch=args.arch, N=args.N, M=args.M,
                      optimizer=args.optimizer, lmbda=args.lmbda, val=args.val, val_count=args.val_count,
                      steps=args.steps, batch=args.batch, patch=args.patch, downscale=args.downscale or None,
                      lr=args.lr, warmup=args.warmup, clip=args.clip, seed=args.seed, log_every=args.log_every,
                      val_every=args.val_every, ckpt_every=args.ckpt_every, align_every=args.align_every,
                      resume=args.resume, init=args.init, threads=args.threads, until_val_loss=args.until_val_loss,
                      context_widths=args.context_widths, arch_options=args.arch_config,
                      device=args.device, amp=args.amp, schedule=args.schedule,
                      lr_milestones=args.lr_milestones, lr_gamma=args.lr_gamma, accum=args.accum,
                      data_mode=args.data_mode, workers=args.workers, small=args.small, max_seconds=args.max_seconds,
                      soap_impl=args.soap_impl, soap_bf16=args.soap_bf16, cuda_graph=not args.no_cuda_graph)
    path = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {path} and {path}.jsonl")
    return 0


def _codec(args: argparse.Namespace):
    """The codec encode/decode asked for (--backend, --precision, --threads, --device, --max-pixels, --intnet)."""
    from lic_deploy.runtime.codec import Codec
    from lic_deploy.runtime.engines import create_engine
    from lic_deploy.runtime.package import Package

    package = Package.open(args.package)
    engine = create_engine(package, args.backend, args.precision, threads=args.threads, device=args.device)
    return Codec(package, engine=engine, threads=args.threads, max_pixels=args.max_pixels, intnet=args.intnet,
                 check_memory=not getattr(args, "no_memory_check", False))


def _build(args: argparse.Namespace) -> int:
    from lic_deploy.runtime.engines.tensorrt import TRT_PRECISIONS, Profile, build_engines
    from lic_deploy.runtime.package import Package

    package = Package.open(args.package)
    precisions = args.precision or [p for p in TRT_PRECISIONS if p in package.precisions("g_a")]
    profile = Profile.parse(args.profile) if args.profile else None
    for path in build_engines(package, precisions, profile, device=args.device):
        print(path)
    return 0


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    from lic_deploy.entropy.bitstream import DEFAULT_MAX_PIXELS
    from lic_deploy.runtime.engines import BACKENDS
    from lic_deploy.runtime.package import ENGINE_PRECISIONS as PRECISIONS

    p.add_argument("package", help="codec package directory (from lic-deploy export)")
    p.add_argument("--backend", choices=BACKENDS, default="ort",
                   help="engine for the float transforms (default ort: ONNX Runtime on CPU)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="graph precision (default fp32)")
    p.add_argument("--threads", type=_threads, help="CPU threads (default: the engine's own default)")
    p.add_argument("--max-pixels", type=_positive, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse images larger than this many pixels (default {DEFAULT_MAX_PIXELS})")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where --backend torch runs (default cpu); "
                   "--backend tensorrt uses GPU N of cuda:N, else GPU 0")
    p.add_argument("--intnet", metavar="numpy|ort|torch:DEVICE",
                   help="where the integer entropy networks run; every choice gives the same bits (default: on the "
                   "GPU with --backend torch --device cuda, else numpy)")


def _bench(args: argparse.Namespace) -> int:
    from lic_deploy.bench.compare import analyse
    from lic_deploy.bench.report import headline_text, write_report
    from lic_deploy.bench.runner import BenchOptions, run_bench

    labels = {}
    for item in args.label or []:
        name, sep, label = item.partition("=")
        if not sep:
            raise LicError(f"--label {item!r} is not MODEL=OPTIMIZER:LAMBDA[:FAMILY]")
        labels[name] = label
    opts = BenchOptions(data=Path(args.data), out=Path(args.output), precisions=args.precisions,
                        calib_methods=args.calib_methods, backends=args.backends, images=args.images,
                        repeat=args.repeat, warmup=args.warmup, threads=args.threads, calib=args.calib,
                        calib_count=args.calib_count, calib_size=args.calib_size, labels=labels,
                        outlier_images=args.outlier_images,
                        fallback_target=args.fallback_target, resume=args.resume, device=args.device)
    results = run_bench(args.models, opts)
    an = analyse(results)  # results["analysis"] went through `finite` (None for NaN): recomputed for the report
    report = write_report(results, opts.out, an=an)
    print(headline_text(an))
    print(f"\nwrote {opts.out / 'results.json'} and {report}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from lic_deploy.bench.compare import analyse
    from lic_deploy.bench.report import headline_text, write_report
    from lic_deploy.bench.runner import load_results

    if len(args.results) == 1:
        results = load_results(args.results[0])
        out = Path(args.output or Path(args.results[0]).parent)
    else:
        from lic_deploy.bench.merge import merge_results
        from lic_deploy.bench.runner import finite, write_json

        if not args.output:
            raise LicError("report with several results files needs -o DIR (the merged results.json goes there)")
        out = Path(args.output)
        if any(Path(r).resolve() == (out / "results.json").resolve() for r in args.results):
            raise LicError(f"-o {out} holds one of the results files the merge reads; choose another folder")
        results = merge_results([load_results(r) for r in args.results], args.results)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "results.json", finite(results))
    an = analyse(results)
    report = write_report(results, out, note=args.note, an=an)
    print(headline_text(an))
    print(f"\nwrote {report}")
    return 0


def _csv(choices: Sequence[str]):
    """argparse type: a comma-separated list of items from `choices`."""
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}")
        return items

    return parse


def folder_arg(text: str) -> str:
    """argparse type: an image folder, "data:<sub>" resolved under $LIC_DEPLOY_DATA (its existence is checked
    where it is used, with the other inputs)."""
    from lic_deploy.runtime.images import resolve_folder

    try:
        return str(resolve_folder(text))
    except LicError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _integer(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def _positive(text: str) -> int:
    return _integer(text, 1)


def _nonnegative(text: str) -> int:
    return _integer(text, 0)


def _number(low: float, high: float, *, open_low: bool = False) -> Any:
    """An argparse type: a finite float in [low, high] ((low, high] with open_low)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(value) and (value > low if open_low else value >= low) and value <= high):
            raise argparse.ArgumentTypeError(f"must be a number in {'(' if open_low else '['}{low:g}, {high:g}], "
                                             f"got {text}")
        return value

    return parse


PERCENT = _number(0, 100, open_low=True)  # --fallback-target


def _bounded(most: int, least: int = 1) -> Any:
    """An argparse type: a whole number in [least, most] (bounds that keep a typo from exhausting memory)."""

    def parse(text: str) -> int:
        value = _integer(text, least)
        if value > most:
            raise argparse.ArgumentTypeError(f"must be at most {most}, got {value}")
        return value

    return parse


MAX_THREADS = 256  # more threads than this is a typo (each one costs memory in the engines' pools)
_threads = _bounded(MAX_THREADS)


def build_parser() -> argparse.ArgumentParser:
    from lic_deploy.archs.registry import REGISTRY
    from lic_deploy.export.quantize import CALIB_METHODS

    parser = argparse.ArgumentParser(
        prog="lic-deploy", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Turn learned image codecs into deployable ones and measure what deployment costs.")
    parser.add_argument("--version", action="version", version=f"lic-deploy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("export", help="checkpoint -> codec package (ONNX stages, INT8/FP16, entropy model)",
                       description="Export a CompressAI-style checkpoint to a codec package directory: one ONNX "
                       "graph per stage (FP32 always, verified against PyTorch), optional INT8 (explicit Q/DQ, "
                       "symmetric, per-channel weights) and FP16 graphs, and the integer entropy model.")
    p.add_argument("checkpoint", help="checkpoint file (.pt/.pth/.tar state dict, CompressAI training dict, "
                   "lic-deploy checkpoint, or .safetensors)")
    p.add_argument("-o", "--output", required=True, help="package directory to create (must not exist)")
    p.add_argument("--arch", choices=sorted(REGISTRY), help="architecture (default: inferred from the keys)")
    p.add_argument("--int8", action="store_true", help="also write INT8 Q/DQ graphs (TensorRT form)")
    p.add_argument("--cpu-int8", action="store_true",
                   help="with --int8, also write the CPU-tuned int8-u8s8 variant (unsigned activations)")
    p.add_argument("--fp16", action="store_true", help="also write FP16 graphs")
    p.add_argument("--calib", help="calibration image folder or manifest .json (default: scikit-image's photos)")
    p.add_argument("--calib-count", type=_positive, default=16, help="number of calibration crops (default 16)")
    p.add_argument("--calib-method", choices=CALIB_METHODS, default="minmax",
                   help="activation range method for INT8 (default minmax)")
    p.add_argument("--calib-seed", type=_nonnegative, default=0, help="seed for choosing crops (default 0)")
    p.add_argument("--calib-size", type=_positive, default=256, help="crop side in pixels (default 256)")
    p.add_argument("--entropy-bits", type=int, choices=(8, 16), default=16,
                   help="activation bits of the integer entropy network (default 16)")
    p.add_argument("--fallback", choices=("none", "auto"), default="none",
                   help="with --int8: 'auto' keeps the most INT8-sensitive layers (lowest per-layer SQNR) in FP32 "
                   "until the rate-equivalent PTQ loss on the calibration crops is at most --fallback-target")
    p.add_argument("--fallback-target", type=PERCENT, default=1.0, metavar="PCT",
                   help="target of --fallback auto, percent of the FP32 rate (default 1.0)")
    p.add_argument("--lmbda", type=float, help="the model's training lambda for --fallback auto (default: from "
                   "the checkpoint's metadata)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing package (only once the new one is complete; a folder that is not a "
                   "codec package, or holds the current directory, is never replaced)")
    p.add_argument("--no-footprint", action="store_true",
                   help="skip measuring the decode memory per pixel (a 1024x1024 probe decode, a few seconds); "
                   "decoders then refuse images by a generic estimate of 1600 bytes per pixel")
    p.set_defaults(func=_export)

    p = sub.add_parser("calib", help="write a calibration manifest (which files, which crops)",
                       description="Choose calibration crops from an image folder and record them (file names, "
                       "sha256, boxes) in a JSON manifest that `export --calib` replays exactly. A folder under "
                       "$LIC_DEPLOY_DATA is recorded as data:<sub>, so the manifest works on any machine.")
    p.add_argument("folder", help="image folder, 'skimage', or data:<sub> (under $LIC_DEPLOY_DATA)")
    p.add_argument("-o", "--output", required=True, help="manifest .json to write")
    p.add_argument("--count", type=_positive, default=64, help="number of crops (64)")
    p.add_argument("--seed", type=_nonnegative, default=0)
    p.add_argument("--size", type=_positive, default=256, help="crop side in pixels (256)")
    p.add_argument("--force", action="store_true", help="replace an existing manifest")
    p.set_defaults(func=_calib)

    p = sub.add_parser("convergence", help="steps and seconds SOAP needs to reach Adam's final loss",
                       description="Compare two training logs (OUTPUT.jsonl of `lic-deploy train` with --val) of "
                       "the same architecture, data, seed and lambda: SOAP's steps and wall-clock seconds to "
                       "reach Adam's final validation loss, the per-step time ratio, and a plot of validation "
                       "loss against steps and seconds.")
    p.add_argument("--adam", required=True, help="Adam run's .jsonl log")
    p.add_argument("--soap", required=True, help="SOAP run's .jsonl log")
    p.add_argument("-o", "--output", required=True, help="output folder for convergence.png and .json")
    p.set_defaults(func=_convergence)

    from lic_deploy.train.schedule import KINDS

    p = sub.add_parser("train", help="train a codec with SOAP or Adam",
                       description="Rate-distortion training (loss = lmbda * 255^2 * MSE + bpp) on random crops of "
                       "an image folder, logging loss, bpp, PSNR and the SOAP study's intra-/inter-step alignment "
                       "to OUTPUT.jsonl; checkpoints include optimizer state and resume bit-exactly.")
    p.add_argument("--data", required=True, type=folder_arg,
                   help="training image folder (or data:<sub>, a folder under $LIC_DEPLOY_DATA, as data:train)")
    p.add_argument("-o", "--output", required=True, help="checkpoint path to write")
    p.add_argument("--arch", choices=sorted(REGISTRY), default="mbt2018-mean")
    p.add_argument("--N", type=_positive, default=64, help="channels of the hyper-latent / transforms (64)")
    p.add_argument("--M", type=_positive, default=96, help="channels of the latent y (96; ELIC needs M > 128)")
    p.add_argument("--arch-config", type=_arch_options, metavar="K=V,...",
                   help="further architecture knobs; TCM: slices, depth (blocks per stage), attn (SWAtten width), "
                   "cc1, cc2 (conv-chain widths), Z (hyper-latent channels); official TCM-S/M/L: --N 64/96/128 "
                   "--M 320 with the defaults slices=5,depth=2,attn=128,cc1=224,cc2=128,Z=192")
    p.add_argument("--context-widths", type=_two_widths, metavar="A,B",
                   help="ELIC: hidden widths of the channel-context networks (default CompressAI's 224,128)")
    p.add_argument("--optimizer", choices=("soap", "adam"), default="soap")
    p.add_argument("--lmbda", type=float, default=0.013, help="rate-distortion trade-off (0.013)")
    p.add_argument("--val", type=folder_arg, help="validation image folder (for example Kodak, or data:kodak)")
    p.add_argument("--val-count", type=_positive, default=6, help="validation images used (6)")
    p.add_argument("--steps", type=_positive, default=2000, help="total steps to reach (2000)")
    p.add_argument("--batch", type=_positive, default=8)
    p.add_argument("--patch", type=_positive, default=128,
                   help="crop side: a multiple of 64 (TCM: of 128, at least 256) (128)")
    p.add_argument("--downscale", type=int, default=256,
                   help="first resize each image so its shorter side is this many pixels; 0 = off (256)")
    p.add_argument("--lr", type=float, help="learning rate (default: adam 1e-4, soap 3e-3)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (100)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip, 0 = off (1.0)")
    p.add_argument("--seed", type=_nonnegative, default=0)
    p.add_argument("--log-every", type=_positive, default=50)
    p.add_argument("--val-every", type=_positive, default=250)
    p.add_argument("--ckpt-every", type=_positive, default=250)
    p.add_argument("--align-every", type=_positive, default=50, help="alignment metrics every K steps (50)")
    p.add_argument("--resume", help="checkpoint to continue from (same optimizer and architecture)")
    p.add_argument("--init", metavar="CKPT",
                   help="start a new run from CKPT's weights (same architecture and config; any optimizer and "
                   "lambda), with a fresh optimizer and step 0: how further rate points are trained from one")
    p.add_argument("--until-val-loss", type=_number(0, math.inf, open_low=True), metavar="LOSS",
                   help="stop at the first validation whose loss is at or below LOSS (an equal-quality model; "
                   "needs --val)")
    p.add_argument("--threads", type=_threads, help="torch CPU threads")
    p.add_argument("--soap-impl", choices=("lic-deploy", "pytorch-optimizer"), default="lic-deploy",
                   help="SOAP's implementation: lic-deploy's (default; two rotations per step instead of three) or "
                   "pytorch-optimizer's; the same updates to float32 rounding. A resume keeps the run's own")
    p.add_argument("--soap-bf16", action="store_true",
                   help="lic-deploy's SOAP: convolution weights' rotations and statistics as bfloat16 GEMMs (state "
                   "and eigenbases stay float32): faster products on CPUs with AVX512-BF16 or AMX (2.5-2.8x here) and "
                   "on GPUs; updates within bfloat16 rounding of the float32 ones, loss curves within seed noise "
                   "(docs/benchmarks.md). A resume keeps the run's own")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="lic-deploy's SOAP on CUDA: step eagerly instead of replaying its steps as a CUDA graph "
                   "(1.36x Adam's step instead of 1.18-1.28x on an H200; the same updates to float32 rounding, so "
                   "a resume that switches continues to rounding, not bit-exactly)")
    p.add_argument("--max-seconds", type=_number(0, math.inf), metavar="S",
                   help="stop and save once S seconds of training have run (a wall-clock budget)")
    p.add_argument("--device", default="cpu", metavar="cpu|cuda[:N]",
                   help="where to train (default cpu); under torchrun with cuda each process takes cuda:LOCAL_RANK")
    p.add_argument("--amp", choices=("bf16",), help="run the transforms in bfloat16 (autocast); the likelihoods and "
                   "the loss stay float32")
    p.add_argument("--schedule", choices=KINDS, default="constant",
                   help="learning rate after the warm-up: constant (default), multistep or cosine")
    p.add_argument("--lr-milestones", type=_milestones, default=(), metavar="A,B",
                   help="multistep: where the rate drops, fractions of --steps (0.9,0.96) or step numbers")
    p.add_argument("--lr-gamma", type=float, default=0.1, help="multistep: factor at each milestone (0.1)")
    p.add_argument("--accum", type=_positive, default=1,
                   help="micro-batches per process and step, gradients accumulated (--batch is the global batch)")
    p.add_argument("--data-mode", choices=("auto", "memory", "stream"), default="auto",
                   help="memory: hold every image (small folders); stream: decode crops per step, folders of any "
                   "size and depth; auto (default): stream for nested folders, over 2000 images or with --workers")
    p.add_argument("--workers", type=_nonnegative, default=0,
                   help="DataLoader processes decoding crops (stream mode; 0; at most 64)")
    p.add_argument("--small", choices=("skip", "upscale"), default="skip",
                   help="stream mode: images smaller than the crop are skipped (default) or upscaled to it")
    p.set_defaults(func=_train)

    p = sub.add_parser("build", help="ahead-of-time TensorRT engines for a package (NVIDIA GPU)",
                       description="Compile the package's ONNX graphs into TensorRT engines (strongly typed; "
                       "precision from the graphs) and cache them in PKG/engines/, keyed by graph sha256, TensorRT "
                       "version, GPU compute capability, profile and precision. Stale engines are rebuilt. Needs "
                       "pip install 'lic-deploy[tensorrt]' and an NVIDIA GPU.")
    p.add_argument("package", help="codec package directory (from lic-deploy export)")
    p.add_argument("--precision", nargs="+", choices=("fp32", "fp16", "int8"),
                   help="precisions to build (default: each of fp32, fp16, int8 that the package has)")
    p.add_argument("--profile", help="image sizes HxW the engines accept, MIN:OPT:MAX, multiples of 64 (default "
                   "256x256:512x768:2048x2048); recorded as the package's default for --backend tensorrt")
    p.add_argument("--device", type=int, default=0, help="CUDA device index (default 0)")
    p.set_defaults(func=_build)

    from lic_deploy.runtime.engines import BACKENDS
    from lic_deploy.runtime.package import ENGINE_PRECISIONS as PRECISIONS

    p = sub.add_parser("bench", help="measure PTQ loss, outliers and latency of models (SOAP against Adam)",
                       description="Export each checkpoint (once per calibration method), really encode and decode "
                       "every image with every backend/precision variant (bpp from .lic bytes, PSNR, MS-SSIM, "
                       "per-step latency), collect per-layer outlier statistics and INT8 SQNR, and write "
                       "results.json and report.md with plots (definitions: docs/bench.md).")
    p.add_argument("models", nargs="+", help="checkpoints or codec packages (optimizer and lambda from metadata)")
    p.add_argument("--data", required=True, type=folder_arg,
                   help="test image folder (for example Kodak, or data:kodak under $LIC_DEPLOY_DATA)")
    p.add_argument("-o", "--output", default="out/bench", help="output folder (default out/bench)")
    p.add_argument("--precisions", type=_csv(PRECISIONS), default=["fp32", "fp16", "int8"],
                   help="comma-separated (default fp32,fp16,int8; fp32 is always measured)")
    p.add_argument("--calib-methods", type=_csv(CALIB_METHODS), default=["minmax"],
                   help="INT8 calibration methods, comma-separated (default minmax)")
    p.add_argument("--backends", type=_csv(BACKENDS), default=["ort"], help="comma-separated (default ort)")
    p.add_argument("--images", type=_nonnegative, default=0, help="use the first N images (default 0: all)")
    p.add_argument("--repeat", type=_bounded(1000), default=5, help="timed runs for the latency medians (default 5)")
    p.add_argument("--warmup", type=_positive, default=1, help="untimed runs before timing (default 1)")
    p.add_argument("--threads", type=_threads, default=2, help="CPU threads (default 2)")
    p.add_argument("--calib", help="calibration folder or manifest .json (default: scikit-image's photos)")
    p.add_argument("--calib-count", type=_positive, default=16, help="calibration crops from a folder (16)")
    p.add_argument("--calib-size", type=_positive, default=256, help="calibration crop side in pixels (256)")
    p.add_argument("--label", action="append", metavar="MODEL=OPTIMIZER:LAMBDA[:FAMILY]",
                   help="optimizer and lambda of a model without them in its metadata (MODEL: file stem or path); "
                   "repeatable")
    p.add_argument("--outlier-images", type=_nonnegative, default=2,
                   help="images for the outlier statistics (default 2; 0 skips them)")
    p.add_argument("--fallback-target", type=PERCENT, metavar="PCT",
                   help="also measure INT8 with --fallback auto at this target (percent)")
    p.add_argument("--device", default="cpu", metavar="cpu|cuda[:N]",
                   help="where the GPU engines run: with cuda, --backends torch runs PyTorch CUDA (fp32, fp16, bf16) "
                   "and tensorrt runs TensorRT (fp32, fp16, int8) next to the CPU engines (ort); default cpu")
    p.add_argument("--resume", action="store_true",
                   help="after an interruption: keep the models already measured by the same command "
                   "(OUT/results.partial.json, written after each model) and measure the rest")
    p.set_defaults(func=_bench)

    p = sub.add_parser("report", help="regenerate report.md and plots from a bench results.json",
                       description="Write report.md (headline PTQ-loss table with 95 %% bootstrap intervals, "
                       "SOAP/Adam model pairs, RD points, latency, fallback, outliers) and its PNG plots from "
                       "results.json alone.")
    p.add_argument("results", nargs="+", help="results.json written by lic-deploy bench; several (for example a CPU "
                   "run and a GPU run over the same images) are merged into one report, the first file winning "
                   "for a model and variant measured twice")
    p.add_argument("-o", "--output", help="output folder (default: the folder of results.json; required with "
                   "several files, and the merged results.json is written there)")
    p.add_argument("--note", help="a paragraph printed under the report's title (what the models are, caveats)")
    p.set_defaults(func=_report)

    p = sub.add_parser("encode", help="images -> .lic bitstreams",
                       description="Encode images (files or folders) to .lic streams in the output folder. "
                       "Greyscale, RGBA and 16-bit images are converted to 8-bit RGB with a warning; greyscale "
                       "sources decode back to greyscale. Prints bytes, bits per pixel and PSNR.")
    _add_engine_args(p)
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("-o", "--output", required=True, help="output folder (created if missing)")
    p.add_argument("--no-psnr", action="store_true", help="skip the reconstruction used to report PSNR")
    p.add_argument("--force", action="store_true", help="replace .lic files that exist in the output folder")
    p.set_defaults(func=_encode)

    p = sub.add_parser("decode", help=".lic bitstreams -> images",
                       description="Decode .lic streams (files or folders) to images in the output folder. A "
                       "stream made with another package is refused by its fingerprint.")
    _add_engine_args(p)
    p.add_argument("streams", nargs="+", help=".lic files or folders of them")
    p.add_argument("-o", "--output", required=True, help="output folder (created if missing)")
    p.add_argument("--format", choices=("png", "bmp", "tif", "ppm"), default="png", help="image format (png)")
    p.add_argument("--force", action="store_true",
                   help="replace images that exist in the output folder (without it, never a source photo)")
    p.add_argument("--no-memory-check", action="store_true",
                   help="decode even when the package's memory footprint says the image needs more memory than "
                   "is available (by default such a stream is refused with one line)")
    p.set_defaults(func=_decode)
    return parser


def _format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    line: str | None = None) -> str:
    """Warnings about the user's input as one plain line (no source line); others as Python prints them."""
    from lic_deploy.runtime.images import ImageWarning

    if issubclass(category, ImageWarning):
        return f"lic-deploy: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.formatwarning = _format_warning
    signal.signal(signal.SIGTERM, _terminated)  # as Ctrl-C: temporary files and folders are removed on the way out
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that went away shows here, not at interpreter exit
        return code
    except LicError as exc:
        print(f"lic-deploy: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 141
    except OSError as exc:  # a path that cannot be read or written (missing folder, permissions, a full disk)
        print(f"lic-deploy: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lic-deploy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
