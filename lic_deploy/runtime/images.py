"""Image files in and out, as float32 CHW arrays in [0, 1]. Torch-free (Pillow + numpy)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lic_deploy.atomic import atomic_path
from lic_deploy.entropy.bitstream import padding
from lic_deploy.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DATA_ENV = "LIC_DEPLOY_DATA"  # folder holding kodak/ and train/ (for example ../shared/data)

Image.MAX_IMAGE_PIXELS = 1 << 28  # Pillow's decompression-bomb guard, raised to 268 MP (an error beyond twice that)


class ImageWarning(UserWarning):
    """An input image converted with a loss (alpha dropped, 16 bit reduced); the CLI prints it as one plain line."""


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Image files directly inside `folder` (with `recursive`, anywhere under it), sorted by path. Raises
    DataError when there are none."""
    path = Path(folder)
    if not path.is_dir():
        raise DataError(f"image folder {path} does not exist or is not a folder")
    found = (Path(d) / f for d, _, names in os.walk(path) for f in names) if recursive else \
        (p for p in path.iterdir() if p.is_file())
    files = sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) {'under' if recursive else 'in'} {path}")
    return files


def expand_inputs(items: Iterable[str | os.PathLike], suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """Files as given plus the files with `suffixes` inside any folder given; DataError for missing paths."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in suffixes)
            if not found:
                raise DataError(f"no {', '.join(suffixes)} files in {p}")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return out


DATA_PREFIX = "data:"  # "data:<sub>" names the folder <sub> under $LIC_DEPLOY_DATA, wherever that lies


def resolve_folder(text: str | os.PathLike) -> Path:
    """The folder `text` names: "data:<sub>" is $LIC_DEPLOY_DATA/<sub> (DataError when the variable is unset),
    anything else a path as given."""
    text = str(text)
    if not text.startswith(DATA_PREFIX):
        return Path(text)
    root = os.environ.get(DATA_ENV)
    if not root:
        raise DataError(f"{text} needs ${DATA_ENV} (the folder holding the data sets, for example ../shared/data)")
    return Path(root) / text[len(DATA_PREFIX):]


def data_folder(name: str) -> Path | None:
    """`$LIC_DEPLOY_DATA/<name>` when the variable is set and the folder exists, else None."""
    root = os.environ.get(DATA_ENV)
    if root and (Path(root) / name).is_dir():
        return Path(root) / name
    return None


def load_rgb(path: str | os.PathLike, *, warn: bool = True, max_pixels: int | None = None) -> tuple[np.ndarray, bool]:
    """Read an image as float32 [3, H, W] in [0, 1] and whether the source was greyscale.

    Greyscale is replicated to three channels; RGBA drops alpha and 16-bit images are scaled to 8 bit, each with a
    warning (an `ImageWarning`: the codec stores 8-bit RGB). Raises DataError for unreadable files and, from the
    size in the header before any pixel is decoded, for images of more than `max_pixels` pixels.
    """
    try:
        with warnings.catch_warnings():  # Pillow's bomb warning (1-2x its limit): load_rgb's own cap replaces it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)
        with opened as im:
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                raise DataError(f"{path}: image of {w}x{h} pixels exceeds the cap of {max_pixels} pixels")
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I", "I;16N"):
                arr = np.asarray(im, dtype=np.float64)
                top = 65535.0 if arr.max(initial=0) > 255 or mode.startswith("I;16") else 255.0
                if warn:
                    warnings.warn(f"{path}: {mode} image reduced to 8 bit", ImageWarning, stacklevel=2)
                grey = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
                return _to_chw(np.repeat(grey[..., None], 3, axis=2)), True
            if mode in ("L", "1"):
                grey = np.asarray(im.convert("L"))
                return _to_chw(np.repeat(grey[..., None], 3, axis=2)), True
            if mode in ("RGBA", "LA", "PA") and warn:
                warnings.warn(f"{path}: alpha channel dropped", ImageWarning, stacklevel=2)
            if mode not in ("RGB",) and mode not in ("RGBA", "LA", "PA", "P", "CMYK", "YCbCr") and warn:
                warnings.warn(f"{path}: {mode} image converted to RGB", ImageWarning, stacklevel=2)
            rgb = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None
    return _to_chw(rgb), False


def _to_chw(rgb_u8: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb_u8.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)


def to_uint8(chw: np.ndarray) -> np.ndarray:
    """float [3, H, W] in [0, 1] -> uint8 [H, W, 3], rounding half to even after clipping."""
    return np.clip(np.rint(chw.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)


def save_image(path: str | os.PathLike, hwc_u8: np.ndarray, *, grey: bool = False) -> None:
    """Write uint8 [H, W, 3] atomically (temporary file, then rename). `grey` stores the first channel as L."""
    path = Path(path)
    img = Image.fromarray(hwc_u8[..., 0] if grey else hwc_u8, mode="L" if grey else "RGB")
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    with atomic_path(path) as tmp:
        img.save(tmp, format=fmt)


def pad_to_multiple(chw: np.ndarray, multiple: int, min_size: int = 0) -> tuple[np.ndarray, int, int]:
    """Pad bottom/right by edge replication so H and W are multiples of `multiple` and at least `min_size`
    (pixels). Returns the padded array and the rows and columns added.
    """
    _, h, w = chw.shape
    pb, pr = padding(h, multiple, min_size), padding(w, multiple, min_size)
    if pb or pr:
        chw = np.pad(chw, ((0, 0), (0, pb), (0, pr)), mode="edge")
    return np.ascontiguousarray(chw), pb, pr


def psnr(a_u8: np.ndarray, b_u8: np.ndarray) -> float:
    """PSNR in dB between two uint8 images of equal shape (peak 255); inf when identical."""
    mse = float(np.mean((a_u8.astype(np.float64) - b_u8.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)
