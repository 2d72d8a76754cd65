"""Encode images to `.lic` bytes and decode them back, with any engine and precision.

    codec = Codec("pkg/")                       # ONNX Runtime, FP32
    data = codec.encode_file("photo.png")       # bytes of a .lic stream
    image = codec.decode(data)                  # uint8 [H, W, 3] (or [H, W] for greyscale sources)

The float transforms (g_a, h_a, g_s) run on the chosen engine; everything between decoded symbols and table
indexes is the package's integer entropy model, so a stream decodes on any machine and backend.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lic_deploy.entropy import evaluators
from lic_deploy.entropy.bitstream import DEFAULT_MAX_PIXELS, MODE_GRAY, MODE_RGB, Header, pack, unpack
from lic_deploy.entropy.model import EntropyModel, open_entropy_model
from lic_deploy.errors import BitstreamError, DataError
from lic_deploy.runtime import memory
from lic_deploy.runtime.engines import Engine, create_engine
from lic_deploy.runtime.images import load_rgb, to_uint8
from lic_deploy.runtime.package import Package


@dataclass
class Decoded:
    image: np.ndarray  # uint8 [H, W, 3], or [H, W] when the source was greyscale
    header: Header
    y_hat: np.ndarray  # the decoded latents, float32 [M, H/16, W/16]


class Codec:
    """A package bound to one engine. `timings` holds the seconds of each step of the last call: g_a, h_a,
    entropy (everything between latents and bytes: integer networks, tables, range coding), entropy_hs (the part
    of entropy spent in the integer h_s), container (packing or parsing the .lic file), g_s."""

    def __init__(self, package: str | os.PathLike | Package, backend: str = "ort", precision: str = "fp32", *,
                 threads: int | None = None, engine: Engine | None = None, device: str = "cpu",
                 max_pixels: int = DEFAULT_MAX_PIXELS, intnet: str | None = None, check_memory: bool = True) -> None:
        """`intnet`: where the integer networks run (`entropy.evaluators`: "numpy", "ort", "torch:DEVICE"). None:
        on the engine's device when the engine is PyTorch on CUDA ("torch:cuda..."), else "numpy". Every choice
        gives the same bits; BackendUnavailable when its device is not here. `check_memory`: refuse a stream
        whose decoding needs more memory than is available (`runtime.memory`; CPU engines)."""
        self.package = package if isinstance(package, Package) else Package.open(package)
        self.engine = engine or create_engine(self.package, backend, precision, threads=threads, device=device)
        self.max_pixels = max_pixels
        engine_device = str(getattr(self.engine, "device", "cpu"))
        auto = f"torch:{engine_device}" if engine_device.startswith("cuda") else "numpy"
        self.check_memory = check_memory and engine_device == "cpu" and self.engine.name != "tensorrt"
        self._resident: int | None = None  # resident bytes at the first decode: what later ones hold beyond it
        self.intnet = evaluators.require(intnet or auto)
        self.threads = threads
        self.timings: dict[str, float] = {}
        self._entropy: EntropyModel | None = None

    @property
    def entropy(self) -> EntropyModel:
        if self._entropy is None:
            self._entropy = open_entropy_model(self.package.entropy)
            evaluators.install(self._entropy, self.intnet, self.threads)
        return self._entropy

    def _tick(self, name: str, t0: float) -> float:
        now = time.perf_counter()
        self.timings[name] = now - t0
        return now

    def encode_array(self, image: np.ndarray, *, grey: bool = False) -> tuple[bytes, np.ndarray]:
        """float32 [3, H, W] in [0, 1] -> (.lic bytes, y_hat the decoder will reconstruct)."""
        if image.ndim != 3 or image.shape[0] != 3 or min(image.shape[1:]) < 1:
            raise DataError(f"expected an RGB image array [3, H, W], got shape {image.shape}")
        _, h, w = image.shape
        if h * w > self.max_pixels:
            raise DataError(f"image of {w}x{h} pixels exceeds the cap of {self.max_pixels} pixels")
        self.timings = {}
        t = time.perf_counter()
        x, pb, pr = self.package.pad(image.astype(np.float32))
        y = self.engine.run("g_a", x[None])
        t = self._tick("g_a", t)
        z = self.engine.run("h_a", y)
        t = self._tick("h_a", t)
        coded = self.entropy.encode(y[0], z[0])
        t = self._tick("entropy", t)
        self.timings["entropy_hs"] = self.entropy.hs_seconds
        header = Header(self.package.fingerprint, h, w, MODE_GRAY if grey else MODE_RGB, pb, pr)
        data = pack(header, coded.streams)
        self._tick("container", t)
        return data, coded.y_hat

    def encode_file(self, path: str | os.PathLike) -> bytes:
        image, grey = load_rgb(path, max_pixels=self.max_pixels)
        return self.encode_array(image, grey=grey)[0]

    def decode_latents(self, data: bytes) -> tuple[Header, np.ndarray]:
        """Parse and entropy-decode: (header, y_hat float32 [M, H/16, W/16]). BitstreamError when malformed."""
        geometry = self.package.geometry
        t = time.perf_counter()
        header, streams = unpack(
            data, fingerprint=self.package.fingerprint, pad_multiple=int(geometry["pad_multiple"]),
            min_size=int(geometry.get("min_size", 0)),
            max_pixels=self.max_pixels, n_streams=self.entropy.n_streams)
        t = self._tick("container", t)
        hp, wp = header.height + header.pad_bottom, header.width + header.pad_right
        if self.check_memory:
            if self._resident is None:
                self._resident = memory.resident_bytes()
            held = max(memory.resident_bytes() - self._resident, 0)  # kept by earlier decodes (ORT's arenas), reused
            memory.check_decode(self.package.manifest.get("footprint"), hp * wp,
                                f"a {header.width}x{header.height} image", held=held)
        z_stride = int(geometry["z_stride"])
        y_hat = self.entropy.decode(streams, (hp // z_stride, wp // z_stride))
        self._tick("entropy", t)
        self.timings["entropy_hs"] = self.entropy.hs_seconds
        return header, y_hat

    def decode(self, data: bytes) -> Decoded:
        """.lic bytes -> the decoded image (cropped to its original size) and the latents."""
        self.timings = {}
        header, y_hat = self.decode_latents(data)
        t = time.perf_counter()
        x_hat = self.engine.run("g_s", y_hat[None])[0]
        self._tick("g_s", t)
        img = to_uint8(x_hat[:, : header.height, : header.width])
        return Decoded(img[..., 0] if header.mode == MODE_GRAY else img, header, y_hat)

    def reconstruct(self, y_hat: np.ndarray, height: int, width: int) -> np.ndarray:
        """uint8 [height, width, 3] from latents without a bitstream (for PSNR right after encoding)."""
        return to_uint8(self.engine.run("g_s", y_hat[None])[0][:, :height, :width])


def encode(package: str | os.PathLike | Package, image: str | os.PathLike | np.ndarray, **kwargs: object) -> bytes:
    """One-shot: an image file or a float32 [3, H, W] array -> .lic bytes. kwargs go to `Codec`."""
    codec = Codec(package, **kwargs)  # type: ignore[arg-type]
    if isinstance(image, np.ndarray):
        return codec.encode_array(image)[0]
    return codec.encode_file(image)


def decode(package: str | os.PathLike | Package, data: bytes | str | os.PathLike, **kwargs: object) -> np.ndarray:
    """One-shot: .lic bytes (or a .lic file path) -> uint8 image. kwargs go to `Codec`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        path = Path(data)
        if not path.is_file():
            raise BitstreamError(f"{path}: no such .lic file")
        data = path.read_bytes()
    return Codec(package, **kwargs).decode(bytes(data)).image  # type: ignore[arg-type]
