"""`lic-deploy report`: report.md and PNG plots, regenerated from a bench results.json alone (matplotlib, Agg).

Definitions of every number are in docs/bench.md; the report links there rather than repeating them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lic_deploy.atomic import atomic_path
from lic_deploy.bench.compare import ANCHOR, BASE, GPU_BASELINE, TEST, analyse
from lic_deploy.bench.latency import format_table
from lic_deploy.bench.runner import STEPS, TRANSFORM_STEPS

COLOURS = {BASE: "tab:blue", TEST: "tab:orange", f"{BASE}-eq": "tab:green", f"{TEST}-eq": "tab:red"}


def _num(v: Any, fmt: str = ".4g") -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _ci(ci: Sequence[float] | None, fmt: str) -> str:
    """" [low, high]" of a 95 % interval, or nothing."""
    return f" [{format(ci[0], fmt)}, {format(ci[1], fmt)}]" if ci else ""


def change(p: Mapping[str, Any]) -> str:
    """A point's rate-equivalent loss (%, where measured), PSNR change (dB) and bpp change (%), with intervals."""
    req = f"**{p['req_pct']:+.2f} %**{_ci(p['req_ci'], '+.2f')} rate-eq; " if p.get("req_pct") is not None else ""
    return (f"{req}{p['dpsnr_db']:+.3f} dB{_ci(p.get('dpsnr_ci'), '+.3f')}, "
            f"{p['dbpp_pct']:+.2f} % bpp{_ci(p.get('dbpp_ci'), '+.2f')}")


def diff_change(d: Mapping[str, Any]) -> str:
    """A difference of two points' losses (pp of rate-equivalent loss, dB, pp of bpp), intervals, verdict."""
    req = f"**{d['dreq_pp']:+.2f} pp**{_ci(d['dreq_ci'], '+.2f')} rate-eq; " if d.get("dreq_pp") is not None else ""
    return (f"{req}{d['dpsnr_db']:+.3f} dB{_ci(d.get('dpsnr_ci'), '+.3f')}, {d['dbpp_pp']:+.2f} pp bpp"
            f"{_ci(d.get('dbpp_ci'), '+.2f')} ({d.get('verdict', 'no interval')})")


def _points(points: Sequence[Mapping[str, Any]]) -> str:
    return "; ".join(f"λ {p['lmbda']:g}: {change(p)}" for p in points)


def ptq_cell(entry: Mapping[str, Any] | None) -> str:
    """A BD-rate in percent with its interval, or the per-point PSNR and bpp changes, labelled."""
    if not entry:
        return "–"
    if entry["bd_rate_pct"] is not None:
        return f"{entry['bd_rate_pct']:+.2f} %{_ci(entry.get('bd_rate_ci'), '+.2f')} (BD-rate)"
    return (f"{entry['note']}; " if entry.get("note") else "") + f"per point: {_points(entry['points'])}"


def diff_cell(diff: Mapping[str, Any] | None) -> str:
    if not diff:
        return "–"
    if "bd_rate_pp" in diff:
        noise = "" if "outside_noise" not in diff else " (outside the noise)" if diff["outside_noise"] \
            else " (inside the noise)"
        return f"{diff['bd_rate_pp']:+.2f} pp{_ci(diff.get('bd_rate_ci'), '+.2f')}{noise}"
    return "per point: " + "; ".join(f"λ {p['lmbda']:g}: {diff_change(p)}" for p in diff["points"])


def _scale(models: Sequence[Mapping[str, Any]]) -> str:
    """"9 models: mbt2018-mean N=64 M=96, 100-1000 training steps" (architectures and configs as recorded)."""
    kinds = {f"{m.get('arch', '?')} " + " ".join(f"{k}={v}" for k, v in (m.get("config") or {}).items())
             for m in models}
    steps = [m["steps"] for m in models if m.get("steps")]
    span = f", {min(steps)}-{max(steps)} training steps" if steps else ""
    return f"{len(models)} models: {'; '.join(sorted(kinds))}{span}"


