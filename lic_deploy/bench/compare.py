"""Comparisons computed from a bench results document alone: PTQ loss, SOAP against Adam, equal-quality points,
latency ratios and the cost of the FP32 fallback.

A curve is one optimizer's equal-steps models (or, as "<optimizer>-eq", its equal-quality models), one point per
lambda: the mean bpp and PSNR over the images, per variant. The PTQ loss of a variant is the BD-rate (pchip,
PSNR, `bdrate.bd_rate`) of its curve against the same curve in FP32 on the same backend (ort:fp32 when that
backend has no FP32), in percent, positive = the quantized codec needs more bits for the same PSNR. It needs at
least four common lambdas; every comparison also lists, per lambda, the PSNR change (dB, negative = worse) and
the bpp change (%), which is what the tables show where a BD-rate is not possible.

Every PTQ-loss figure and every difference between two models' PTQ losses carries a 95 % paired bootstrap interval
over the images (`bootstrap.PairedBootstrap`, `*_ci` keys), when the results hold per-image rows. A pair is one
Adam-family and one SOAP-family model at the same lambda (equal steps, equal training time, or equal FP32 quality
when one is an equal-quality model); its verdict says whether SOAP's loss differs from Adam's outside the noise.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lic_deploy.bench.bdrate import bd_rate, try_bd_rate
from lic_deploy.bench.bootstrap import (
    PairedBootstrap,
    excludes_zero,
    mean_difference,
    rate_equivalent_pct,
    ratio_change_pct,
)
from lic_deploy.bench.runner import STEPS, TRANSFORM_STEPS

BASE, TEST = "adam", "soap"  # the study's comparison: TEST against BASE
MIN_BD_POINTS = 4
ANCHOR = "fp32"


def curves(results: Mapping[str, Any]) -> dict[str, dict[str, dict[float, dict[str, Any]]]]:
    """curve -> variant key -> lambda -> the summary row (bpp, psnr, ms_ssim, model, ...)."""
    curve_of = {m["name"]: (m["curve"], m["lmbda"]) for m in results["models"]}
    out: dict[str, dict[str, dict[float, dict[str, Any]]]] = {}
    for s in results["summaries"]:
        curve, lmbda = curve_of[s["model"]]
        out.setdefault(curve, {}).setdefault(s["variant"], {})[lmbda] = s
    return out


def anchor_of(variant: str, available: Sequence[str]) -> str | None:
    """The FP32 variant a variant is measured against: same backend, else ONNX Runtime's; None if neither."""
    backend = variant.split(":")[0]
    for key in (f"{backend}:{ANCHOR}", f"ort:{ANCHOR}"):
        if key in available:
            return key
    return None


class ImageData:
    """Per-image bpp and PSNR arrays of every (model, variant), in one image order, and the paired bootstrap over
    those images; `boot` is None when the results hold no per-image rows (or fewer than two images)."""

    def __init__(self, results: Mapping[str, Any]) -> None:
        rows = results.get("rows") or []
        names = list((results.get("settings") or {}).get("images") or {r["image"]: None for r in rows})
        where = {n: i for i, n in enumerate(names)}
        grouped: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        for r in rows:
            arrays = grouped.setdefault((r["model"], r["variant"]), {k: np.full(len(names), np.nan)
                                                                     for k in ("bpp", "psnr")})
            for k in ("bpp", "psnr"):
                arrays[k][where[r["image"]]] = r[k]
        self.arrays = {key: {**a, "mse": 255.0**2 * 10 ** (-a["psnr"] / 10)} for key, a in grouped.items()
                       if all(np.isfinite(v).all() for v in a.values())}
        self.boot = PairedBootstrap(len(names)) if self.arrays and len(names) >= 2 else None

    def get(self, ref: Sequence[str]) -> dict[str, np.ndarray] | None:
        """The arrays of (model, variant), or None (no rows, or the bootstrap is off)."""
        return self.arrays.get(tuple(ref)) if self.boot else None

    def change_stats(self, point: Mapping[str, Any]) -> tuple[Any, Any, Any] | None:
        """Bootstrap statistics (PSNR change dB, bpp change %, rate-equivalent loss % at the point's lambda) of a
        compared point, or None."""
        a, t = self.get(point["anchor_ref"]), self.get(point["ref"])
        if a is None or t is None:
            return None
        return (mean_difference(t["psnr"], a["psnr"]), ratio_change_pct(t["bpp"], a["bpp"]),
                rate_equivalent_pct(t, a, point["lmbda"]))

    def bd_stat(self, points: Sequence[Mapping[str, Any]]) -> Any:
        """Bootstrap statistic (one index vector -> BD-rate %, NaN where undefined) of compared points, or None."""
        a = [self.get(p["anchor_ref"]) for p in points]
        t = [self.get(p["ref"]) for p in points]
        if any(x is None for x in (*a, *t)):
            return None

        def stat(idx: np.ndarray) -> float:
            means = [[float(x[k][idx].mean()) for x in side] for side in (a, t) for k in ("bpp", "psnr")]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return bd_rate(*means)
            except (ValueError, AssertionError):
                return math.nan

        return stat


