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
        (["export", str(tmp_path / "junk.pt"), "-o", str(tmp_path / "p1")], "not a loadable PyTorch checkpoint"),
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


def test_console_script_help_is_fast_and_light() -> None:
    """--help must not import torch, compressai or onnx (they take seconds)."""
    code = ("import sys, runpy; sys.argv = ['lic-deploy', '--help']\n"
            "try:\n    runpy.run_module('lic_deploy.cli', run_name='__main__')\nexcept SystemExit: pass\n"
            "heavy = [m for m in ('torch', 'compressai', 'onnx', 'onnxruntime') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "export" in out and "HEAVY []" in out
