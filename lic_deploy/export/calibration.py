"""Calibration sets: deterministic crops from an image folder, recorded as a manifest (never copied images).

A manifest is JSON: `{"source", "seed", "size", "crops": [{"file", "sha256", "box": [top, left, height, width]}]}`.
`source` is "skimage" (the photos inside scikit-image), "data:<sub>" (a folder under $LIC_DEPLOY_DATA, so a
manifest works on every machine that has the data set wherever it lives), or an absolute folder path.
Replaying a manifest yields the same crops byte for byte, provided the files' sha256 still match (checked).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lic_deploy.errors import DataError
from lic_deploy.runtime.images import DATA_ENV, DATA_PREFIX, list_images, load_rgb, resolve_folder
from lic_deploy.runtime.package import file_sha256

SKIMAGE = "skimage"
# The colour photographs that ship inside scikit-image's wheel (no download needed).
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
                  "motorcycle_left.png", "retina.jpg", "rocket.jpg")
# Every crop is held in memory as float32 during export: refuse sets larger than this many bytes.
CALIB_MAX_BYTES = 4 << 30
CROP_MAX_SIDE = 1 << 16  # bound on every number in a manifest box (pixels)


@dataclass(frozen=True)
class Crop:
    file: str  # path relative to the manifest's source folder
    sha256: str
    box: tuple[int, int, int, int]  # top, left, height, width in pixels


def skimage_folder() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent


def resolve_source(source: str) -> Path:
    """The folder a manifest source names."""
    return skimage_folder() if source == SKIMAGE else resolve_folder(source)


def portable_source(folder: str | os.PathLike) -> str:
    """"data:<sub>" when `folder` lies under $LIC_DEPLOY_DATA, else its absolute path."""
    if str(folder) == SKIMAGE or str(folder).startswith(DATA_PREFIX):
        return str(folder)
    path = Path(folder).resolve()
    root = os.environ.get(DATA_ENV)
    if root and path.is_relative_to(Path(root).resolve()):
        return DATA_PREFIX + path.relative_to(Path(root).resolve()).as_posix()
    return str(path)


def _source_files(source: str) -> tuple[Path, list[Path]]:
    root = resolve_source(source)
    if source == SKIMAGE:
        return root, [root / name for name in SKIMAGE_PHOTOS if (root / name).is_file()]
    return root, list_images(root)


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) in pixels without decoding the image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None


def select_crops(source: str | os.PathLike, count: int, *, seed: int = 0, size: int = 256) -> list[Crop]:
    """`count` crops of size x size pixels, files drawn without replacement while they last, positions uniform.

    Every crop has the same size (histogram calibrators need that); images smaller than `size` on either side
    are skipped. Deterministic in (source contents, count, seed, size).
    """
    if count < 1:
        raise DataError("calibration count must be at least 1")
    if seed < 0:
        raise DataError(f"calibration seed must be a non-negative integer, got {seed}")
    root, files = _source_files(str(source))
    rng = np.random.default_rng(seed)
    crops: list[Crop] = []
    sizes: dict[Path, tuple[int, int, str]] = {}
    while len(crops) < count:  # passes over the files in fresh random orders until enough crops
        before = len(crops)
        for i in rng.permutation(len(files)):
            if len(crops) == count:
                break
            path = files[i]
            if path not in sizes:
                sizes[path] = (*_image_size(path), file_sha256(path))
            h, w, digest = sizes[path]
            if h >= size and w >= size:
                top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
                crops.append(Crop(str(path.relative_to(root)), digest, (top, left, size, size)))
        if len(crops) == before:
            break
    if not crops:
        raise DataError(f"no image in {source} is at least {size}x{size} pixels (the calibration crop size)")
    return crops


def load_crops(source: str | os.PathLike, crops: list[Crop]) -> list[np.ndarray]:
    """The crops as float32 [3, h, w] arrays in [0, 1]; DataError if a file changed since the manifest."""
    root = resolve_source(str(source))
    out = []
    for crop in crops:
        path = root / crop.file
        if not path.is_file():
            raise DataError(f"calibration file {path} is missing")
        if file_sha256(path) != crop.sha256:
            raise DataError(f"calibration file {path} changed since the manifest was written (sha256 differs)")
        img, _ = load_rgb(path, warn=False)
        top, left, h, w = crop.box
        if top + h > img.shape[1] or left + w > img.shape[2]:
            raise DataError(f"calibration crop {crop.box} lies outside {path}")
        out.append(np.ascontiguousarray(img[:, top:top + h, left:left + w]))
    return out


def manifest(source: str | os.PathLike, crops: list[Crop], *, seed: int, size: int) -> dict[str, Any]:
    return {"source": portable_source(source), "seed": seed, "size": size, "crops": [asdict(c) for c in crops]}


def read_manifest(path: str | os.PathLike) -> tuple[str, list[Crop], dict[str, Any]]:
    """Source, crops and the raw manifest from a JSON file written by `manifest`; DataError naming the first bad
    entry unless there is at least one crop and every box is [top, left, height, width] of one common size."""
    try:
        raw = json.loads(Path(path).read_text())
        source, entries = str(raw["source"]), raw["crops"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a calibration manifest ({exc})") from None
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: a calibration manifest needs a non-empty list of crops")
    crops = []
    for i, c in enumerate(entries):
        box = c.get("box") if isinstance(c, dict) else None
        if not (isinstance(c, dict) and isinstance(c.get("file"), str) and isinstance(c.get("sha256"), str)
                and isinstance(box, list) and len(box) == 4
                and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= CROP_MAX_SIDE for v in box)
                and box[2] > 0 and box[3] > 0):
            raise DataError(f"{path}: crop {i} ({json.dumps(c)[:120]}) is not {{file, sha256, box: [top, left, "
                            f"height, width]}} with whole numbers 0..{CROP_MAX_SIDE} and a positive size")
        crops.append(Crop(c["file"], c["sha256"], tuple(box)))
        if box[2:] != list(crops[0].box[2:]):
            raise DataError(f"{path}: crop {i} is {box[2]}x{box[3]} pixels but crop 0 is "
                            f"{crops[0].box[2]}x{crops[0].box[3]}; all calibration crops must have one size")
    return source, crops, raw


def _check_set(count: int, height: int, width: int, multiple: int, min_size: int) -> None:
    """DataError for crops the model cannot take or that would need more than CALIB_MAX_BYTES of memory."""
    least = max(multiple, min_size)
    if height % multiple or width % multiple or min(height, width) < least:
        raise DataError(f"calibration crops of {height}x{width} pixels: the model pads images to multiples of "
                        f"{multiple} pixels, at least {least}; use a crop size (--calib-size) that is a "
                        f"multiple of {multiple} and at least {least}")
    need = count * 3 * height * width * 4
    if need > CALIB_MAX_BYTES:
        raise DataError(f"{count} calibration crops of {height}x{width} pixels need {need / 2**30:.1f} GiB of "
                        f"memory, over the {CALIB_MAX_BYTES / 2**30:.0f} GiB limit; use fewer or smaller crops")


def calibration_set(calib: str | os.PathLike | None, count: int, *, seed: int = 0, size: int = 256,
                    multiple: int = 1, min_size: int = 1) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Crops and their manifest from a folder, a manifest file (`.json`), or scikit-image's photos (None).

    DataError, before any image is read, unless the crops' sides are multiples of `multiple` (the model's padding)
    and at least `min_size`, and they fit in CALIB_MAX_BYTES."""
    if calib is not None and str(calib).endswith(".json"):
        source, crops, raw = read_manifest(calib)
        _check_set(len(crops), *crops[0].box[2:], multiple, min_size)
        return load_crops(source, crops), raw
    if count >= 1:  # select_crops refuses the others
        _check_set(count, size, size, multiple, min_size)
    source = SKIMAGE if calib is None else calib
    crops = select_crops(source, count, seed=seed, size=size)
    return load_crops(source, crops), manifest(source, crops, seed=seed, size=size)
