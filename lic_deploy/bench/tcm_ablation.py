"""Which part of TCM's integer entropy path costs what: the integer path with one quantity at a time replaced by
the float model's own value, on real bitstreams.

For each checkpoint and image the encoder runs g_a and h_a (ONNX Runtime FP32) once, then codes y five ways:

- `integer`: the codec as shipped (every program integer);
- `float-mu`, `float-scale`, `float-lrp`: that quantity from the float modules instead (PyTorch, float32, on the
  same decoded y_hat and z_hat as the integer path has at that point; mu and the LRP delta rounded to the
  fixed point y_hat is kept in, the scale looked up in the same tables);
- `float-all`: all three float, so the entropy path is the float model's up to y_hat's fixed point and the scale
  tables.

Bits are the payload bytes of the real streams; PSNR is g_s (ONNX Runtime FP32) on the encoder's y_hat (what a
decoder reconstructs). With four or more checkpoints of one family it reports each variant's BD-rate against
`float-all`: the integer path's cost, and how much of it each float quantity removes.

    python -m lic_deploy.bench.tcm_ablation CKPT... --data ../shared/data/kodak [--images 8]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lic_deploy.bench.bdrate import bd_text, try_bd_rate
from lic_deploy.bench.latency import format_table
from lic_deploy.entropy.model import hs_input
from lic_deploy.entropy.tcm import TcmEntropyModel
from lic_deploy.runtime.images import list_images, load_rgb, psnr, to_uint8

FLOAT_PARTS = ("mu", "scale", "lrp")
VARIANTS: dict[str, frozenset[str]] = {"integer": frozenset(), **{f"float-{p}": frozenset({p}) for p in FLOAT_PARTS},
                                       "float-all": frozenset(FLOAT_PARTS)}


class AblatedTcm(TcmEntropyModel):
    """TCM's integer entropy model with the quantities in `floats` taken from the float model `model`."""

    def __init__(self, arrays: Any, model: Any, floats: frozenset[str]) -> None:
        super().__init__(arrays)
        self.model, self.floats = model, floats

    def _hyper_synthesis(self, z_sym: np.ndarray) -> np.ndarray:
        if self.floats:  # the float hyper synthesis on the same z_hat
            import torch

            z_hat = hs_input(z_sym, self.median_fp, self.z_frac_bits) / float(1 << self.z_frac_bits)
            with torch.no_grad():
                z = torch.from_numpy(z_hat.astype(np.float32))[None]
                self._f_lm, self._f_ls = self.model.h_mean_s(z), self.model.h_scale_s(z)
        return super()._hyper_synthesis(z_sym)

    def _fixed(self, t: Any) -> np.ndarray:
        """A float tensor [1, C, H, W] in y_hat's fixed point (P fractional bits), rounded half up."""
        return np.floor(t[0].double().numpy() * (1 << self.param_frac_bits) + 0.5).astype(np.int64)

    def _tensor(self, y_fp: np.ndarray) -> Any:
        import torch

        return torch.from_numpy(self._as_float(y_fp))[None]

    def _slice_params(self, i: int, lm: np.ndarray, ls: np.ndarray, done: list[np.ndarray]
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import torch

        mu, scale, support = super()._slice_params(i, lm, ls, done)
        if self.floats:
            with torch.no_grad():  # the float networks on the integer path's own decoded y_hat
                f_mu, f_scale, self._f_support = self.model.slice_params(
                    i, self._f_lm, self._f_ls, [self._tensor(v) for v in done])
            mu = self._fixed(f_mu) if "mu" in self.floats else mu
            scale = self._fixed(f_scale) if "scale" in self.floats else scale
        return mu, scale, support

    def _lrp_delta(self, i: int, support: np.ndarray, y_fp: np.ndarray) -> np.ndarray:
        import torch

        if "lrp" not in self.floats:
            return super()._lrp_delta(i, support, y_fp)
        with torch.no_grad():
            y_hat = self._tensor(y_fp)
            return self._fixed(self.model.lrp(i, self._f_support, y_hat) - y_hat)


def measure(package: Path, model: Any, images: list[np.ndarray], threads: int = 2,
            progress: Callable[[str], None] = lambda _: None) -> dict[str, dict[str, float]]:
    """Mean bpp (payload) and PSNR of every variant over `images` (float32 [3, H, W] in [0, 1])."""
    from lic_deploy.runtime.codec import Codec

    codec = Codec(package, "ort", "fp32", threads=threads)
    models = {name: AblatedTcm(codec.package.entropy, model, floats) for name, floats in VARIANTS.items()}
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    for k, image in enumerate(images):
        progress(f"image {k + 1}/{len(images)}")
        _, h, w = image.shape
        x = codec.package.pad(image)[0][None]
        y = codec.engine.run("g_a", x)
        z = codec.engine.run("h_a", y)
        for name, entropy in models.items():
            coded = entropy.encode(y[0], z[0])
            rec = codec.engine.run("g_s", coded.y_hat[None])[0, :, :h, :w]
            rows[name].append((8 * sum(len(s) for s in coded.streams) / (h * w),
                               psnr(to_uint8(rec), to_uint8(image))))
    return {name: {"bpp": float(np.mean([r[0] for r in v])), "psnr": float(np.mean([r[1] for r in v]))}
            for name, v in rows.items()}


def report(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Table of every model and variant (change against `integer`), and BD-rates against `float-all`."""
    rows = [[model, name, v["bpp"], v["psnr"], 100 * (v["bpp"] / r["integer"]["bpp"] - 1),
             v["psnr"] - r["integer"]["psnr"]] for model, r in results.items() for name, v in r.items()]
    lines = [format_table(["model", "variant", "bpp", "PSNR dB", "bpp vs integer %", "PSNR vs integer dB"], rows)]
    if len(results) >= 4:
        def curve(name: str) -> tuple[list[float], list[float]]:
            return [r[name]["bpp"] for r in results.values()], [r[name]["psnr"] for r in results.values()]

        lines.append("BD-rate (pchip) against float-all (the float entropy networks), same models and images:")
        lines += [f"  {name}: {bd_text(*try_bd_rate(*curve('float-all'), *curve(name)))}" for name in VARIANTS
                  if name != "float-all"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="TCM checkpoints of one family at different lambdas")
    parser.add_argument("--data", required=True, help="test images (Kodak)")
    parser.add_argument("--images", type=int, default=0, help="use only the first N images (0: all)")
    parser.add_argument("--packages", help="folder with a package STEM.e16 per checkpoint (codec_bench's --out); "
                        "checkpoints without one are exported to --out")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="out/bench-tcm-ablation")
    args = parser.parse_args(argv)
    import torch

    from lic_deploy.archs.checkpoint import load_model
    from lic_deploy.export.package_writer import ExportOptions, export_package

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = [load_rgb(f)[0] for f in list_images(args.data)[: args.images or None]]
    results: dict[str, dict[str, dict[str, float]]] = {}
    for ckpt in args.checkpoints:
        name = Path(ckpt).stem
        loaded = load_model(ckpt)
        if loaded.arch != "tcm":
            parser.error(f"{ckpt}: a {loaded.arch} checkpoint; this ablation is for TCM")
        package = Path(args.packages or out) / f"{name}.e16"
        if not package.is_dir():
            package = export_package(ckpt, out / f"{name}.e16", log=lambda _: None,
                                     options=ExportOptions(precisions=("fp32",), overwrite=True))
        results[name] = measure(package, loaded.model.eval(), images, args.threads,
                                lambda msg, n=name: print(f"{n}: {msg}", flush=True))
    text = report(results)
    print(text)
    (out / "report.md").write_text(f"images: {len(images)}\n{text}\n")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
