"""Bad input to `export` and calibration: one LicError each, early, and nothing already written is lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lic_deploy.errors import CheckpointError, DataError, LicError, PackageError
from lic_deploy.export import calibration
from lic_deploy.export.calibration import manifest, read_manifest, select_crops
from lic_deploy.export.package_writer import ExportOptions, export_package
from tests.conftest import make_checkpoint, write_images

QUICK = ExportOptions(calib_count=1, calib_size=64)


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mbt2018-mean N=M=8: exports in seconds."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.pt", "mbt2018-mean", 8, 8)


@pytest.fixture(scope="module")
def good_manifest(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("calib")
    write_images(folder, [(96, 128), (80, 90)])
    return manifest(folder, select_crops(folder, 2, size=64), seed=0, size=64)


def test_force_replaces_only_a_package_or_an_empty_folder(tiny: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    force = ExportOptions(overwrite=True)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("mine")
    (tmp_path / "file.txt").write_text("mine too")
    with pytest.raises(PackageError, match="not a codec package"):
        export_package(tiny, victim, options=force, log=quiet)
    with pytest.raises(PackageError, match="not a folder"):
        export_package(tiny, tmp_path / "file.txt", options=force, log=quiet)
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out in (".", "..", work, tmp_path):
        with pytest.raises(PackageError, match="holds the current directory"):
            export_package(tiny, out, options=force, log=quiet)
    assert (victim / "notes.txt").read_text() == "mine" and (work / "keep.txt").read_text() == "mine"
    assert (tmp_path / "file.txt").read_text() == "mine too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "victim", "work"]


def test_force_replaces_a_package_and_creates_missing_parents(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "deeper" / "pkg"
    export_package(tiny, out, options=QUICK, log=quiet)
    first = json.loads((out / "manifest.json").read_text())
    force = ExportOptions(calib_count=1, calib_size=64, overwrite=True, calib_seed=1)
    export_package(tiny, out, options=force, log=quiet)
    assert json.loads((out / "manifest.json").read_text())["calibration"]["seed"] == 1 != first["calibration"]["seed"]
    assert [p.name for p in out.parent.iterdir()] == ["pkg"]  # no temporary or old copy left


def test_a_folder_filled_during_export_is_not_replaced(tiny: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from lic_deploy.export import entropy_build

    out = tmp_path / "empty"
    out.mkdir()
    real = entropy_build.build_entropy

    def meanwhile(*args: object, **kwargs: object) -> object:
        (out / "notes.txt").write_text("written during the export")
        return real(*args, **kwargs)

    monkeypatch.setattr(entropy_build, "build_entropy", meanwhile)
    with pytest.raises(PackageError, match="not a codec package"):
        export_package(tiny, out, options=ExportOptions(calib_count=1, calib_size=64, overwrite=True), log=quiet)
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("out", ["file.png/x", "file.png/x/y"])
def test_output_under_a_file(tiny: Path, tmp_path: Path, out: str) -> None:
    (tmp_path / "file.png").write_bytes(b"png")
    with pytest.raises(PackageError, match=r"file\.png is not a folder"):
        export_package(tiny, tmp_path / out, options=QUICK, log=quiet)
    assert (tmp_path / "file.png").read_bytes() == b"png"


def test_calib_size_must_be_a_multiple_of_the_padding(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="multiple of 64"):
        export_package(tiny, tmp_path / "pkg", options=ExportOptions(precisions=("fp32", "int8"), calib_count=2,
                                                                    calib_size=100), log=quiet)
    assert list(tmp_path.iterdir()) == []


def test_calibration_memory_is_bounded(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_loading(*args: object) -> None:
        raise AssertionError("the crops were loaded")

    monkeypatch.setattr(calibration, "load_crops", no_loading)
    with pytest.raises(DataError, match="4 GiB limit"):
        export_package(tiny, tmp_path / "pkg", options=ExportOptions(calib_count=100_000), log=quiet)


def test_negative_calibration_seed(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="seed must be a non-negative"):
        select_crops(calibration.SKIMAGE, 2, seed=-1, size=64)
    with pytest.raises(DataError, match="seed must be a non-negative"):
        export_package(tiny, tmp_path / "pkg", options=ExportOptions(calib_seed=-1, calib_count=1, calib_size=64),
                       log=quiet)


@pytest.mark.parametrize("crops, match", [
    ([], "non-empty list of crops"),
    ([{"box": [-1, 0, 64, 64]}], "crop 0"),
    ([{"box": [0, 0, 0, 64]}], "crop 0"),
    ([{"box": [0, 0, 64]}], "crop 0"),
    ([{"box": [0, 0, 64.5, 64]}], "crop 0"),
    ([{}, {"box": [0, 0, 32, 32]}], "crop 1 is 32x32 pixels but crop 0 is 64x64"),
    (["kodim01.png"], "crop 0"),
])
def test_bad_calibration_manifests(good_manifest: dict, tmp_path: Path, crops: list, match: str) -> None:
    base = good_manifest["crops"]
    entries = [{**base[i], **c} if isinstance(c, dict) else c for i, c in enumerate(crops)]
    path = tmp_path / "m.json"
    path.write_text(json.dumps({**good_manifest, "crops": entries}))
    with pytest.raises(DataError, match=match) as info:
        read_manifest(path)
    assert str(path) in str(info.value)


def test_manifest_crops_must_fit_the_model(tiny: Path, good_manifest: dict, tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps({**good_manifest, "crops": [{**c, "box": [0, 0, 32, 32]}
                                                           for c in good_manifest["crops"]]}))
    with pytest.raises(DataError, match="multiple of 64"):
        export_package(tiny, tmp_path / "pkg", options=ExportOptions(calib=path), log=quiet)


@pytest.mark.parametrize("key, value", [("entropy_bottleneck.matrices.0", float("nan")),
                                        ("h_s.2.weight", float("-inf"))])
def test_non_finite_checkpoint(tiny: Path, tmp_path: Path, key: str, value: float) -> None:
    state = torch.load(tiny, weights_only=True)
    state[key].view(-1)[0] = value
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=f"{key} holds NaN or infinite"):
        export_package(path, tmp_path / "pkg", options=QUICK, log=quiet)
    assert list(tmp_path.iterdir()) == [path]


def test_unknown_precision_is_refused_before_any_work(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(LicError, match="unknown precision 'int4'"):
        export_package(tmp_path / "absent.pt", tmp_path / "pkg", options=ExportOptions(precisions=("fp32", "int4")),
                       log=quiet)


def test_force_keeps_a_package_folder_holding_foreign_files(tiny: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from lic_deploy.cli import main

    out = tmp_path / "pkg"
    export_package(tiny, out, options=QUICK, log=quiet)
    first = json.loads((out / "manifest.json").read_text())
    force = ExportOptions(calib_count=1, calib_size=64, overwrite=True, calib_seed=1)
    (out / "photo.lic").write_bytes(b"my stream")
    with pytest.raises(PackageError, match=r"'photo\.lic'.*not part of the codec package.*nothing was deleted") as e:
        export_package(tiny, out, options=force, log=quiet)
    assert "\n" not in str(e.value) and (out / "photo.lic").read_bytes() == b"my stream"
    (out / "photo.lic").unlink()
    (out / "mydata").mkdir()
    capsys.readouterr()
    (out / "mydata" / "notes.txt").write_text("mine")
    assert main(["export", str(tiny), "-o", str(out), "--force", "--calib-count", "1", "--calib-size", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert "'mydata/'" in err, err
    assert "nothing was deleted" in err
    assert (out / "mydata" / "notes.txt").read_text() == "mine"
    assert json.loads((out / "manifest.json").read_text()) == first  # the old package is untouched too
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]
    (out / "mydata" / "notes.txt").unlink()
    (out / "mydata").rmdir()
    export_package(tiny, out, options=force, log=quiet)  # a clean package (with its calib.json, weights): replaced
    assert json.loads((out / "manifest.json").read_text())["calibration"]["seed"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]


def _golden_with_entropy(tmp_path: Path, data: bytes, **geometry: int) -> Path:
    """A copy of the golden package whose entropy.npz is `data`, its sha256 and the fingerprint recomputed."""
    import hashlib
    import shutil

    from lic_deploy.runtime.package import fingerprint

    root = tmp_path / "forged"
    shutil.copytree(Path(__file__).parent / "golden" / "package", root)
    (root / "entropy.npz").write_bytes(data)
    m = json.loads((root / "manifest.json").read_text())
    m["entropy"]["sha256"] = hashlib.sha256(data).hexdigest()
    m["geometry"].update(geometry)
    m["fingerprint"] = fingerprint(m)
    (root / "manifest.json").write_text(json.dumps(m))
    return root


def test_another_packages_entropy_model_is_a_package_error(tiny: Path, tmp_path: Path) -> None:
    import numpy as np

    from lic_deploy.runtime.codec import Codec

    other = export_package(tiny, tmp_path / "tiny_pkg", options=QUICK, log=quiet)  # N=M=8, golden: 16, 24
    data = (other / "entropy.npz").read_bytes()
    image = np.random.default_rng(0).random((3, 40, 50)).astype(np.float32)
    stream = (Path(__file__).parent / "golden" / "stream.lic").read_bytes()
    root = _golden_with_entropy(tmp_path, data)
    with pytest.raises(PackageError, match=r"entropy\.npz: entropy model has y_channels=8 .* another package"):
        Codec(root).encode_array(image)
    with pytest.raises(PackageError, match=r"entropy\.npz: .* another package"):
        Codec(root).decode(stream)
    # the geometry forged to match too: the graphs' latents do not fit the entropy model
    root2 = _golden_with_entropy(tmp_path / "2", data, y_channels=8, z_channels=8)
    with pytest.raises(PackageError, match=r"expects 8 channels .*different packages") as info:
        Codec(root2).encode_array(image)
    assert "\n" not in str(info.value)