def _settings_line(st: Mapping[str, Any]) -> str:
    """Calibration and latency settings of one run (the images are the same in every merged run)."""
    return (f"calibration: {st['calib'] or 'scikit-image photos'} ({st['calib_count']} crops); latency: median of "
            f"{st['repeat']} runs after {st['warmup']} warm-up")


def _header(results: Mapping[str, Any], note: str | None = None) -> list[str]:
    st = results["settings"]
    imgs = st["images"]
    names = ", ".join(imgs) if len(imgs) <= 6 else f"{imgs[0]} ... {imgs[-1]}"
    sources = results.get("sources") or [{"file": None, "created": results["created"],
                                          "command": results["command"], "environment": results["environment"]}]
    per_run = len({_settings_line(s.get("settings", st)) for s in sources}) > 1  # merged runs that differ
    lines = ["# lic-deploy bench report", "", *([note, ""] if note else [])]
    if len(sources) > 1:
        lines += [f"Merged by `lic-deploy report` from {len(sources)} runs over the same images (the first run wins "
                  "for a model and variant measured twice):", ""]
    for src in sources:
        env = src["environment"]
        versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        lines += [f"Made on {src['created']}" + (f" (`{src['file']}`)" if src["file"] else "") + " by", "",
                  f"    {src['command']}", "",
                  f"- machine: {env['cpu']} ({env['cpus_available']} CPUs available), {env['platform']}; "
                  f"threads {env['threads']}", f"- versions: {versions}",
                  *([f"- {_settings_line(src.get('settings', st))}"] if per_run else []), ""]
    return [*lines, "Regenerated from results.json by `lic-deploy report`.", "",
            f"- {_scale(results['models'])}",
            f"- images: {len(imgs)} from `{st['data']}` ({names})"
            + ("; calibration and latency settings differ between the runs (above)" if per_run
               else f"; {_settings_line(st)}"),
            "- definitions (PTQ loss, BD-rate, intervals, outlier statistics, SQNR): docs/bench.md. Rate is always "
            "the byte length of real .lic streams.", ""]


def _bootstrap_line(an: Mapping[str, Any]) -> str:
    b = an.get("bootstrap")
    if not b:
        return "No per-image rows: no confidence intervals."
    rough = f" With {b['images']} images they are rough." if b["images"] < 10 else ""
    return (f"Brackets: {100 * b['level']:g} % paired bootstrap intervals over the {b['images']} images "
            f"({b['reps']} resamples; the same resampled images for FP32 and INT8 and for both models).{rough}")


def _headline(an: Mapping[str, Any]) -> list[str]:
    rows = [[h["variant"], ptq_cell(h[BASE]), ptq_cell(h[TEST]), diff_cell(h["difference"])] for h in an["headline"]]
    return [f"## Headline: PTQ loss of the {BASE} and {TEST} curves", "",
            f"Each quantized curve against the same optimizer's FP32 curve (BD-rate needs {an['min_bd_points']} "
            "lambdas; positive = more bits for the same PSNR). Per-point cells: PSNR change and bpp change of the "
            f"quantized codec at that lambda. {_bootstrap_line(an)}", "",
            format_table(["variant", f"{BASE} PTQ loss", f"{TEST} PTQ loss", f"{TEST} − {BASE}"], rows), ""]


def _model_cell(m: Mapping[str, Any], point: Mapping[str, Any] | None) -> str:
    fp32 = f", FP32 {point['anchor_bpp']:.4f} bpp / {point['anchor_psnr']:.2f} dB" if point else ""
    return f"`{m['name']}` ({m['curve']}, {_num(m['steps'])} steps{fp32})"


