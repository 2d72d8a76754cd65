"""Training data: random crops of an image folder, reproducible per (seed, step, item).

Item i of step s is drawn from its own generator, numpy's default_rng([seed, s, i, attempt]): which image,
where the crop sits, whether it is flipped left-right. So any process can make any item without the others
(a DataLoader worker, a distributed rank holding its shard of the global batch), and a resumed run repeats an
uninterrupted one. Two datasets over the same files give the same crops:

- `CropDataset` holds every image in memory (uint8, after the optional downscale): for small folders.
- `StreamDataset` finds images in a folder tree of any size (JPEG, PNG, WebP, ...) and decodes each item when
  asked, in DataLoader worker processes (`loader`). Images smaller than the crop are skipped (another image is
  drawn, deterministically) or, with `small="upscale"`, enlarged so their shorter side is the crop size. A file
  that cannot be decoded is skipped the same way and counted; an item that finds no usable image in 32 draws
  raises DataError.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from lic_deploy.errors import DataError
from lic_deploy.runtime.images import list_images

MAX_DRAWS = 32  # draws per item before giving up on a folder of unusable images
SMALL = ("skip", "upscale")


def manifest_hash(files: list[Path]) -> str:
    """sha256 over the sorted (name, size) list: identifies a data folder without reading every byte."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f"{f.name}\t{f.stat().st_size}\n".encode())
    return h.hexdigest()


def load_image(path: Path, patch: int, downscale: int | None, small: str = "skip") -> np.ndarray | None:
    """uint8 [H, W, 3], shorter side first reduced to `downscale` pixels when larger; None when it is smaller
    than `patch` and `small` is "skip". OSError (or a PIL error) when the file cannot be decoded."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if downscale and min(im.size) > downscale:
            f = downscale / min(im.size)
            im = im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.Resampling.BICUBIC)
        if min(im.size) < patch:
            if small == "skip":
                return None
            f = patch / min(im.size)
            im = im.resize((max(patch, round(im.width * f)), max(patch, round(im.height * f))),
                           Image.Resampling.BICUBIC)
        return np.asarray(im)


def crop(img: np.ndarray, rng: np.random.Generator, patch: int) -> np.ndarray:
    """A random `patch` x `patch` crop of uint8 [H, W, 3], flipped left-right with probability 1/2."""
    top = int(rng.integers(0, img.shape[0] - patch + 1))
    left = int(rng.integers(0, img.shape[1] - patch + 1))
    out = img[top:top + patch, left:left + patch]
    return out[:, ::-1] if rng.random() < 0.5 else out


def item_rng(seed: int, step: int, item: int, attempt: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, item, attempt])


def to_batch(crops: Sequence[np.ndarray]) -> np.ndarray:
    """uint8 crops [H, W, 3] -> float32 [N, 3, H, W] in [0, 1], C-contiguous (the same memory layout whichever
    process made it: a strided batch takes other kernels, and other float results, than a contiguous one)."""
    return np.ascontiguousarray(np.stack(crops).transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)


class CropDataset:
    """All images of `folder` (not its subfolders) in memory, each optionally downscaled so its shorter side
    is `downscale` pixels. Images smaller than `patch` are left out; DataError when none is large enough."""

    def __init__(self, folder: str | os.PathLike, patch: int, downscale: int | None = None,
                 limit: int | None = None) -> None:
        files = list_images(folder)[:limit]
        self.hash = manifest_hash(files)
        self.images: list[np.ndarray] = []
        for path in files:
            try:
                arr = load_image(path, patch, downscale)
            except OSError as exc:
                raise DataError(f"{path}: cannot read image ({exc})") from None
            if arr is not None:
                self.images.append(arr)
        if not self.images:
            raise DataError(f"no image in {folder} is at least {patch}x{patch} pixels"
                            + (f" after downscaling to {downscale}" if downscale else ""))

    def __len__(self) -> int:
        return len(self.images)

    def item(self, step: int, item: int, patch: int, seed: int) -> np.ndarray:
        rng = item_rng(seed, step, item, 0)
        return crop(self.images[int(rng.integers(0, len(self.images)))], rng, patch)

    def batch(self, step: int, items: Sequence[int], patch: int, seed: int) -> np.ndarray:
        """float32 [len(items), 3, patch, patch] in [0, 1]: items of the global batch of `step`."""
        return to_batch([self.item(step, i, patch, seed) for i in items])


class StreamDataset:
    """Every image under `folder`, decoded per item (see the module docstring). `__getitem__((step, item))`
    returns one uint8 crop [patch, patch, 3]; `skipped` counts the draws this process rejected."""

    def __init__(self, folder: str | os.PathLike, patch: int, downscale: int | None = None, *, seed: int = 0,
                 small: str = "skip", limit: int | None = None) -> None:
        if small not in SMALL:
            raise DataError(f"small images: choose from {', '.join(SMALL)}, not {small!r}")
        self.files = list_images(folder, recursive=True)[:limit]
        self.hash = manifest_hash(self.files)
        self.patch, self.downscale, self.seed, self.small = patch, downscale, seed, small
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> np.ndarray:
        step, item = key
        for attempt in range(MAX_DRAWS):
            rng = item_rng(self.seed, step, item, attempt)
            path = self.files[int(rng.integers(0, len(self.files)))]
            try:
                img = load_image(path, self.patch, self.downscale, self.small)
            except (OSError, ValueError, Image.DecompressionBombError):
                img = None
            if img is not None:
                return np.ascontiguousarray(crop(img, rng, self.patch))
            self.skipped += 1
        raise DataError(f"no usable image in {MAX_DRAWS} draws under {self.files[0].parent} (corrupt files, or all "
                        f"smaller than {self.patch} px: try small='upscale')")

    def batch(self, step: int, items: Sequence[int], patch: int, seed: int) -> np.ndarray:
        """As `CropDataset.batch`, decoding in this process."""
        return to_batch([self[step, i] for i in items])


class StepBatches:
    """Batch sampler for a DataLoader: for each step from `start` to `stop`, the keys (step, item) of `items`."""

    def __init__(self, start: int, stop: int, items: Sequence[int]) -> None:
        self.start, self.stop, self.items = start, stop, list(items)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.stop):
            yield [(step, i) for i in self.items]

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def loader(dataset: StreamDataset, start: int, stop: int, items: Sequence[int], workers: int) -> Iterator[np.ndarray]:
    """float32 batches [len(items), 3, patch, patch] for steps start..stop-1, decoded by `workers` processes
    (0: in this process), in step order whatever the worker count."""
    import torch

    dl = torch.utils.data.DataLoader(dataset, batch_sampler=StepBatches(start, stop, items), num_workers=workers,
                                     collate_fn=to_batch, persistent_workers=False,
                                     prefetch_factor=2 if workers else None)
    return iter(dl)


@lru_cache(maxsize=2)
def cached_dataset(folder: str, patch: int, downscale: int | None, limit: int | None) -> CropDataset:
    """A CropDataset shared by consecutive runs in one process (the model set trains many on the same data)."""
    return CropDataset(folder, patch, downscale, limit)
