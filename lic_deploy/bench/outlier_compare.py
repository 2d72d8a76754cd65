"""Outliers of two models side by side, and whether the FP32 fallback keeps the layers with the worst SQNR.

The SOAP study's mechanism claim is that SOAP-trained models carry fewer activation and latent outliers, hence lose
less to post-training quantization. Two models are compared layer by layer on the statistics of
`bench.outliers` (max |a| / sigma, Pearson kurtosis, per-layer INT8 SQNR on the bench images, min-max scales from
the calibration crops). The verdict counts convolution inputs: "fewer" when the TEST model's max/sigma and its
kurtosis are both lower in more than half of them, "more" when both are higher in more than half, else "mixed".
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

KEYS = ("max_over_sigma", "kurtosis", "sqnr_db")
CONV = "conv input"


def _layers(results: Mapping[str, Any]) -> dict[str, dict[str, Mapping[str, Any]]]:
    """model -> layer name -> outlier row."""
    return {rec["model"]: {r["name"]: r for r in rec["layers"]} for rec in results.get("outliers", [])}


def _share_lower(test: Sequence[float], base: Sequence[float]) -> tuple[int, float | None]:
    """(how many of the pairs have test < base, median of test / base)."""
    pairs = [(t, b) for t, b in zip(test, base, strict=True) if t is not None and b is not None]
    ratios = [t / b for t, b in pairs if b]
    return sum(t < b for t, b in pairs), (statistics.median(ratios) if ratios else None)


def compare_outliers(base: Mapping[str, Mapping[str, Any]], test: Mapping[str, Mapping[str, Any]],
                     base_name: str = "base", test_name: str = "test") -> dict[str, Any]:
    """Layer-by-layer statistics of two models (same architecture) and the verdict on TEST's outliers."""
    names = [n for n in base if n in test]
    layers = [{"name": n, "kind": base[n]["kind"], base_name: {k: base[n].get(k) for k in KEYS},
               test_name: {k: test[n].get(k) for k in KEYS}} for n in names]
    convs = [n for n in names if base[n]["kind"] == CONV]
    summary: dict[str, Any] = {"conv_layers": len(convs)}
    for key in KEYS:
        lower, ratio = _share_lower([test[n].get(key) for n in convs], [base[n].get(key) for n in convs])
        summary[f"test_lower_{key}"], summary[f"median_ratio_{key}"] = lower, ratio
    half = len(convs) / 2
    lower_both = summary["test_lower_max_over_sigma"] > half and summary["test_lower_kurtosis"] > half
    higher_both = (len(convs) - summary["test_lower_max_over_sigma"] > half
                   and len(convs) - summary["test_lower_kurtosis"] > half)
    verdict = "fewer" if lower_both else "more" if higher_both else "mixed"
    latents = {n: {base_name: {k: base[n].get(k) for k in KEYS[:2]}, test_name: {k: test[n].get(k) for k in KEYS[:2]}}
               for n in names if base[n]["kind"] == "latent"}
    return {"layers": layers, "summary": summary, "latents": latents, "verdict": verdict}


def outlier_pairs(results: Mapping[str, Any], found: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """`compare_outliers` for every pair of `compare.pairs` whose two models both have outlier statistics."""
    from lic_deploy.bench.compare import BASE, TEST

    stats = _layers(results)
    out = []
    for pair in found:
        b, t = pair[BASE]["name"], pair[TEST]["name"]
        if b in stats and t in stats:
            out.append({"lmbda": pair["lmbda"], "kind": pair["kind"], BASE: b, TEST: t,
                        **compare_outliers(stats[b], stats[t], BASE, TEST)})
    return out


def fallback_vs_sqnr(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per fallback package that kept k > 0 layers in FP32: the k fallback candidates (the layers its ranking
    holds: g_a, h_a, g_s; h_s runs as the integer network) with the lowest INT8 SQNR on the bench images (outlier
    statistics of the same model), and how many of the kept layers are among them."""
    stats = _layers(results)
    out = []
    for fb in results.get("fallback", []):
        kept = list(fb.get("kept_layers") or [])
        layers = stats.get(fb["model"])
        if not kept or not layers:
            continue
        candidates = {r["layer"] for r in fb.get("ranking", [])} or set(layers)
        ranked = sorted((r for r in layers.values() if r["kind"] == CONV and r.get("sqnr_db") is not None
                         and r["name"] in candidates), key=lambda r: r["sqnr_db"])
        worst = [r["name"] for r in ranked[: len(kept)]]
        out.append({"model": fb["model"], "variant": fb["variant"], "kept": kept, "worst_sqnr": worst,
                    "overlap": len(set(kept) & set(worst)), "conv_layers": len(ranked)})
    return out