def _pairs(an: Mapping[str, Any]) -> list[str]:
    if not an["pairs"]:
        return []
    lines = [f"## Model pairs: {TEST} against {BASE} at one λ", "",
             f"Every {BASE}-family model against every {TEST}-family model at the same λ. Cells: PTQ loss of each "
             "(the quantized codec against the same model in FP32): the rate-equivalent loss at the model's λ, "
             "100 ((R + λ·MSE)_quantized − (R + λ·MSE)_FP32) / R_FP32 (one number weighing the quality and the "
             f"rate change; positive = a loss), then the PSNR and bpp changes; and {TEST}'s minus {BASE}'s "
             f"(positive pp of rate-equivalent loss = {TEST} loses more; the verdict is read from it). "
             f"{_bootstrap_line(an)}", ""]
    for pair in an["pairs"]:
        first = pair["rows"][0] if pair["rows"] else {}
        lines += [f"### λ {pair['lmbda']:g}, {pair['kind']}: {_model_cell(pair[BASE], first.get(BASE))} against "
                  f"{_model_cell(pair[TEST], first.get(TEST))}", "",
                  format_table(["variant", f"{BASE} PTQ loss", f"{TEST} PTQ loss", f"{TEST} − {BASE}"],
                               [[r["variant"], change(r[BASE]), change(r[TEST]), diff_change(r["difference"])]
                                for r in pair["rows"]]), ""]
    return lines


def _outlier_pairs(an: Mapping[str, Any]) -> list[str]:
    if not an["outlier_pairs"]:
        return []
    lines = [f"## Outliers, {TEST} against {BASE}", "",
             f"Per layer input (convolutions, then the latents), pooled over the outlier images. Verdict on {TEST}: "
             "`fewer` when both its max/σ and its kurtosis are lower in more than half of the convolution inputs, "
             "`more` when both are higher in more than half, else `mixed`.", ""]
    rows = []
    for op in an["outlier_pairs"]:
        sm = op["summary"]
        y = op["latents"].get("y", {})
        rows.append([f"{op['lmbda']:g}", op["kind"], op[BASE], op[TEST],
                     f"{sm['test_lower_max_over_sigma']}/{sm['conv_layers']}", _num(sm["median_ratio_max_over_sigma"]),
                     f"{sm['test_lower_kurtosis']}/{sm['conv_layers']}", _num(sm["median_ratio_kurtosis"]),
                     f"{sm['test_lower_sqnr_db']}/{sm['conv_layers']}",
                     f"{_num(y.get(BASE, {}).get('max_over_sigma'))} / {_num(y.get(TEST, {}).get('max_over_sigma'))}",
                     op["verdict"]])
    lines += [format_table(["λ", "pair", BASE, TEST, "max/σ lower", "median ratio", "kurtosis lower", "median ratio",
                            "SQNR lower", f"y max/σ {BASE} / {TEST}", "verdict"], rows), ""]
    for op in (o for o in an["outlier_pairs"] if o["kind"] == "equal FP32 quality"):
        lines += [f"### Layer by layer at equal FP32 quality: `{op[BASE]}` against `{op[TEST]}`", "",
                  format_table(["layer", f"{BASE} max/σ", f"{TEST} max/σ", f"{BASE} kurtosis", f"{TEST} kurtosis",
                                f"{BASE} SQNR dB", f"{TEST} SQNR dB"],
                               [[r["name"], *[_num(r[side][k]) for k in ("max_over_sigma", "kurtosis", "sqnr_db")
                                              for side in (BASE, TEST)]] for r in op["layers"]]), ""]
    return [*lines, "![outliers at equal quality](outliers_equal_quality.png)", ""]


def _optimizers(an: Mapping[str, Any]) -> list[str]:
    if not an["optimizers"]:
        return []
    rows = [[o["variant"], ptq_cell(o)] for o in an["optimizers"]]
    return [f"## {TEST} against {BASE}", "", f"Same variant, {TEST} curve against {BASE} curve (negative = {TEST} "
            "saves bits).", "", format_table(["variant", f"{TEST} vs {BASE}"], rows), ""]


