"""Codec packages: a directory with manifest.json, ONNX graphs per stage and precision, entropy.npz, calib.json.

The manifest is the table of contents; every file it names carries a sha256 that is checked when the file is
first used, so a corrupt or swapped file is reported instead of silently decoding garbage. The fingerprint
(16 bytes) covers the architecture, geometry, entropy model and every graph: `.lic` streams carry it. Opening a
package checks the manifest's structure and that its fingerprint is the one its fields give.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from lic_deploy.errors import PackageError

SCHEMA = "lic-deploy/package"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8", "int8-u8s8")
ENGINE_PRECISIONS = (*PRECISIONS, "bf16")  # bf16: no graph of its own; the torch engine on CUDA casts
FINGERPRINT_HEX = re.compile(r"[0-9a-fA-F]{32}")  # 16 bytes, as .lic headers carry it
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
MAX_GEOMETRY = 1024  # bound on pad_multiple, z_stride, min_size (pixels): 64 and 128, min_size <= 256 in practice
EXPORT_FLAGS = {"fp16": "--fp16", "int8": "--int8", "int8-u8s8": "--int8 --cpu-int8"}  # lic-deploy export's


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(manifest: dict[str, Any]) -> str:
    """32 hex digits: sha256 over the canonical JSON of what decoding depends on."""
    core = {
        "arch": manifest["arch"], "config": manifest["config"], "geometry": manifest["geometry"],
        "entropy": manifest["entropy"]["sha256"],
        "stages": {s: {p: f["sha256"] for p, f in sorted(v["files"].items())}
                   for s, v in sorted(manifest["stages"].items())},
    }
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:32]


def _int_in(low: int, high: int | None = None) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v <= high)


def _file_name(v: Any) -> bool:
    return isinstance(v, str) and v not in ("", ".", "..") and Path(v).name == v


def check_manifest(manifest: dict[str, Any], mpath: Path) -> None:
    """PackageError naming the first field the runtime could not use (missing, of the wrong type or value), or
    when the recorded fingerprint is not the one the fields give (an edited manifest)."""

    def need(doc: dict[str, Any], key: str, name: str, ok: Callable[[Any], bool], want: str) -> Any:
        if key not in doc:
            raise PackageError(f"{mpath}: manifest lacks {name!r}")
        if not ok(doc[key]):
            raise PackageError(f"{mpath}: manifest field {name!r} must be {want}, not {json.dumps(doc[key])[:40]}")
        return doc[key]

    def obj(doc: dict[str, Any], key: str, name: str) -> dict[str, Any]:
        return need(doc, key, name, lambda v: isinstance(v, dict) and bool(v), "a non-empty object")

    def entry(doc: dict[str, Any], key: str, name: str) -> None:
        e = obj(doc, key, name)
        need(e, "file", f"{name}.file", _file_name, "a file name inside the package")
        need(e, "sha256", f"{name}.sha256", lambda v: isinstance(v, str) and bool(SHA256_HEX.fullmatch(v)),
             "64 hex digits")

    need(manifest, "arch", "arch", lambda v: isinstance(v, str) and bool(v), "a string")
    need(manifest, "config", "config", lambda v: isinstance(v, dict), "an object")
    geometry = obj(manifest, "geometry", "geometry")
    within = f"an integer in 1..{MAX_GEOMETRY}"
    pad = need(geometry, "pad_multiple", "geometry.pad_multiple", _int_in(1, MAX_GEOMETRY), within)
    z_stride = need(geometry, "z_stride", "geometry.z_stride", _int_in(1, MAX_GEOMETRY), within)
    if "min_size" in geometry:
        need(geometry, "min_size", "geometry.min_size", _int_in(0, MAX_GEOMETRY), f"an integer in 0..{MAX_GEOMETRY}")
    if pad % z_stride:
        raise PackageError(f"{mpath}: manifest field 'geometry.pad_multiple' ({pad}) must be a multiple of "
                           f"'geometry.z_stride' ({z_stride})")
    stages = obj(manifest, "stages", "stages")
    for name in stages:
        stage = obj(stages, name, f"stages.{name}")
        for key in ("in_channels", "stride"):
            need(stage, key, f"stages.{name}.{key}", _int_in(1), "a positive integer")
        files = obj(stage, "files", f"stages.{name}.files")
        for precision in files:
            entry(files, precision, f"stages.{name}.files.{precision}")
    entry(manifest, "entropy", "entropy")
    if "torch_weights" in manifest:
        entry(manifest, "torch_weights", "torch_weights")
    if "footprint" in manifest:  # decode memory (runtime/memory.py); outside the fingerprint: no stream needs it
        footprint = obj(manifest, "footprint", "footprint")
        need(footprint, "base_bytes", "footprint.base_bytes", _int_in(0), "a non-negative integer")
        need(footprint, "bytes_per_pixel", "footprint.bytes_per_pixel", _int_in(1), "a positive integer")
    recorded = need(manifest, "fingerprint", "fingerprint",
                    lambda v: isinstance(v, str) and bool(FINGERPRINT_HEX.fullmatch(v)), "32 hex digits")
    actual = fingerprint(manifest)
    if recorded != actual:
        raise PackageError(f"{mpath}: manifest fingerprint {recorded} does not match its contents ({actual}): "
                           "the manifest was edited; re-export the package")


@dataclass
class Package:
    """An opened codec package. Cheap to open: files are read (and hash-checked) on first use."""

    root: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | os.PathLike) -> Package:
        root = Path(path)
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise PackageError(f"{root}: not a codec package (no {MANIFEST})")
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, ValueError) as exc:
            raise PackageError(f"{mpath}: unreadable manifest ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
            raise PackageError(f"{mpath}: not a lic-deploy package manifest")
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise PackageError(f"{root}: package schema {manifest.get('schema_version')} is not supported "
                               f"(this build reads {SCHEMA_VERSION}); re-export it")
        check_manifest(manifest, mpath)
        return cls(root, manifest)

    @property
    def arch(self) -> str:
        return str(self.manifest["arch"])

    @property
    def geometry(self) -> dict[str, Any]:
        return self.manifest["geometry"]

    def pad(self, chw: np.ndarray) -> tuple[np.ndarray, int, int]:
        """An image [C, H, W] padded as this package's codec pads it (`geometry`: pad_multiple, min_size);
        returns it and the rows and columns added."""
        from lic_deploy.runtime.images import pad_to_multiple

        g = self.geometry
        return pad_to_multiple(chw, int(g["pad_multiple"]), int(g.get("min_size", 0)))

    @property
    def fingerprint(self) -> bytes:
        return bytes.fromhex(self.manifest["fingerprint"])

    def precisions(self, stage: str) -> list[str]:
        return list(self.manifest["stages"][stage]["files"])

    def verified_path(self, entry: dict[str, Any]) -> Path:
        """The file an entry names, after checking that it exists and its sha256 matches."""
        path = self.root / entry["file"]
        if not path.is_file():
            raise PackageError(f"{self.root}: {entry['file']} is missing")
        if file_sha256(path) != entry["sha256"]:
            raise PackageError(f"{self.root}: {entry['file']} does not match its sha256 in the manifest")
        return path

    def stage_path(self, stage: str, precision: str) -> Path:
        stages = self.manifest["stages"]
        if stage not in stages:
            raise PackageError(f"{self.root}: no stage {stage!r}")
        files = stages[stage]["files"]
        if precision not in files:
            raise PackageError(f"{self.root}: stage {stage} has no {precision} graph (has {', '.join(files)}); "
                               f"re-export with {EXPORT_FLAGS.get(precision, '--' + precision)}")
        return self.verified_path(files[precision])

    @cached_property
    def entropy(self) -> dict[str, np.ndarray]:
        """The entropy model's arrays (CDF tables, integer networks, thresholds)."""
        path = self.verified_path(self.manifest["entropy"])
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:  # truncated, not an npz
            raise PackageError(f"{path}: unreadable entropy model ({exc})") from None
        self._check_entropy_channels(arrays, path)
        return arrays

    def _check_entropy_channels(self, arrays: dict[str, np.ndarray], path: Path) -> None:
        """PackageError when the entropy model's latent channels are not the manifest's (another package's file,
        its sha256 and the fingerprint recomputed). An unreadable meta is left to the entropy model to report."""
        try:
            meta = json.loads(bytes(arrays["meta"].astype(np.uint8)).decode())
        except (KeyError, ValueError, TypeError):
            return
        if not isinstance(meta, dict):
            return
        for key in ("y_channels", "z_channels"):
            want = self.geometry.get(key)
            if key in meta and want is not None and meta[key] != want:
                raise PackageError(f"{path}: entropy model has {key}={json.dumps(meta[key])[:20]} but the manifest's "
                                   f"geometry has {json.dumps(want)[:20]}: the file belongs to another package")
