"""Calibration crops are deterministic, replayable from their manifest, and never copies of the images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lic_deploy.errors import DataError
from lic_deploy.export.calibration import calibration_set, select_crops


def test_deterministic_and_seeded(image_dir: Path) -> None:
    a = select_crops(image_dir, 5, seed=3, size=64)
    assert a == select_crops(image_dir, 5, seed=3, size=64)
    assert a != select_crops(image_dir, 5, seed=4, size=64)
    assert len(a) == 5 and all(c.box[2] == c.box[3] == 64 for c in a)


def test_manifest_replays_identically(image_dir: Path, tmp_path: Path) -> None:
    crops, manifest = calibration_set(image_dir, 3, seed=1, size=64)
    path = tmp_path / "calib.json"
    path.write_text(json.dumps(manifest))
    replay, _ = calibration_set(str(path), 999)
    assert len(replay) == 3 and all(np.array_equal(a, b) for a, b in zip(crops, replay, strict=True))
    assert "sha256" in manifest["crops"][0] and not any(isinstance(v, list) and len(v) > 8
                                                        for v in manifest["crops"][0].values())


def test_changed_file_is_refused(image_dir: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "imgs"
    shutil.copytree(image_dir, folder)
    _, manifest = calibration_set(folder, 2, size=64)
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    (folder / manifest["crops"][0]["file"]).write_bytes((folder / manifest["crops"][1]["file"]).read_bytes()
                                                       + b"x")
    with pytest.raises(DataError, match="changed since the manifest"):
        calibration_set(str(tmp_path / "m.json"), 2)


def test_bad_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        select_crops(tmp_path / "nope", 2)
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("hi")
    with pytest.raises(DataError, match="no images"):
        select_crops(tmp_path / "txt", 2)
    with pytest.raises(DataError, match="at least 1"):
        select_crops(tmp_path / "txt", 0)


def test_default_is_skimage_photos() -> None:
    crops, manifest = calibration_set(None, 3, size=128)
    assert manifest["source"] == "skimage" and len(crops) == 3
    assert all(c.shape == (3, 128, 128) and c.dtype == np.float32 for c in crops)


def test_sources_under_the_data_root_are_portable(image_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest made from a folder under $LIC_DEPLOY_DATA replays wherever that root is moved."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(image_dir, root / "imgs")
    monkeypatch.setenv("LIC_DEPLOY_DATA", str(root))
    crops, manifest = calibration_set(root / "imgs", 2, size=64)
    assert manifest["source"] == "data:imgs"
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    moved = tmp_path / "elsewhere"
    shutil.move(root, moved)
    monkeypatch.setenv("LIC_DEPLOY_DATA", str(moved))
    replay, _ = calibration_set(str(tmp_path / "m.json"), 2)
    assert all(np.array_equal(a, b) for a, b in zip(crops, replay, strict=True))
    monkeypatch.delenv("LIC_DEPLOY_DATA")
    with pytest.raises(DataError, match="LIC_DEPLOY_DATA"):
        calibration_set(str(tmp_path / "m.json"), 2)


def test_shipped_manifest_is_valid() -> None:
    from lic_deploy.export.calibration import read_manifest

    source, crops, raw = read_manifest(Path(__file__).resolve().parents[1] / "calib" / "train-64.json")
    assert source == "data:train" and len(crops) == 64 and raw["size"] == 256
    assert all(len(c.sha256) == 64 and c.box[2] == c.box[3] == 256 for c in crops)