def _rd_table(results: Mapping[str, Any]) -> list[str]:
    model = {m["name"]: m for m in results["models"]}
    rows = [[s["model"], model[s["model"]]["curve"], f"{model[s['model']]['lmbda']:g}", s["variant"], s["bpp"],
             s["psnr"], _num(s["ms_ssim"])] for s in results["summaries"]]
    return ["## Rate-distortion points", "", "Means over the images; MS-SSIM over those of at least 161 pixels "
            "a side.", "", format_table(["model", "curve", "λ", "variant", "bpp", "PSNR dB", "MS-SSIM"], rows), ""]


def _latency(an: Mapping[str, Any], results: Mapping[str, Any]) -> list[str]:
    if not an["latency"]:
        return []
    rec = results["latency"][0]
    rows = [[r["variant"], *(1000 * r["median_s"][s] for s in STEPS), 1000 * r["transforms_s"],
             _num(r["vs_torch_fp32"]), _num(r["vs_ort_fp32"])] for r in an["latency"]]
    return ["## Latency", "",
            f"Milliseconds per step on {rec['image']} ({rec['width']}x{rec['height']}), median over models of each "
            f"model's median; {results['environment']['threads']} threads. `entropy` steps include the integer h_s. "
            "`transforms` = g_a + h_a + g_s, the part an engine runs; ratios are against that part of the named "
            "baseline, measured in the same run.", "",
            format_table(["variant", *[f"{s} ms" for s in STEPS], "transforms ms", "vs torch:fp32", "vs ort:fp32"],
                         rows), ""]


def _gpu_latency(an: Mapping[str, Any], results: Mapping[str, Any]) -> list[str]:
    head = ["## GPU latency", ""]
    if not an["gpu_latency"]:
        gpu_skips = {s["reason"] for s in results["skipped"] if s.get("device", "cpu") != "cpu"}
        why = "; ".join(sorted(gpu_skips)) if gpu_skips else \
            "this run used no GPU (`lic-deploy bench --device cuda` measures PyTorch CUDA and TensorRT)"
        return [*head, f"No GPU rows: {why}.", ""]
    rows = [[r["variant"], r["device"], *(_num(r["stage_ms"].get(s)) for s in TRANSFORM_STEPS), _num(r["stages_ms"]),
             _num(r["stages_vs_baseline"]), _num(r["encode_ms"]), _num(r["decode_ms"]), _num(r["encode_fps"]),
             _num(r["decode_fps"]), _num(r["codec_vs_baseline"])] for r in an["gpu_latency"]]
    first = an["gpu_latency"][0]
    return [*head, f"On {first['image']} pixels, median over models. Stages: milliseconds between two CUDA "
            f"synchronisations ({first['mode']}); encode and decode: host to host, the CPU's integer entropy "
            f"model and range coder included; fps = 1 / that time. Ratios against {GPU_BASELINE} of the same run.",
            "", format_table(["variant", "device", "g_a ms", "h_a ms", "g_s ms", "stages ms",
                              f"vs {GPU_BASELINE}", "encode ms", "decode ms", "encode fps", "decode fps",
                              f"codec vs {GPU_BASELINE}"], rows), "", "![GPU latency](gpu_latency.png)", ""]


def _fallback(an: Mapping[str, Any]) -> list[str]:
    if not an["fallback"]:
        return []
    worst = {(w["model"], w["variant"]): w for w in an.get("fallback_vs_sqnr", [])}

    def overlap(f: Mapping[str, Any]) -> str:
        w = worst.get((f["model"], f["variant"]))
        return "–" if w is None else f"{w['overlap']} of {len(w['kept'])}"

    rows = [[f["model"], f["variant"], f"{f['target_pct']:g} %", f"{f['loss_before_pct']:+.3f} → "
             f"{f['loss_after_pct']:+.3f} %", ", ".join(f["kept_layers"]) or "none", overlap(f),
             _num(f["transforms_s"] and 1000 * f["transforms_s"]), _num(f["vs_int8"]), _num(f["vs_fp32"])]
            for f in an["fallback"]]
    return ["## Mixed precision: INT8 with FP32 fallback", "",
            "`export --int8 --fallback auto`: layers kept in FP32 (most INT8-sensitive first) until the "
            "rate-equivalent PTQ loss on the calibration crops met the target; latency of the float transforms "
            "against plain INT8 and FP32 of the same model. `among worst SQNR`: how many of the k kept layers are "
            "among the k layers with the lowest INT8 SQNR on the bench images (Outliers section).", "",
            format_table(["model", "variant", "target", "calibration loss", "kept in FP32", "among worst SQNR",
                          "transforms ms", "vs INT8", "vs FP32"], rows), ""]