NO_DATA = ImageData({})


def compare(anchor: Mapping[float, Mapping[str, Any]], test: Mapping[float, Mapping[str, Any]],
            data: ImageData = NO_DATA) -> dict[str, Any]:
    """Per-lambda changes of `test` against `anchor`, and the BD-rate when four or more lambdas are common; with
    per-image `data`, 95 % paired bootstrap intervals (`dpsnr_ci`, `dbpp_ci`, `bd_rate_ci`)."""
    common = sorted(set(anchor) & set(test))
    points = []
    for lm in common:
        a, t = anchor[lm], test[lm]
        p = {"lmbda": lm, "anchor_bpp": a["bpp"], "anchor_psnr": a["psnr"], "bpp": t["bpp"], "psnr": t["psnr"],
             "dpsnr_db": t["psnr"] - a["psnr"], "dbpp_pct": 100.0 * (t["bpp"] / a["bpp"] - 1.0),
             "anchor_ref": [a.get("model"), a.get("variant")], "ref": [t.get("model"), t.get("variant")]}
        stats = data.change_stats(p)
        p["dpsnr_ci"], p["dbpp_ci"], p["req_pct"], p["req_ci"] = (None,) * 4
        if stats:
            every = np.arange(data.boot.n)
            p["dpsnr_ci"], p["dbpp_ci"] = data.boot.interval(stats[0]), data.boot.interval(stats[1])
            p["req_pct"], p["req_ci"] = float(stats[2](every)), data.boot.interval(stats[2])
        points.append(p)
    out: dict[str, Any] = {"lambdas": common, "points": points, "bd_rate_pct": None, "bd_rate_ci": None,
                           "method": "per-point"}
    if len(common) >= MIN_BD_POINTS:
        with warnings.catch_warnings(record=True) as caught:  # bjontegaard warns about a small overlap
            warnings.simplefilter("always")
            value, why = try_bd_rate([p["anchor_bpp"] for p in points], [p["anchor_psnr"] for p in points],
                                     [p["bpp"] for p in points], [p["psnr"] for p in points])
        if value is None:
            out["note"] = f"BD-rate n/a: {why}"
            return out
        out["bd_rate_pct"], out["method"] = value, "bd-rate (pchip, PSNR)"
        if caught:
            out["note"] = "; ".join(str(w.message) for w in caught)
        stat = data.bd_stat(points)
        out["bd_rate_ci"] = data.boot.interval_each(stat) if stat else None
    return out


def ptq_losses(cs: Mapping[str, Mapping[str, Mapping[float, Any]]], data: ImageData = NO_DATA
               ) -> list[dict[str, Any]]:
    """Every non-FP32 variant of every curve against the curve's own FP32."""
    out = []
    for curve, variants in cs.items():
        for variant, points in variants.items():
            anchor = anchor_of(variant, list(variants))
            if variant.split(":")[1] != ANCHOR and anchor:
                out.append({"curve": curve, "variant": variant, "anchor": anchor,
                            **compare(variants[anchor], points, data)})
    return out


def point_difference(base: Mapping[str, Any], test: Mapping[str, Any], data: ImageData = NO_DATA
                     ) -> dict[str, Any]:
    """TEST's PTQ loss minus BASE's at one lambda (PSNR change in dB, bpp change and rate-equivalent loss in
    percentage points), with paired bootstrap intervals and `outside_noise`: True when the rate-equivalent
    difference's interval excludes zero."""
    out: dict[str, Any] = {"lmbda": test["lmbda"], "dpsnr_db": test["dpsnr_db"] - base["dpsnr_db"],
                           "dbpp_pp": test["dbpp_pct"] - base["dbpp_pct"], "dpsnr_ci": None, "dbpp_ci": None,
                           "dreq_pp": None, "dreq_ci": None}
    b, t = data.change_stats(base), data.change_stats(test)
    if b and t:
        out["dpsnr_ci"] = data.boot.interval(lambda idx: t[0](idx) - b[0](idx))
        out["dbpp_ci"] = data.boot.interval(lambda idx: t[1](idx) - b[1](idx))
        out["dreq_pp"] = test["req_pct"] - base["req_pct"]
        out["dreq_ci"] = data.boot.interval(lambda idx: t[2](idx) - b[2](idx))
        out["outside_noise"] = excludes_zero(out["dreq_ci"])
    out["verdict"] = verdict(out)
    return out


