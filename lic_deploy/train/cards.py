"""Publishing a trained model: FP16 safetensors weights plus a model card with measured Kodak numbers."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lic_deploy.atomic import atomic_path


def kodak_rd(package: Path, kodak: str | os.PathLike) -> dict[str, float]:
    """Mean bpp (real .lic bytes) and PSNR (dB, 8-bit RGB) over a folder, ONNX Runtime FP32."""
    from lic_deploy.runtime.codec import Codec
    from lic_deploy.runtime.images import list_images, load_rgb, psnr, to_uint8

    codec = Codec(package)
    bpps, psnrs = [], []
    for path in list_images(kodak):
        img, _ = load_rgb(path)
        data, _ = codec.encode_array(img)
        decoded = codec.decode(data).image
        bpps.append(8 * len(data) / (img.shape[1] * img.shape[2]))
        psnrs.append(psnr(decoded, to_uint8(img)))
    return {"bpp": float(np.mean(bpps)), "psnr": float(np.mean(psnrs)), "images": len(bpps)}


def publish(checkpoint: Path, models: Path, *, kodak: str | os.PathLike) -> Path:
    """Write models/<name>.safetensors (FP16 weights, metadata) and models/<name>.md; returns the weights path."""
    import torch
    from safetensors.torch import save_file

    from lic_deploy.archs.checkpoint import load_model
    from lic_deploy.export.package_writer import ExportOptions, export_package
    from lic_deploy.train.loop import log_path

    loaded = load_model(checkpoint)
    models.mkdir(parents=True, exist_ok=True)
    name = checkpoint.stem
    weights = models / f"{name}.safetensors"
    meta = {k: v for k, v in loaded.metadata.items() if k not in ("arch", "config")}
    state = {k: v.detach().to(torch.float16).contiguous() if v.is_floating_point() else v.contiguous()
             for k, v in loaded.model.state_dict().items()
             if not k.endswith(("_quantized_cdf", "_offset", "_cdf_length"))}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"arch": json.dumps(loaded.arch), "config": json.dumps(loaded.config),
                                             "training": json.dumps(meta, default=str)})
    with tempfile.TemporaryDirectory() as td:
        pkg = export_package(weights, Path(td) / "pkg", options=ExportOptions(calib_count=4), log=lambda _: None)
        rd = kodak_rd(pkg, kodak)
    log = log_path(checkpoint)
    rows = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
    if log.is_file():  # the training log ships too: `lic-deploy convergence` reads it
        shutil.copyfile(log, models / f"{name}.jsonl")
    val = [r for r in rows if "val_loss" in r]
    (models / f"{name}.md").write_text(_card(name, loaded, meta, rd, val[-1] if val else {}))
    return weights


def _hardware(meta: dict[str, Any]) -> str:
    """Where a run trained, from its checkpoint metadata: "cuda:0", "4 processes on cuda", "the CPU (2 threads)"."""
    device, world = str(meta.get("device", "cpu")), int(meta.get("world_size", 1))
    if device == "cpu":
        threads = meta.get("config", {}).get("threads")
        device = f"the CPU ({threads} thread{'' if threads == 1 else 's'})"
    return device if world == 1 else f"{world} processes on {device.split(':')[0]}"


def _card(name: str, loaded: Any, meta: dict[str, Any], rd: dict[str, float], val: dict[str, Any]) -> str:
    hp = ", ".join(f"{k}={v}" for k, v in meta.get("hyperparameters", {}).items())
    nan = float("nan")
    crops = f"batch {meta.get('batch')}, {meta.get('patch')}px crops, seed {meta.get('seed')}"
    estimate = (f"loss {val.get('val_loss', nan):.4f}, {val.get('val_bpp', nan):.4f} bpp, "
                f"{val.get('val_psnr', nan):.2f} dB")
    rows = [
        ("architecture", f"{loaded.arch}, N={loaded.config['N']}, M={loaded.config['M']}"),
        ("optimizer", f"{meta.get('optimizer')} ({hp})"),
        ("lambda", meta.get("lmbda")),
        ("steps", f"{meta.get('steps')} ({crops})"),
        ("training time", f"{meta.get('seconds')} s on {_hardware(loaded.metadata)}"),
        ("training data", f"{meta.get('data_images')} images, manifest sha256 {str(meta.get('data_hash'))[:16]}"),
        ("validation, entropy estimate (first Kodak images)", estimate),
        (f"Kodak, real .lic streams (ORT FP32, {rd['images']} images)",
         f"{rd['bpp']:.4f} bpp, {rd['psnr']:.2f} dB PSNR"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (f"# {name}\n\n| | |\n|---|---|\n{table}\n\n"
            f"Weights: `{name}.safetensors`, FP16 (loaded as FP32). Made by `python -m lic_deploy.train.model_set`.\n")