def _outliers(results: Mapping[str, Any]) -> list[str]:
    if not results["outliers"]:
        return []
    model = {m["name"]: m for m in results["models"]}

    def med(values: list[Any]) -> float | None:
        vals = [v for v in values if v is not None]
        return float(np.median(vals)) if vals else None

    rows = []
    for rec in results["outliers"]:
        convs = [r for r in rec["layers"] if r["kind"] == "conv input"]
        lat = {r["name"]: r for r in rec["layers"] if r["kind"] == "latent"}
        ratios = [r["max_over_sigma"] for r in convs if r["max_over_sigma"] is not None]
        sq = [r["sqnr_db"] for r in convs if r["sqnr_db"] is not None]
        m = model[rec["model"]]
        rows.append([rec["model"], m["curve"], f"{m['lmbda']:g}", _num(med(ratios)), _num(max(ratios, default=None)),
                     _num(med([r["kurtosis"] for r in convs])), _num(lat["y"]["max_over_sigma"]),
                     _num(lat["y"]["kurtosis"]), _num(lat["z"]["max_over_sigma"]), _num(med(sq)),
                     _num(min(sq, default=None))])
    rec = results["outliers"][0]
    return ["## Outliers", "",
            f"Inputs of every convolution (INT8 graphs' view: GDN normalisations excluded) and the latents, pooled "
            f"over {rec['images']} images; INT8 scales for the SQNR from {rec['calib_crops']} calibration crops "
            "(min-max). Kurtosis is Pearson's (normal = 3).", "",
            format_table(["model", "curve", "λ", "median max/σ", "max max/σ", "median kurtosis", "y max/σ",
                          "y kurtosis", "z max/σ", "median SQNR dB", "min SQNR dB"], rows), "",
            "![outlier profile](outlier_profile.png)", "", "![outliers against SQNR](outlier_vs_sqnr.png)", ""]


def render(results: Mapping[str, Any], an: Mapping[str, Any], note: str | None = None) -> str:
    """The report's markdown; `an` is `compare.analyse(results)`; `note` a paragraph under the title."""
    lines = [*_header(results, note), *_headline(an), "![PTQ loss](ptq_loss.png)", "", *_pairs(an),
             "![PTQ loss per model pair](pairs.png)", "", *_optimizers(an), "![rate-distortion curves](rd_curves.png)",
             "", *_rd_table(results), *_latency(an, results), "![latency](latency.png)", "",
             *_gpu_latency(an, results), *_fallback(an),
             *_outliers(results), *_outlier_pairs(an)]
    if results["skipped"]:
        groups: dict[tuple[str, str], list[str]] = {}
        for s in results["skipped"]:
            groups.setdefault((s["variant"], s["reason"]), []).append(s["model"])
        lines += ["## Skipped", "", *[f"- {v} ({len(m)} models: {', '.join(m)}): {r}" for (v, r), m in groups.items()],
                  ""]
    return "\n".join(lines)