def verdict(diff: Mapping[str, Any]) -> str:
    """One point's difference in words, by the rate-equivalent loss (which weighs the PSNR and bpp changes
    against each other at the models' lambda): "inside the noise" when its interval contains zero, else which
    side loses more."""
    if diff.get("dreq_ci") is None:
        return "no interval"
    if not excludes_zero(diff["dreq_ci"]):
        return "inside the noise"
    return f"{TEST} loses {'more' if diff['dreq_pp'] > 0 else 'less'}"


def difference(base: Mapping[str, Any] | None, test: Mapping[str, Any] | None, data: ImageData = NO_DATA
               ) -> dict[str, Any] | None:
    """TEST's PTQ loss minus BASE's: in BD-rate percentage points, or per common lambda; with intervals."""
    if not base or not test:
        return None
    if base["bd_rate_pct"] is not None and test["bd_rate_pct"] is not None:
        out: dict[str, Any] = {"bd_rate_pp": test["bd_rate_pct"] - base["bd_rate_pct"], "bd_rate_ci": None}
        sb, st = data.bd_stat(base["points"]), data.bd_stat(test["points"])
        if sb and st:
            out["bd_rate_ci"] = data.boot.interval_each(lambda idx: st(idx) - sb(idx))
            out["outside_noise"] = excludes_zero(out["bd_rate_ci"])
        return out
    b = {p["lmbda"]: p for p in base["points"]}
    return {"points": [point_difference(b[p["lmbda"]], p, data) for p in test["points"] if p["lmbda"] in b]}


def pairs(ptq: Sequence[Mapping[str, Any]], models: Sequence[Mapping[str, Any]],
          data: ImageData = NO_DATA) -> list[dict[str, Any]]:
    """Every (BASE-family model, TEST-family model) at one lambda, with each one's PTQ loss per quantized variant
    and TEST's minus BASE's. `kind`: "equal FP32 quality" when one is an equal-quality model, else "same λ"
    (equal steps or equal time: the steps are listed). Equal-quality pairs first."""
    by_curve: dict[str, dict[float, Mapping[str, Any]]] = {}
    for m in models:
        by_curve.setdefault(m["curve"], {})[m["lmbda"]] = m
    out = []
    for cb, mb in by_curve.items():
        for ct, mt in by_curve.items():
            for lm in sorted(set(mb) & set(mt)):
                base, test = mb[lm], mt[lm]
                if base["optimizer"] != BASE or test["optimizer"] != TEST:
                    continue
                rows = []
                for variant in {e["variant"]: None for e in ptq if e["curve"] in (cb, ct)}:
                    hits = [next((p for e in ptq if e["curve"] == c and e["variant"] == variant
                                  for p in e["points"] if p["lmbda"] == lm), None) for c in (cb, ct)]
                    if all(hits):
                        rows.append({"variant": variant, BASE: hits[0], TEST: hits[1],
                                     "difference": point_difference(hits[0], hits[1], data)})
                eq = cb.endswith("-eq") or ct.endswith("-eq")
                out.append({"lmbda": lm, "kind": "equal FP32 quality" if eq else "same λ",
                            BASE: {k: base.get(k) for k in ("name", "curve", "steps")},
                            TEST: {k: test.get(k) for k in ("name", "curve", "steps")}, "rows": rows})
    return sorted(out, key=lambda p: (p["kind"] != "equal FP32 quality", p["lmbda"]))


GPU_BASELINE = "torch-cuda:fp32"


def _by_variant(results: Mapping[str, Any], gpu: bool) -> dict[str, list[Mapping[str, Any]]]:
    """Latency records grouped by variant: CPU engines only, or GPU engines only."""
    out: dict[str, list[Mapping[str, Any]]] = {}
    for rec in results["latency"]:
        if (rec.get("device", "cpu") != "cpu") == gpu:
            out.setdefault(rec["variant"], []).append(rec)
    return out


