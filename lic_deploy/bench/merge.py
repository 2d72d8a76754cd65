"""One report from several bench runs: typically the CPU run here and the GPU part run on a GPU machine.

Runs merge when they measured the same images (the bootstrap pairs images across every model and variant) and
their models of one name are the same file (sha256). A (model, variant) measured in several runs keeps the
first run's measurement: pass the run whose CPU rows you trust first. A variant skipped in one run and measured in
another is not listed as skipped. Each run's command, date, machine and settings (calibration, repeats) are kept
under `sources`; the report lists the settings per run where they differ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lic_deploy.errors import LicError

PER_VARIANT = ("rows", "summaries", "latency", "fallback")


def merge_results(docs: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None) -> dict[str, Any]:
    """The merged results document (without `analysis`: the report recomputes it). LicError when the runs
    cannot be compared: other images, or one model name for two different files."""
    if not docs:
        raise LicError("nothing to merge")
    names = list(names or [f"run {i + 1}" for i in range(len(docs))])
    first = docs[0]
    images = first["settings"]["images"]
    merged: dict[str, Any] = {k: v for k, v in first.items() if k != "analysis"}
    merged.update(models=[], outliers=[], skipped=[], sources=[], **{k: [] for k in PER_VARIANT})
    models: dict[str, Mapping[str, Any]] = {}
    for doc, name in zip(docs, names, strict=True):
        if doc["settings"]["images"] != images:
            raise LicError(f"{name}: measured other images than {names[0]} ({len(doc['settings']['images'])} "
                           f"against {len(images)}); runs merge only over the same image set")
        merged["sources"] += doc.get("sources") or [{"file": name, "created": doc["created"], "command": doc["command"],
                                                     "environment": doc["environment"], "settings": doc["settings"]}]
        for m in doc["models"]:
            if m["name"] in models and models[m["name"]]["sha256"] != m["sha256"]:
                raise LicError(f"{name}: model {m['name']} is another file than in {names[0]} (sha256 differs)")
            if m["name"] not in models:
                models[m["name"]] = m
                merged["models"].append(m)
        have = {(r["model"], r["variant"]) for r in merged["summaries"]}
        for key in PER_VARIANT:
            merged[key] += [r for r in doc.get(key, []) if (r["model"], r["variant"]) not in have]
        done = {o["model"] for o in merged["outliers"]}
        merged["outliers"] += [o for o in doc.get("outliers", []) if o["model"] not in done]
        merged["skipped"] += doc.get("skipped", [])
    measured = {(r["model"], r["variant"]) for r in merged["summaries"]}
    unique = {(s["model"], s["variant"], s["reason"]): s for s in merged["skipped"]}
    merged["skipped"] = [s for (m, v, _), s in unique.items() if (m, v) not in measured]
    return merged
