"""Comparisons computed from a bench results document alone: PTQ loss, SOAP against Adam, equal-quality points,
latency ratios and the cost of the FP32 fallback.

A curve is one optimizer's equal-steps models (or, as "<optimizer>-eq", its equal-quality models), one point per
lambda: the mean bpp and PSNR over the images, per variant. The PTQ loss of a variant is the BD-rate (pchip,
PSNR, `bdrate.bd_rate`) of its curve against the same curve in FP32 on the same backend (ort:fp32 when that
backend has no FP32), in percent, positive = the quantized codec needs more bits for the same PSNR. It needs at
least four common lambdas; every comparison also lists, per lambda, the PSNR change (dB, negative = worse) and
the bpp change (%), which is what the tables show where a BD-rate is not possible.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from lic_deploy.bench.bdrate import bd_rate
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


def compare(anchor: Mapping[float, Mapping[str, Any]], test: Mapping[float, Mapping[str, Any]]) -> dict[str, Any]:
    """Per-lambda changes of `test` against `anchor`, and the BD-rate when four or more lambdas are common."""
    common = sorted(set(anchor) & set(test))
    points = [{"lmbda": lm, "anchor_bpp": anchor[lm]["bpp"], "anchor_psnr": anchor[lm]["psnr"],
               "bpp": test[lm]["bpp"], "psnr": test[lm]["psnr"], "dpsnr_db": test[lm]["psnr"] - anchor[lm]["psnr"],
               "dbpp_pct": 100.0 * (test[lm]["bpp"] / anchor[lm]["bpp"] - 1.0)} for lm in common]
    out: dict[str, Any] = {"lambdas": common, "points": points, "bd_rate_pct": None, "method": "per-point"}
    if len(common) >= MIN_BD_POINTS:
        try:
            with warnings.catch_warnings(record=True) as caught:  # bjontegaard warns about a small overlap
                warnings.simplefilter("always")
                value = bd_rate([p["anchor_bpp"] for p in points], [p["anchor_psnr"] for p in points],
                                [p["bpp"] for p in points], [p["psnr"] for p in points])
            if not math.isfinite(value):  # bjontegaard returns NaN when the PSNR ranges do not meet
                out["note"] = "BD-rate n/a: the curves' PSNR ranges do not overlap"
                return out
            out["bd_rate_pct"], out["method"] = value, "bd-rate (pchip, PSNR)"
            if caught:
                out["note"] = "; ".join(str(w.message) for w in caught)
        except (ValueError, AssertionError):  # pchip needs PSNR to rise with rate along each curve
            out["note"] = "BD-rate n/a: PSNR does not rise with rate along a curve"
    return out


def ptq_losses(cs: Mapping[str, Mapping[str, Mapping[float, Any]]]) -> list[dict[str, Any]]:
    """Every non-FP32 variant of every curve against the curve's own FP32."""
    out = []
    for curve, variants in cs.items():
        for variant, points in variants.items():
            anchor = anchor_of(variant, list(variants))
            if variant.split(":")[1] != ANCHOR and anchor:
                out.append({"curve": curve, "variant": variant, "anchor": anchor, **compare(variants[anchor], points)})
    return out


def difference(base: Mapping[str, Any] | None, test: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """TEST's PTQ loss minus BASE's: in BD-rate percentage points, or per common lambda."""
    if not base or not test:
        return None
    if base["bd_rate_pct"] is not None and test["bd_rate_pct"] is not None:
        return {"bd_rate_pp": test["bd_rate_pct"] - base["bd_rate_pct"]}
    b = {p["lmbda"]: p for p in base["points"]}
    return {"points": [{"lmbda": p["lmbda"], "dpsnr_db": p["dpsnr_db"] - b[p["lmbda"]]["dpsnr_db"],
                        "dbpp_pp": p["dbpp_pct"] - b[p["lmbda"]]["dbpp_pct"]}
                       for p in test["points"] if p["lmbda"] in b]}


def equal_quality(cs: Mapping[str, Mapping[str, Mapping[float, Any]]], ptq: Sequence[Mapping[str, Any]],
                  models: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """An equal-quality curve ("adam-eq": Adam trained on to SOAP's validation loss, or "soap-eq": SOAP stopped
    when it reached Adam's) against TEST and BASE at the eq models' lambdas, per point."""
    eq = next((c for c in cs if c.endswith("-eq")), None)
    if eq is None:
        return None
    partner = TEST if eq == f"{BASE}-eq" else BASE
    steps = {(m["curve"], m["lmbda"]): m.get("steps") for m in models}
    lambdas = sorted({lm for points in cs[eq].values() for lm in points})
    fp32 = {c: [{"lmbda": lm, "model": p["model"], "steps": steps.get((c, lm)), "bpp": p["bpp"], "psnr": p["psnr"]}
                for lm, p in sorted(cs[c].get(f"ort:{ANCHOR}", {}).items()) if lm in lambdas]
            for c in (eq, TEST, BASE) if c in cs}
    rows = []
    for variant in {e["variant"]: None for e in ptq if e["curve"] == eq}:
        entry = {"variant": variant}
        for c in (eq, TEST, BASE):
            hit = next((e for e in ptq if e["curve"] == c and e["variant"] == variant), None)
            entry[c] = [p for p in hit["points"] if p["lmbda"] in lambdas] if hit else []
        rows.append(entry)
    return {"curve": eq, "partner": partner, "lambdas": lambdas, "fp32": fp32, "rows": rows,
            "label": "per point (one model per curve at each lambda): PSNR change dB, bpp change %"}


def latency_table(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per variant: the median over models of each step's median seconds, the float transforms' sum, and its
    ratio to torch:fp32 and ort:fp32 when those were measured (same run, same machine)."""
    by_variant: dict[str, list[Mapping[str, Any]]] = {}
    for rec in results["latency"]:
        by_variant.setdefault(rec["variant"], []).append(rec)
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
    """Everything the report shows, from the results' summaries, latency and fallback records."""
    cs = curves(results)
    ptq = ptq_losses(cs)

    def find(curve: str, variant: str) -> dict[str, Any] | None:
        return next((e for e in ptq if e["curve"] == curve and e["variant"] == variant), None)

    headline = [{"variant": v, BASE: find(BASE, v), TEST: find(TEST, v), "difference": difference(find(BASE, v),
                                                                                                   find(TEST, v))}
                for v in {e["variant"]: None for e in ptq if e["curve"] in (BASE, TEST)}]
    optimizers = []
    if BASE in cs and TEST in cs:
        for variant in cs[BASE]:
            if variant in cs[TEST]:
                optimizers.append({"variant": variant, "anchor_curve": BASE, "test_curve": TEST,
                                   **compare(cs[BASE][variant], cs[TEST][variant])})
    return {"min_bd_points": MIN_BD_POINTS, "ptq_loss": ptq, "headline": headline, "optimizers": optimizers,
            "equal_quality": equal_quality(cs, ptq, results["models"]), "latency": latency_table(results),
            "fallback": fallback_cost(results)}
