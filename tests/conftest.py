"""Shared fixtures: small random-weight checkpoints and packages exported once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LIC_DEPLOY_DATA", ROOT.parent / "shared" / "data"))


def make_checkpoint(path: Path, arch: str, n: int, m: int, seed: int = 0) -> Path:
    """A random-weight model with trained-looking latents (see `lic_deploy.bench.synthetic`)."""
    from lic_deploy.bench.synthetic import random_checkpoint

    return random_checkpoint(path, arch, n, m, seed)


def write_images(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[Path]:
    """Smooth random RGB images (height, width) as PNG: structured enough to compress like photos."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        img = np.stack([np.sin(6 * xx + c + rng.uniform(0, 3)) * np.cos(4 * yy + c) for c in range(3)], -1)
        img = (img * 0.4 + 0.5 + rng.normal(0, 0.03, img.shape)).clip(0, 1)
        path = folder / f"img{i}.png"
        Image.fromarray((img * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


class Perturbed:
    """An engine whose outputs carry relative noise of `eps` (another GPU, another library version)."""

    def __init__(self, inner: object, eps: float, seed: int) -> None:
        self.inner, self.eps = inner, eps
        self.rng = np.random.default_rng(seed)
        self.name, self.precision = "perturbed", "fp32"

    def run(self, stage: str, x: np.ndarray) -> np.ndarray:
        y = self.inner.run(stage, x)
        return (y * (1 + self.eps * self.rng.standard_normal(y.shape))).astype(np.float32)


@pytest.fixture(scope="session")
def ckpt_mbt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mbt2018-mean N=128, M=192 with random weights, as a raw state dict."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "mbt.pt", "mbt2018-mean", 128, 192)


@pytest.fixture(scope="session")
def package_mbt(ckpt_mbt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mbt checkpoint exported with FP32, INT8 (Q/DQ) and FP16 graphs."""
    from lic_deploy.export.package_writer import ExportOptions, export_package

    out = tmp_path_factory.mktemp("pkg") / "mbt"
    opts = ExportOptions(precisions=("fp32", "int8", "fp16"), calib_count=4, calib_size=128)
    return export_package(ckpt_mbt, out, options=opts, log=lambda _: None)


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    write_images(folder, [(96, 128), (70, 90)])
    return folder


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small photo-like images: a training folder for runs of a few steps."""
    folder = tmp_path_factory.mktemp("train")
    write_images(folder, [(80, 96), (96, 80), (72, 120)], seed=3)
    return folder
