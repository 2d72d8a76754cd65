"""Bad input to the runtime: edited package manifests and graphs, oversized images, missing CUDA devices, and
the messages they give. Every case is a LicError (one line from the CLI), never a traceback or a huge decode.
Works on copies of the small golden package (FP32 graphs only), so nothing is exported here."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

from lic_deploy.cli import main
from lic_deploy.entropy.bitstream import MODE_RGB, Header, pack, unpack
from lic_deploy.errors import BackendUnavailable, BitstreamError, DataError, LicError, PackageError
from lic_deploy.runtime.codec import Codec
from lic_deploy.runtime.images import load_rgb
from lic_deploy.runtime.package import MANIFEST, Package, fingerprint

GOLDEN = Path(__file__).parent / "golden" / "package"
IMAGE = np.random.default_rng(0).random((3, 40, 50)).astype(np.float32)


def edited_package(tmp_path: Path, edit: Callable[[dict[str, Any], Path], None], *, refingerprint: bool = True) -> Path:
    """A copy of the golden package with `edit` applied to its manifest (and files). `refingerprint`: record the
    fingerprint of the edited fields, where they still give one (a crafted manifest, consistent with itself)."""
    root = tmp_path / "pkg"
    shutil.copytree(GOLDEN, root)
    manifest = json.loads((root / MANIFEST).read_text())
    edit(manifest, root)
    if refingerprint:
        with contextlib.suppress(KeyError, TypeError, AttributeError):
            manifest["fingerprint"] = fingerprint(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def _flip_digit(m: dict[str, Any], _: Path) -> None:
    fp = m["fingerprint"]
    m["fingerprint"] = fp[:20] + ("1" if fp[20] == "0" else "0") + fp[21:]


MANIFEST_EDITS: dict[str, tuple[Callable[[dict[str, Any], Path], None], bool, str]] = {
    # name: (edit, refingerprint, the error's words)
    "fingerprint-flipped": (_flip_digit, False, "fingerprint .* does not match its contents"),
    "fingerprint-not-hex": (lambda m, _: m.update(fingerprint="zz" * 16), False, "'fingerprint' must be 32 hex"),
    "fingerprint-short": (lambda m, _: m.update(fingerprint="abcd"), False, "'fingerprint' must be 32 hex"),
    "geometry-edited": (lambda m, _: m["geometry"].update(pad_multiple=128), False, "does not match its contents"),
    "no-z_stride": (lambda m, _: m["geometry"].pop("z_stride"), True, "lacks 'geometry.z_stride'"),
    "no-pad_multiple": (lambda m, _: m["geometry"].pop("pad_multiple"), True, "lacks 'geometry.pad_multiple'"),
    "pad_multiple-0": (lambda m, _: m["geometry"].update(pad_multiple=0), True, "'geometry.pad_multiple' must be"),
    "pad_multiple-str": (lambda m, _: m["geometry"].update(pad_multiple="64"), True, "'geometry.pad_multiple' must"),
    "pad_multiple-huge": (lambda m, _: m["geometry"].update(pad_multiple=1 << 40), True, "'geometry.pad_multiple'"),
    "min_size-negative": (lambda m, _: m["geometry"].update(min_size=-1), True, "'geometry.min_size' must be"),
    "no-files": (lambda m, _: m["stages"]["g_a"].pop("files"), True, "lacks 'stages.g_a.files'"),
    "no-file": (lambda m, _: m["stages"]["g_a"]["files"]["fp32"].pop("file"), True,
                "lacks 'stages.g_a.files.fp32.file'"),
    "file-outside": (lambda m, _: m["stages"]["g_a"]["files"]["fp32"].update(file="../g_a.fp32.onnx"), True,
                     "'stages.g_a.files.fp32.file' must be a file name inside the package"),
    "sha256-short": (lambda m, _: m["entropy"].update(sha256="abc"), True, "'entropy.sha256' must be 64 hex"),
    "stages-list": (lambda m, _: m.update(stages=[]), True, "'stages' must be a non-empty object"),
    "stride-missing": (lambda m, _: m["stages"]["g_s"].pop("stride"), True, "lacks 'stages.g_s.stride'"),
}


@pytest.mark.parametrize("case", MANIFEST_EDITS)
def test_edited_manifest_is_refused_when_opened(tmp_path: Path, case: str) -> None:
    edit, refingerprint, words = MANIFEST_EDITS[case]
    root = edited_package(tmp_path, edit, refingerprint=refingerprint)
    with pytest.raises(PackageError, match=words):
        Package.open(root)


def test_golden_package_still_opens() -> None:
    assert Package.open(GOLDEN).fingerprint.hex() == json.loads((GOLDEN / MANIFEST).read_text())["fingerprint"]


def test_cli_names_the_manifest_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = edited_package(tmp_path, lambda m, _: m["geometry"].pop("z_stride"))
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "a.png")
    assert main(["encode", str(root), str(tmp_path / "a.png"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "geometry.z_stride" in err and "Traceback" not in err


def _replace_g_a(data: bytes) -> Callable[[dict[str, Any], Path], None]:
    def edit(m: dict[str, Any], root: Path) -> None:
        (root / "g_a.fp32.onnx").write_bytes(data)
        m["stages"]["g_a"]["files"]["fp32"]["sha256"] = hashlib.sha256(data).hexdigest()
    return edit


def test_junk_onnx_graph_is_a_package_error(tmp_path: Path) -> None:
    root = edited_package(tmp_path, _replace_g_a(b"junk" * 100))
    with pytest.raises(PackageError, match=r"g_a\.fp32\.onnx: ONNX Runtime cannot load this graph") as info:
        Codec(root).encode_array(IMAGE)
    assert "\n" not in str(info.value)


def test_graph_of_another_stage_is_a_package_error(tmp_path: Path) -> None:
    root = edited_package(tmp_path, _replace_g_a((GOLDEN / "g_s.fp32.onnx").read_bytes()))
    with pytest.raises(PackageError, match="cannot run the fp32 g_a graph"):
        Codec(root).encode_array(IMAGE)


def _no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(self: Any) -> None:
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    monkeypatch.setattr(Image.Image, "load", load)


def test_pixel_cap_is_checked_from_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    Image.new("L", (3000, 2000)).save(path)
    _no_decoding(monkeypatch)
    with pytest.raises(DataError, match="3000x2000 pixels exceeds the cap of 1000 pixels"):
        load_rgb(path, max_pixels=1000)
    with pytest.raises(DataError, match="exceeds the cap of 1000 pixels"):
        Codec(GOLDEN, max_pixels=1000).encode_file(path)


def test_decompression_bomb_is_no_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (40, 30)).save(tmp_path / "warned.png")  # 1200 pixels: Pillow warns (1-2x its limit)
    Image.new("RGB", (50, 50)).save(tmp_path / "refused.png")  # 2500 pixels: Pillow refuses (> 2x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as under python -W error
        assert load_rgb(tmp_path / "warned.png")[0].shape == (3, 30, 40)
        with pytest.raises(DataError, match="cannot read image"):
            load_rgb(tmp_path / "refused.png")


def test_intnet_on_a_missing_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    with pytest.raises(BackendUnavailable, match=r"--intnet torch:cuda:99: .* no such CUDA device"):
        Codec(GOLDEN, intnet="torch:cuda:99")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailable, match=r"--intnet torch:cuda: .* no such CUDA device"):
        Codec(GOLDEN, intnet="torch:cuda")
    with pytest.raises(LicError, match="unknown integer-network evaluator"):
        Codec(GOLDEN, intnet="torch:cuda:x")


def test_wrong_package_message_shows_whole_fingerprints() -> None:
    ours, theirs = bytes(range(16)), bytes(range(15)) + b"\xff"  # equal in their first 8 hex digits
    data = pack(Header(theirs, 16, 16, MODE_RGB, 48, 48), [b"\x00"])
    with pytest.raises(BitstreamError) as info:
        unpack(data, fingerprint=ours)
    assert theirs.hex() in str(info.value) and ours.hex() in str(info.value)


@pytest.mark.parametrize(("precision", "flags"), [("int8-u8s8", "--int8 --cpu-int8"), ("int8", "--int8"),
                                                  ("fp16", "--fp16")])
def test_missing_graph_hint_names_the_export_flags(precision: str, flags: str) -> None:
    with pytest.raises(PackageError, match=f"no {precision} graph .*; re-export with {flags}$"):
        Codec(GOLDEN, precision=precision).encode_array(IMAGE)


def test_image_warning_is_one_plain_line(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((20, 30, 4), np.uint8), "RGBA").save(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_rgb(path)
    (w,) = caught
    assert issubclass(w.category, UserWarning)
    from lic_deploy.cli import _format_warning  # what `lic-deploy` installs as warnings.formatwarning

    text = _format_warning(w.message, w.category, w.filename, w.lineno, w.line)
    assert text == f"lic-deploy: warning: {path}: alpha channel dropped\n"
    other = _format_warning("x", RuntimeWarning, "f.py", 3, "")
    assert "f.py:3" in other and "lic-deploy" not in other


def _replace_entropy(data: bytes) -> Callable[[dict[str, Any], Path], None]:
    def edit(m: dict[str, Any], root: Path) -> None:
        (root / "entropy.npz").write_bytes(data)
        m["entropy"]["sha256"] = hashlib.sha256(data).hexdigest()
    return edit


@pytest.mark.parametrize("cut", [0.5, 0.99])
def test_truncated_entropy_model_is_a_package_error(tmp_path: Path, cut: float,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    data = (GOLDEN / "entropy.npz").read_bytes()
    root = edited_package(tmp_path, _replace_entropy(data[: int(len(data) * cut)]))
    with pytest.raises(PackageError, match=r"entropy\.npz: unreadable entropy model") as info:
        Codec(root).encode_array(IMAGE)
    assert "\n" not in str(info.value)
    with pytest.raises(PackageError, match=r"entropy\.npz: unreadable entropy model"):
        Codec(root).decode((GOLDEN.parent / "stream.lic").read_bytes())
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "a.png")
    assert main(["encode", str(root), str(tmp_path / "a.png"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "entropy.npz" in err and "Traceback" not in err


@pytest.mark.parametrize("key, value", [("min_size", 4096), ("min_size", 1025), ("pad_multiple", 2048)])
def test_geometry_beyond_the_bound_is_refused(tmp_path: Path, key: str, value: int) -> None:
    """A forged min_size of 4096 would pad a small image to 4096x4096 (tens of seconds, gigabytes)."""
    root = edited_package(tmp_path, lambda m, _: m["geometry"].update({key: value}))
    with pytest.raises(PackageError, match=rf"'geometry\.{key}' must be an integer in \d\.\.1024"):
        Package.open(root)


def test_geometry_at_the_bound_still_opens(tmp_path: Path) -> None:
    root = edited_package(tmp_path, lambda m, _: m["geometry"].update(min_size=1024))
    assert Package.open(root).pad(IMAGE)[0].shape == (3, 1024, 1024)
