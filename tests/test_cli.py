"""The CLI: bad input gives one clear line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lic_deploy.cli import main


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(args)
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code)
    err = capsys.readouterr().err.strip()
    return code, err


def _one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2
    last = err.splitlines()[-1]
    assert needle in last and "Traceback" not in err


def test_export_bad_inputs(tmp_path: Path, ckpt_mbt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "junk.pt").write_bytes(b"junk")
    (tmp_path / "empty").mkdir()
    (tmp_path / "exists").mkdir()
    cases = [
        (["export", str(tmp_path / "junk.pt"), "-o", str(tmp_path / "p1")], "not a PyTorch checkpoint"),
        (["export", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "p2")], "no such checkpoint"),
        (["export", str(ckpt_mbt), "-o", str(tmp_path / "exists")], "already exists"),
        (["export", str(ckpt_mbt), "-o", str(tmp_path / "p3"), "--calib", str(tmp_path / "empty")], "no images"),
        (["export", str(ckpt_mbt), "-o", str(tmp_path / "p4"), "--arch", "bmshj2018-hyperprior"],
         "do not match architecture"),
        (["export", str(ckpt_mbt), "-o", str(tmp_path / "p5"), "--arch", "nope"], "invalid choice"),
        (["export", str(ckpt_mbt), "-o", str(tmp_path / "p6"), "--calib-count", "0"], "must be at least 1"),
    ]
    for args, needle in cases:
        code, err = _run(args, capsys)
        _one_line_error(code, err, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "exists", "junk.pt"]


def test_export_of_weights_the_integer_builder_cannot_represent(tmp_path: Path, ckpt_mbt: Path,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A bound the integer entropy builder cannot meet (it raises ValueError) is one line and exit 2."""
    from lic_deploy.export import entropy_build

    def refuse(*_: object, **__: object) -> None:
        raise ValueError("bias of Conv2d(4, 4) does not fit the accumulator")

    monkeypatch.setattr(entropy_build, "build_entropy", refuse)
    code, err = _run(["export", str(ckpt_mbt), "-o", str(tmp_path / "pkg"), "--calib-count", "1"], capsys)
    _one_line_error(code, err, "cannot represent it (bias of Conv2d(4, 4) does not fit the accumulator)")
    assert not (tmp_path / "pkg").exists()


def test_console_script_help_is_fast_and_light() -> None:
    """--help must not import torch, compressai or onnx (they take seconds)."""
    code = ("import sys, runpy; sys.argv = ['lic-deploy', '--help']\n"
            "try:\n    runpy.run_module('lic_deploy.cli', run_name='__main__')\nexcept SystemExit: pass\n"
            "heavy = [m for m in ('torch', 'compressai', 'onnx', 'onnxruntime') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "export" in out and "HEAVY []" in out


def test_encode_decode_folders(package_mbt: Path, image_dir: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = _run(["encode", str(package_mbt), str(image_dir), "-o", str(tmp_path / "lic")], capsys)
    assert code == 0
    streams = sorted((tmp_path / "lic").glob("*.lic"))
    assert [p.stem for p in streams] == ["img0", "img1"]
    assert main(["encode", str(package_mbt), str(image_dir / "img0.png"), "-o", str(tmp_path / "one")]) == 0
    table = capsys.readouterr().out
    assert "bpp" in table and "PSNR" in table and "img0.png" in table
    assert main(["decode", str(package_mbt), str(tmp_path / "lic"), "-o", str(tmp_path / "png")]) == 0
    from PIL import Image

    with Image.open(tmp_path / "png" / "img1.png") as im:
        assert im.size == (90, 70)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.lic").write_bytes(b"LICD" + bytes(60))
    code, err = _run(["decode", str(package_mbt), str(tmp_path / "bad"), "-o", str(tmp_path / "png")], capsys)
    _one_line_error(code, err, "x.lic")
    code, err = _run(["decode", str(tmp_path), str(streams[0]), "-o", str(tmp_path / "png2")], capsys)
    _one_line_error(code, err, "not a codec package")
    code, err = _run(["encode", str(package_mbt), str(tmp_path / "nothing.png"), "-o", str(tmp_path)], capsys)
    _one_line_error(code, err, "no such file")
    code, _ = _run(["encode", str(package_mbt), str(image_dir), "-o", str(tmp_path / "ort"), "--intnet", "ort"], capsys)
    assert code == 0 and (tmp_path / "ort" / "img1.lic").read_bytes() == streams[1].read_bytes()
    code, err = _run(["decode", str(package_mbt), str(streams[0]), "-o", str(tmp_path), "--intnet", "gpu"], capsys)
    _one_line_error(code, err, "choose numpy, ort or torch:DEVICE")


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision', 'compressai', 'onnx', 'skimage'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from lic_deploy.cli import main
pkg, img, out = sys.argv[1:4]
assert main(['encode', pkg, img, '-o', out + '/lic']) == 0
assert main(['decode', pkg, out + '/lic', '-o', out + '/png']) == 0
print('OK', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'compressai', 'onnx')))
"""


def test_runtime_path_never_imports_torch(package_mbt: Path, image_dir: Path, tmp_path: Path) -> None:
    """encode/decode with --backend ort work with torch, CompressAI and onnx made unimportable."""
    proc = subprocess.run([sys.executable, "-c", BLOCKER, str(package_mbt), str(image_dir), str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OK []" in proc.stdout
    assert len(list((tmp_path / "png").glob("*.png"))) == 2


def test_atomic_writes_keep_the_old_file_on_failure_and_take_the_usual_permissions(tmp_path: Path) -> None:
    import os

    from lic_deploy.atomic import atomic_path, write_bytes

    target = tmp_path / "out.lic"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.lic"]
    long = tmp_path / ("x" * 250 + ".lic")  # at the file-name limit with its temporary name's prefix added
    write_bytes(long, b"new")
    umask = os.umask(0)
    os.umask(umask)
    assert long.read_bytes() == b"new" and long.stat().st_mode & 0o777 == 0o666 & ~umask
    with atomic_path(tmp_path / "plot.png") as tmp:  # writers that take the format from the suffix see it
        assert tmp.suffix == ".png" and tmp.parent == tmp_path
        tmp.write_bytes(b"png")
    assert (tmp_path / "plot.png").read_bytes() == b"png"
