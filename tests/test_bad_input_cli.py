"""Bad input at the command line: one line on stderr, a non-zero exit, nothing already written lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lic_deploy.cli import main
from lic_deploy.errors import DataError, LicError


def _train(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "-o", str(out), "--N", "8", "--M", "16", "--batch", "1", "--patch", "64",
            "--downscale", "0", "--steps", "2", "--threads", "2", "--optimizer", "adam", *extra]


def _one_error_line(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """The error's one line ends stderr (a progress bar may come before it); no traceback."""
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert line.startswith("lic-deploy: error:") and err.count("lic-deploy: error:") == 1 and "Traceback" not in err
    assert all(n in line for n in needles), line
    return line


def test_unwritable_output_paths_are_one_line_errors(package_mbt: Path, image_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """OS errors on output paths (a folder under a file, a folder where a stream goes) exit 2 with one line."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep")
    assert main(["encode", str(package_mbt), str(image_dir), "-o", str(blocker / "sub")]) == 2
    _one_error_line(capsys, "file.txt")
    out = tmp_path / "out"
    (out / "img0.lic").mkdir(parents=True)
    assert main(["encode", str(package_mbt), str(image_dir / "img0.png"), "-o", str(out)]) == 2
    _one_error_line(capsys, "img0.lic")
    assert blocker.read_text() == "keep"


def test_inputs_that_would_write_the_same_output_are_refused(package_mbt: Path, image_dir: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "img0.jpg").write_bytes((image_dir / "img0.png").read_bytes())  # decodable whatever the suffix
    out = tmp_path / "out"
    assert main(["encode", str(package_mbt), str(image_dir / "img0.png"), str(twin / "img0.jpg"), "-o", str(out)]) == 2
    _one_error_line(capsys, "would both be written", "img0.lic")
    assert not list(out.glob("*.lic"))


def test_a_closed_stdout_ends_quietly(tiny_data: Path, tmp_path: Path) -> None:
    """`lic-deploy ... | head -0`: no traceback and no "Exception ignored" at exit; exit 141 (as SIGPIPE would)."""
    proc = subprocess.Popen([sys.executable, "-m", "lic_deploy", "calib", str(tiny_data), "--count", "2", "--size",
                             "64", "-o", str(tmp_path / "c.json")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err and "Exception" not in err, err


@pytest.mark.parametrize("argv", [
    ["encode", "PKG", "IMG", "-o", "OUT", "--threads", "100000"],
    ["train", "--data", "D", "-o", "x.pt", "--max-seconds", "-1"],
    ["train", "--data", "D", "-o", "x.pt", "--until-val-loss", "-1"],
    ["export", "CKPT", "--fallback-target", "nan", "-o", "PKG"],
    ["bench", "MODEL", "--data", "DIR", "--fallback-target", "1000"],
    ["bench", "MODEL", "--data", "DIR", "--repeat", "100000000"],
    ["calib", "DIR", "-o", "c.json", "--seed", "-1"],
    ["export", "CKPT", "--calib-seed", "-1", "-o", "PKG"],
    ["bench", "MODEL", "--data", "DIR", "--images", "-1"],
    ["bench", "MODEL", "--data", "DIR", "--outlier-images", "-1"],
])
def test_out_of_range_numbers_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and "must be" in capsys.readouterr().err


def test_argument_errors_do_not_name_internal_functions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--data", "D", "-o", "x.pt", "--steps", "abc"])
    err = capsys.readouterr().err
    assert "expected a whole number, got 'abc'" in err and "_positive" not in err


def test_cpu_int8_needs_int8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path / "missing.pt"), "--cpu-int8", "-o", str(tmp_path / "pkg")]) == 2
    _one_error_line(capsys, "--cpu-int8", "--int8")


@pytest.mark.parametrize(("extra", "needle"), [
    (["--lmbda", "nan"], "--lmbda"), (["--lr", "-1"], "--lr"), (["--lr", "inf"], "--lr"), (["--clip", "-1"], "--clip"),
    (["--N", "100000"], "at most"), (["--arch-config", "slices=3"], "--arch tcm only"),
    (["--downscale", "-5"], "--downscale"), (["--batch", "100000"], "--batch at most"),
    (["--workers", "100000"], "--workers in 0..64"),
    (["--arch", "tcm", "--patch", "256", "--arch-config", "depth=1000"], "at most"), (["--arch", "elic", "--M", "136",
                                                                     "--context-widths", "100000,8"], "at most"),
])
def test_train_refuses_impossible_settings_before_training(tiny_data: Path, tmp_path: Path, extra: list[str],
                                                           needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_train(tiny_data, tmp_path / "a.pt", *extra)) == 2
    _one_error_line(capsys, needle)
    assert not list(tmp_path.iterdir())


def test_train_output_paths_are_checked_first_and_never_overwritten(tiny_data: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A folder, a missing parent and an existing checkpoint (without --resume) are refused before any training;
    the existing checkpoint and its log stay as they were."""
    assert main(_train(tiny_data, tmp_path)) == 2
    _one_error_line(capsys, "checkpoint file")
    assert main(_train(tiny_data, tmp_path / "missing" / "a.pt")) == 2
    _one_error_line(capsys, "existing folder")
    done = tmp_path / "a.pt"
    assert main(_train(tiny_data, done)) == 0
    capsys.readouterr()
    before = done.read_bytes(), Path(f"{done}.jsonl").read_text()
    assert main(_train(tiny_data, done)) == 2
    _one_error_line(capsys, "exists", "--resume")
    assert (done.read_bytes(), Path(f"{done}.jsonl").read_text()) == before
    assert main(_train(tiny_data, tmp_path / "b.pt", "--resume", str(done), "--M", "24")) == 2  # another width
    _one_error_line(capsys, "do not fit")


def test_resuming_a_checkpoint_without_training_state_says_so(tiny_data: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import make_checkpoint

    raw = make_checkpoint(tmp_path / "raw.pt", "mbt2018-mean", 8, 16)
    assert main(_train(tiny_data, tmp_path / "a.pt", "--resume", str(raw))) == 2
    _one_error_line(capsys, "not a checkpoint of `lic-deploy train`", "--init")


def test_a_diverging_run_stops_without_saving_its_weights(tiny_data: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a.pt"
    assert main(_train(tiny_data, out, "--lr", "1e30", "--steps", "6", "--warmup", "0")) == 2
    _one_error_line(capsys, "became", "lower --lr")
    assert not out.exists()
    assert main(_train(tiny_data, out)) == 2  # its log is left: a new run does not append to it
    _one_error_line(capsys, "a.pt.jsonl exists")


def test_encode_and_decode_never_replace_files_without_force(package_mbt: Path, image_dir: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Decoding next to the source photo would replace it with the reconstruction: refused; --force replaces."""
    photo = tmp_path / "img0.png"
    photo.write_bytes((image_dir / "img0.png").read_bytes())
    assert main(["encode", str(package_mbt), str(photo), "-o", str(tmp_path), "--no-psnr"]) == 0
    stream = (tmp_path / "img0.lic").read_bytes()
    assert main(["decode", str(package_mbt), str(tmp_path / "img0.lic"), "-o", str(tmp_path)]) == 2
    _one_error_line(capsys, "img0.png exists", "--force")
    assert photo.read_bytes() == (image_dir / "img0.png").read_bytes()
    assert main(["encode", str(package_mbt), str(photo), "-o", str(tmp_path)]) == 2
    _one_error_line(capsys, "img0.lic exists")
    assert main(["encode", str(package_mbt), str(photo), "-o", str(tmp_path), "--no-psnr", "--force"]) == 0
    assert (tmp_path / "img0.lic").read_bytes() == stream  # deterministic: the same bytes again


def test_report_never_overwrites_an_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a").mkdir()
    first, second = tmp_path / "a" / "results.json", tmp_path / "b.json"
    for f in (first, second):
        f.write_text("{}")
    assert main(["report", str(first), str(second), "-o", str(tmp_path / "a")]) == 2
    _one_error_line(capsys, "holds one of the results files")
    assert first.read_text() == "{}"


def test_malformed_training_logs_and_results_are_refused(tmp_path: Path) -> None:
    from lic_deploy.bench.convergence import read_rows
    from lic_deploy.bench.runner import SCHEMA, SCHEMA_VERSION, load_results

    for rows in ([{"val_loss": 1.0}], [{"step": 1, "val_loss": "low"}], [5]):
        log = tmp_path / "log.jsonl"
        log.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(DataError, match="row 1"):
            read_rows(log)
    good = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "models": [], "rows": [], "summaries": []}
    for bad in ({"models": "mbt"}, {"rows": [{"model": "m"}]}):
        path = tmp_path / "results.json"
        path.write_text(json.dumps(good | bad))
        with pytest.raises(LicError, match="is not a list of entries"):
            load_results(path)
    path.write_text(json.dumps(good))
    assert load_results(path)["rows"] == []
    with pytest.raises(DataError, match="not a regular file"):
        read_rows(tmp_path)
    from lic_deploy.bench.convergence import read_log

    log = tmp_path / "resumed.jsonl"  # steps 100, 200 logged, resumed from step 100: 200 logged again
    log.write_text("".join(json.dumps({"step": s, "seconds": s / 10, "val_loss": v}) + "\n"
                           for s, v in ((100, 3.0), (200, 2.5), (200, 2.4), (300, 2.0))))
    assert [(r["step"], r["val_loss"]) for r in read_log(log)] == [(100, 3.0), (200, 2.4), (300, 2.0)]
    with pytest.raises(DataError, match="not a regular file"):
        load_results("/dev/zero")


def test_data_folders_by_name_under_the_data_root(tiny_data: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """data:<sub> names a folder under $LIC_DEPLOY_DATA for train and bench; without the variable, a usage error."""
    from lic_deploy.cli import build_parser

    monkeypatch.setenv("LIC_DEPLOY_DATA", str(tiny_data.parent))
    name = f"data:{tiny_data.name}"
    args = build_parser().parse_args(["train", "--data", name, "--val", name, "-o", str(tmp_path / "m.pt")])
    assert Path(args.data) == Path(args.val) == tiny_data
    assert Path(build_parser().parse_args(["bench", "m.pt", "--data", name]).data) == tiny_data
    assert main(_train(Path(f"{name}-missing"), tmp_path / "m.pt")) == 2
    _one_error_line(capsys, f"{tiny_data}-missing", "does not exist")
    monkeypatch.delenv("LIC_DEPLOY_DATA")
    with pytest.raises(SystemExit) as stop:
        main(["bench", "m.pt", "--data", name])
    assert stop.value.code == 2 and "needs $LIC_DEPLOY_DATA" in capsys.readouterr().err