def latency_table(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per CPU variant: the median over models of each step's median seconds, the float transforms' sum, and its
    ratio to torch:fp32 and ort:fp32 when those were measured (same run, same machine)."""
    by_variant = _by_variant(results, gpu=False)
    rows = []
    for variant, recs in by_variant.items():
        med = {s: statistics.median(r["median_s"][s] for r in recs) for s in STEPS}
        rows.append({"variant": variant, "models": len(recs), "median_s": med,
                     "transforms_s": sum(med[s] for s in TRANSFORM_STEPS),
                     "encode_s": statistics.median(r["encode_s"] for r in recs),
                     "decode_s": statistics.median(r["decode_s"] for r in recs)})
    base = {r["variant"]: r["transforms_s"] for r in rows}
    for r in rows:
        for ref in ("torch:fp32", "ort:fp32"):
            r[f"vs_{ref.replace(':', '_')}"] = r["transforms_s"] / base[ref] if base.get(ref) else None
    return rows


def gpu_latency_table(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per GPU variant (torch-cuda, tensorrt): median over models of each float stage's synchronised
    milliseconds, of whole encode and decode host to host (entropy coding on the CPU included), frames per
    second of each, and ratios to PyTorch CUDA FP32 (stages: sum of the three; codec: encode + decode)."""
    rows = []
    for variant, recs in _by_variant(results, gpu=True).items():
        synced = [r["synced"] for r in recs if r.get("synced")]
        stage_ms = {s: statistics.median(x["ms"][s] for x in synced) for s in TRANSFORM_STEPS} if synced else {}
        enc, dec = (statistics.median(r[k] for r in recs) for k in ("encode_s", "decode_s"))
        rows.append({"variant": variant, "device": recs[0].get("device"), "models": len(recs),
                     "image": f"{recs[0]['width']}x{recs[0]['height']}",
                     "mode": synced[0]["mode"] if synced else None, "stage_ms": stage_ms,
                     "stages_ms": sum(stage_ms.values()) if stage_ms else None,
                     "encode_ms": 1000 * enc, "decode_ms": 1000 * dec, "encode_fps": 1 / enc if enc else None,
                     "decode_fps": 1 / dec if dec else None})
    base = next((r for r in rows if r["variant"] == GPU_BASELINE), None)
    for r in rows:
        r["stages_vs_baseline"] = r["stages_ms"] / base["stages_ms"] if base and base["stages_ms"] and \
            r["stages_ms"] else None
        r["codec_vs_baseline"] = (r["encode_ms"] + r["decode_ms"]) / (base["encode_ms"] + base["decode_ms"]) \
            if base else None
    return rows


def fallback_cost(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per fallback package: layers kept in FP32, calibration loss before/after, and the float transforms'
    latency of INT8+fallback against plain INT8 and FP32 of the same model and backend."""
    lat = {(r["model"], r["variant"]): sum(r["median_s"][s] for s in TRANSFORM_STEPS) for r in results["latency"]}
    out = []
    for fb in results["fallback"]:
        backend, _, calib = fb["variant"].split(":")
        t = lat.get((fb["model"], fb["variant"]))
        int8, fp32 = lat.get((fb["model"], f"{backend}:int8:{calib}")), lat.get((fb["model"], f"{backend}:fp32"))
        out.append({"model": fb["model"], "variant": fb["variant"], "kept_layers": fb["kept_layers"],
                    "kept_float": fb["kept_float"], "target_pct": fb["target_pct"],
                    "loss_before_pct": fb["steps"][0]["loss_pct"], "loss_after_pct": fb["loss_pct"], "met": fb["met"],
                    "transforms_s": t, "int8_transforms_s": int8, "fp32_transforms_s": fp32,
                    "vs_int8": t / int8 if t and int8 else None, "vs_fp32": t / fp32 if t and fp32 else None})
    return out


def analyse(results: Mapping[str, Any]) -> dict[str, Any]:
    """Everything the report shows, from the results' rows, summaries, latency, fallback and outlier records."""
    from lic_deploy.bench.outlier_compare import fallback_vs_sqnr, outlier_pairs

    data = ImageData(results)
    cs = curves(results)
    ptq = ptq_losses(cs, data)

    def find(curve: str, variant: str) -> dict[str, Any] | None:
        return next((e for e in ptq if e["curve"] == curve and e["variant"] == variant), None)

    headline = [{"variant": v, BASE: find(BASE, v), TEST: find(TEST, v),
                 "difference": difference(find(BASE, v), find(TEST, v), data)}
                for v in {e["variant"]: None for e in ptq if e["curve"] in (BASE, TEST)}]
    optimizers = []
    if BASE in cs and TEST in cs:
        for variant in cs[BASE]:
            if variant in cs[TEST]:
                optimizers.append({"variant": variant, "anchor_curve": BASE, "test_curve": TEST,
                                   **compare(cs[BASE][variant], cs[TEST][variant])})
    found = pairs(ptq, results["models"], data)
    return {"min_bd_points": MIN_BD_POINTS, "bootstrap": None if data.boot is None else
            {"reps": data.boot.reps, "level": data.boot.level, "images": data.boot.n},
            "ptq_loss": ptq, "headline": headline, "optimizers": optimizers, "pairs": found,
            "outlier_pairs": outlier_pairs(results, found), "latency": latency_table(results),
            "gpu_latency": gpu_latency_table(results),
            "fallback": fallback_cost(results), "fallback_vs_sqnr": fallback_vs_sqnr(results)}