def write_report(results: Mapping[str, Any], out: str | os.PathLike, note: str | None = None,
                 an: Mapping[str, Any] | None = None) -> Path:
    """Write OUT/report.md and the plots it shows (`note`: a paragraph under the title; `an`: the results'
    `compare.analyse`, computed here when not given); the report's path."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    an = an if an is not None else analyse(results)
    plot_rd(results, out / "rd_curves.png")
    plot_ptq(an, out / "ptq_loss.png")
    plot_outlier_profile(results, out / "outlier_profile.png")
    plot_outlier_sqnr(results, out / "outlier_vs_sqnr.png")
    plot_latency(an, out / "latency.png")
    plot_pairs(an, out / "pairs.png")
    if an["gpu_latency"]:
        plot_gpu_latency(an, out / "gpu_latency.png")
    plot_outlier_pair(an, out / "outliers_equal_quality.png")
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text(render(results, an, note) + "\n")
    return path


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _empty(path: Path, text: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 1.5))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")
    _save(fig, path)


def plot_rd(results: Mapping[str, Any], path: Path) -> None:
    """PSNR against bpp, one panel per quantized ORT variant: FP32 solid, quantized dashed, per curve."""
    import matplotlib.pyplot as plt

    from lic_deploy.bench.compare import curves

    cs = curves(results)
    quant = list({v: None for c in cs.values() for v in c if v.startswith("ort:") and v != f"ort:{ANCHOR}"})
    panels = quant or [f"ort:{ANCHOR}"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4), squeeze=False)
    for ax, variant in zip(axes[0], panels, strict=True):
        for curve, variants in sorted(cs.items()):
            for key, style in ((f"ort:{ANCHOR}", "-o"), (variant, "--x"))[: 1 if variant == f"ort:{ANCHOR}" else 2]:
                pts = sorted(variants.get(key, {}).items())
                if pts:
                    ax.plot([p["bpp"] for _, p in pts], [p["psnr"] for _, p in pts], style,
                            color=COLOURS.get(curve, "tab:gray"), label=f"{curve} {key.split(':', 1)[1]}")
        ax.set(title=variant, xlabel="bpp (real .lic bytes)", ylabel="PSNR dB (RGB, 8 bit)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_ptq(an: Mapping[str, Any], path: Path) -> None:
    """PTQ loss bars per variant and curve: BD-rate when every curve has one, else the mean per-point changes."""
    import matplotlib.pyplot as plt

    entries = an["ptq_loss"]
    if not entries:
        _empty(path, "no quantized variant measured")
        return
    bd = any(e["bd_rate_pct"] is not None for e in entries)
    if bd:  # curves with a BD-rate only (an equal-quality curve of one lambda has none)
        entries = [e for e in entries if e["bd_rate_pct"] is not None]
    variants = list({e["variant"]: None for e in entries})
    curve_names = list({e["curve"]: None for e in entries})
    metrics = [("bd_rate_pct", "PTQ loss, BD-rate %")] if bd else [
        ("dpsnr_db", "PSNR change dB (mean over λ, per point)"), ("dbpp_pct", "bpp change % (mean over λ, per point)")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(5, 1.2 * len(variants)) * len(metrics), 4), squeeze=False)
    width = 0.8 / len(curve_names)
    x = np.arange(len(variants))
    for ax, (key, label) in zip(axes[0], metrics, strict=True):
        for i, curve in enumerate(curve_names):
            vals = []
            for v in variants:
                e = next((e for e in entries if e["curve"] == curve and e["variant"] == v), None)
                vals.append(np.nan if e is None else e[key] if bd else np.mean([p[key] for p in e["points"]]))
            ax.bar(x + (i - (len(curve_names) - 1) / 2) * width, vals, width, label=curve,
                   color=COLOURS.get(curve, "tab:gray"))
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(x, [v.split(":", 1)[1] for v in variants], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    _save(fig, path)


def _outlier_models(results: Mapping[str, Any]) -> list[tuple[str, str, float, list[dict[str, Any]]]]:
    model = {m["name"]: m for m in results["models"]}
    return [(r["model"], model[r["model"]]["curve"], model[r["model"]]["lmbda"], r["layers"])
            for r in results["outliers"]]


def plot_outlier_profile(results: Mapping[str, Any], path: Path) -> None:
    """max |a| / sigma and kurtosis per layer (execution order), every model; colour = curve, shade = lambda."""
    import matplotlib.pyplot as plt

    recs = _outlier_models(results)
    if not recs:
        _empty(path, "no outlier statistics collected")
        return
    lambdas = sorted({lm for _, _, lm, _ in recs})
    names = [r["name"] for r in recs[0][3]]
    fig, axes = plt.subplots(2, 1, figsize=(max(7, 0.45 * len(names)), 6.5), sharex=True)
    for _, curve, lmbda, layers in recs:
        shade = 0.35 + 0.65 * (lambdas.index(lmbda) + 1) / len(lambdas)
        for ax, key in zip(axes, ("max_over_sigma", "kurtosis"), strict=True):
            vals = [np.nan if r[key] is None else r[key] for r in layers]
            ax.plot(range(len(vals)), vals, marker="o", ms=3, color=COLOURS.get(curve, "tab:gray"), alpha=shade,
                    ls="--" if curve.endswith("-eq") else "-", label=f"{curve} λ {lmbda:g}")
    axes[0].set(ylabel="max |a| / σ", yscale="log", title="outliers per layer input (and latents y, z)")
    axes[1].set(ylabel="kurtosis (Pearson, normal = 3)", yscale="log")
    axes[1].set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=3)
    _save(fig, path)


def plot_outlier_sqnr(results: Mapping[str, Any], path: Path) -> None:
    """Per conv layer: max |a| / sigma of its input against its INT8 SQNR; every model, colour = curve."""
    import matplotlib.pyplot as plt

    recs = _outlier_models(results)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for curve in sorted({c for _, c, _, _ in recs}):
        pts = [(r["max_over_sigma"], r["sqnr_db"]) for _, c, _, layers in recs if c == curve for r in layers
               if r["kind"] == "conv input" and r["max_over_sigma"] is not None and r["sqnr_db"] is not None]
        if pts:
            ax.scatter(*zip(*pts, strict=True), s=14, alpha=0.7, color=COLOURS.get(curve, "tab:gray"), label=curve)
    ax.set(xscale="log", xlabel="max |a| / σ of the layer input", ylabel="layer INT8 SQNR dB",
           title="outliers against INT8 SQNR, per layer")
    ax.grid(alpha=0.3)
    if recs:
        ax.legend(fontsize=8)
    _save(fig, path)


def plot_latency(an: Mapping[str, Any], path: Path) -> None:
    """Stacked per-step median milliseconds per variant."""
    import matplotlib.pyplot as plt

    rows = an["latency"]
    if not rows:
        _empty(path, "no latency measured")
        return
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.5))
    left = np.zeros(len(rows))
    for step in STEPS:
        ms = np.array([1000 * r["median_s"][step] for r in rows])
        ax.barh(range(len(rows)), ms, left=left, label=step)
        left += ms
    ax.set_yticks(range(len(rows)), [r["variant"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="ms (median)", title="encode + decode per step")
    ax.legend(fontsize=7, ncol=len(STEPS), loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.3 / len(rows)))
    _save(fig, path)


def headline_text(an: Mapping[str, Any]) -> str:
    """The headline section alone (markdown) of an analysis, for printing at the end of a run."""
    return "\n".join(_headline(an))


def _err(value: float, ci: Sequence[float] | None) -> list[float]:
    return [value - ci[0], ci[1] - value] if ci else [0.0, 0.0]


def plot_pairs(an: Mapping[str, Any], path: Path) -> None:
    """Per quantized variant: each pair's two PTQ losses with 95 % intervals as error bars: the rate-equivalent
    loss where per-image rows give it, else the PSNR change."""
    import matplotlib.pyplot as plt

    found = [p for p in an["pairs"] if p["rows"]]
    if not found:
        _empty(path, f"no {BASE}/{TEST} pair at one λ measured")
        return
    variants = list({r["variant"]: None for p in found for r in p["rows"]})
    req = all(r[BASE].get("req_pct") is not None for p in found for r in p["rows"])
    key, ci_key, ylabel = ("req_pct", "req_ci", "rate-equivalent PTQ loss, % (95 % CI)") if req else \
        ("dpsnr_db", "dpsnr_ci", "PSNR change vs FP32, dB (95 % CI)")
    cols = min(3, len(variants))
    rows = -(-len(variants) // cols)
    width = max(3.5, 0.55 * len(found) + 1)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols + 1, 3.9 * rows), squeeze=False)
    for ax in axes.flat[len(variants):]:
        ax.axis("off")
    x = np.arange(len(found))
    labels = [f"λ {p['lmbda']:g}\n{p[BASE]['curve']} / {p[TEST]['curve']}" for p in found]
    for ax, variant in zip(axes.flat, variants, strict=False):
        for i, side in enumerate((BASE, TEST)):
            vals, errs = [], []
            for p in found:
                row = next((r for r in p["rows"] if r["variant"] == variant), None)
                point = row[side] if row else None
                vals.append(point[key] if point else np.nan)
                errs.append(_err(point[key], point.get(ci_key)) if point else [0.0, 0.0])
            ax.bar(x + (i - 0.5) * 0.38, vals, 0.38, yerr=np.array(errs).T, capsize=2, label=side,
                   color=COLOURS[side])
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(x, labels, fontsize=6.5, rotation=35, ha="right")
        ax.set_title(variant.split(":", 1)[1], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for row in axes:
        row[0].set_ylabel(ylabel, fontsize=8)
    axes[0][0].legend(fontsize=8)
    _save(fig, path)


def plot_outlier_pair(an: Mapping[str, Any], path: Path) -> None:
    """Layer by layer for the first equal-quality pair: max/σ, kurtosis and INT8 SQNR of both models."""
    import matplotlib.pyplot as plt

    op = next((o for o in an["outlier_pairs"] if o["kind"] == "equal FP32 quality"), None)
    if op is None:
        _empty(path, "no equal-quality pair with outlier statistics")
        return
    names = [r["name"] for r in op["layers"]]
    x = np.arange(len(names))
    fig, axes = plt.subplots(3, 1, figsize=(max(7, 0.45 * len(names)), 8), sharex=True)
    for ax, (key, label, log) in zip(axes, (("max_over_sigma", "max |a| / σ", True),
                                           ("kurtosis", "kurtosis (normal = 3)", True),
                                           ("sqnr_db", "INT8 SQNR dB", False)), strict=True):
        for i, side in enumerate((BASE, TEST)):
            vals = [np.nan if r[side][key] is None else r[side][key] for r in op["layers"]]
            ax.bar(x + (i - 0.5) * 0.4, vals, 0.4, color=COLOURS[side], label=f"{side}: {op[side]}")
        ax.set(ylabel=label, yscale="log" if log else "linear")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title(f"equal FP32 quality, λ {op['lmbda']:g}: outliers of {TEST} against {BASE}: {op['verdict']}")
    axes[0].legend(fontsize=7)
    axes[2].set_xticks(x, names, rotation=60, ha="right", fontsize=7)
    _save(fig, path)


def plot_gpu_latency(an: Mapping[str, Any], path: Path) -> None:
    """GPU variants: synchronised stage milliseconds stacked, and decode frames per second beside them."""
    import matplotlib.pyplot as plt

    rows = an["gpu_latency"]
    fig, (ax, fps) = plt.subplots(1, 2, figsize=(10, 0.5 * len(rows) + 1.8), sharey=True)
    left = np.zeros(len(rows))
    for step in TRANSFORM_STEPS:
        ms = np.array([r["stage_ms"].get(step, np.nan) for r in rows], dtype=float)
        ax.barh(range(len(rows)), np.nan_to_num(ms), left=left, label=step)
        left += np.nan_to_num(ms)
    ax.set_yticks(range(len(rows)), [r["variant"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="ms, synchronised (median)", title="float stages on the GPU")
    ax.legend(fontsize=7)
    for i, key in enumerate(("encode_fps", "decode_fps")):
        fps.barh(np.arange(len(rows)) + (i - 0.5) * 0.4, [r[key] or 0 for r in rows], 0.4, label=key[:6])
    fps.set(xlabel=f"frames per second at {rows[0]['image']} (host to host)", title="whole codec")
    fps.legend(fontsize=7)
    _save(fig, path)
