"""`lic-deploy` command line: a thin face over the library. Heavy modules are imported inside each command."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from lic_deploy import __version__
from lic_deploy.errors import LicError

EPILOG = """examples:
  lic-deploy export ckpt.pt --int8 --fp16 -o pkg/            # FP32 + INT8 (Q/DQ) + FP16 codec package
  lic-deploy encode pkg/ photo.png -o out/                  # -> out/photo.lic
  lic-deploy decode pkg/ out/photo.lic -o out/              # -> out/photo.png
"""


def _export(args: argparse.Namespace) -> int:
    from lic_deploy.export.package_writer import ExportOptions, export_package

    precisions = ["fp32"]
    if args.fp16:
        precisions.append("fp16")
    if args.int8:
        precisions += ["int8", "int8-u8s8"] if args.cpu_int8 else ["int8"]
    opts = ExportOptions(precisions=precisions, calib=args.calib, calib_count=args.calib_count,
                         calib_method=args.calib_method, calib_seed=args.calib_seed, calib_size=args.calib_size,
                         entropy_act_bits=args.entropy_bits, overwrite=args.force)
    export_package(args.checkpoint, args.output, arch=args.arch, options=opts)
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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
    p.add_argument("--calib-seed", type=int, default=0, help="seed for choosing crops (default 0)")
    p.add_argument("--calib-size", type=_positive, default=256, help="crop side in pixels (default 256)")
    p.add_argument("--entropy-bits", type=int, choices=(8, 16), default=16,
                   help="activation bits of the integer entropy network (default 16)")
    p.add_argument("--force", action="store_true", help="replace an existing package (only once complete)")
    p.set_defaults(func=_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        return int(args.func(args) or 0)
    except LicError as exc:
        print(f"lic-deploy: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lic-deploy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
