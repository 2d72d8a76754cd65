"""Training data: random crops from an image folder, held in memory as uint8, reproducible per step."""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from lic_deploy.errors import DataError
from lic_deploy.runtime.images import list_images


def manifest_hash(files: list[Path]) -> str:
    """sha256 over the sorted (name, size) list: identifies a data folder without reading every byte."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f"{f.name}\t{f.stat().st_size}\n".encode())
    return h.hexdigest()


class CropDataset:
    """All images of `folder`, each optionally downscaled so its shorter side is `downscale` pixels.

    `batch(step, size, patch, seed)` returns float32 [size, 3, patch, patch] in [0, 1]; it depends only on its
    arguments (not on call history), so training resumes bit-exactly. Images smaller than `patch` are skipped;
    DataError when none is large enough.
    """

    def __init__(self, folder: str | os.PathLike, patch: int, downscale: int | None = None,
                 limit: int | None = None) -> None:
        files = list_images(folder)[:limit]
        self.hash = manifest_hash(files)
        self.images: list[np.ndarray] = []
        for path in files:
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB")
                    if downscale and min(im.size) > downscale:
                        f = downscale / min(im.size)
                        im = im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))),
                                       Image.Resampling.BICUBIC)
                    arr = np.asarray(im)
            except OSError as exc:
                raise DataError(f"{path}: cannot read image ({exc})") from None
            if min(arr.shape[:2]) >= patch:
                self.images.append(arr)
        if not self.images:
            raise DataError(f"no image in {folder} is at least {patch}x{patch} pixels"
                            + (f" after downscaling to {downscale}" if downscale else ""))

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, step: int, size: int, patch: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng([seed, step])
        out = np.empty((size, patch, patch, 3), dtype=np.uint8)
        for i, k in enumerate(rng.integers(0, len(self.images), size)):
            img = self.images[k]
            top = int(rng.integers(0, img.shape[0] - patch + 1))
            left = int(rng.integers(0, img.shape[1] - patch + 1))
            crop = img[top:top + patch, left:left + patch]
            out[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
        return out.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)


@lru_cache(maxsize=2)
def cached_dataset(folder: str, patch: int, downscale: int | None, limit: int | None) -> CropDataset:
    """A CropDataset shared by consecutive runs in one process (the model set trains many on the same data)."""
    return CropDataset(folder, patch, downscale, limit)
