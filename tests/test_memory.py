"""The decode memory check (runtime/memory.py): available memory from /proc and the cgroup, the estimate from a
package's footprint, the one-line refusal before anything image-sized is decoded, and the export's measurement."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lic_deploy.cli import main
from lic_deploy.errors import DataError, PackageError
from lic_deploy.runtime import memory


def _fake_root(tmp_path: Path, meminfo_kb: int | None, cgroup: dict[str, str]) -> Path:
    tmp_path.mkdir(parents=True)
    if meminfo_kb is not None:
        (tmp_path / "proc").mkdir(parents=True)
        (tmp_path / "proc/meminfo").write_text(f"MemTotal: 99999999 kB\nMemAvailable: {meminfo_kb} kB\n")
    for name, text in cgroup.items():
        path = tmp_path / "sys/fs/cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return tmp_path


def test_available_memory_is_the_least_of_meminfo_and_the_cgroups(tmp_path: Path) -> None:
    gib = 2**30
    assert memory.available_bytes(_fake_root(tmp_path / "a", 8 * 2**20, {})) == 8 * gib
    v2 = {"memory.max": str(4 * gib), "memory.current": str(gib)}
    assert memory.available_bytes(_fake_root(tmp_path / "b", 8 * 2**20, v2)) == 3 * gib
    unlimited = {"memory/memory.limit_in_bytes": "9223372036854771712", "memory/memory.usage_in_bytes": "5"}
    assert memory.available_bytes(_fake_root(tmp_path / "c", 8 * 2**20, unlimited)) == 8 * gib
    no_limit = {"memory.max": "max", "memory.current": "1"}
    assert memory.available_bytes(_fake_root(tmp_path / "d", None, no_limit)) is None
    over = {"memory.max": "100", "memory.current": "200"}
    assert memory.available_bytes(_fake_root(tmp_path / "e", None, over)) == 0
    # the file cache the kernel would reclaim counts as free; a nested cgroup's ancestors limit it too
    nested = {"a/b/memory.max": str(4 * gib), "a/b/memory.current": str(3 * gib),
              "a/b/memory.stat": f"anon 5\ninactive_file {gib}\nactive_file 7", "a/memory.max": str(6 * gib),
              "a/memory.current": str(5 * gib + gib // 2)}
    root = _fake_root(tmp_path / "f", 8 * 2**20, nested)
    (root / "proc/self").mkdir()
    (root / "proc/self/cgroup").write_text("0::/a/b\n")
    assert memory.available_bytes(root) == gib // 2  # a: 6 - 5.5 GiB; a/b: 4 - (3 - 1) GiB
    v1 = {"memory/x/memory.limit_in_bytes": str(2 * gib), "memory/x/memory.usage_in_bytes": str(gib),
          "memory/x/memory.stat": f"cache 9\ntotal_inactive_file {gib // 4}"}
    root = _fake_root(tmp_path / "g", 8 * 2**20, v1)
    (root / "proc/self").mkdir()
    (root / "proc/self/cgroup").write_text("5:cpu:/y\n4:memory:/x\n0::/\n")
    assert memory.available_bytes(root) == gib + gib // 4
    here = memory.available_bytes()
    assert here is None or here > 0


def test_check_decode_refuses_what_does_not_fit() -> None:
    fp = {"base_bytes": 100, "bytes_per_pixel": 1000}
    fits = 100 + 1000 * 100 * 100
    memory.check_decode(fp, 100 * 100, "a 100x100 image", available=fits)  # exactly fits
    with pytest.raises(DataError, match=r"decoding a 100x101 image needs about 0.0 GiB \(this package's measured"):
        memory.check_decode(fp, 100 * 101, "a 100x101 image", available=fits)
    memory.check_decode(fp, 100 * 101, "a 100x101 image", available=fits, held=1000 * 100)  # reused memory
    with pytest.raises(DataError, match="packages without a footprint"):
        memory.check_decode(None, 8192 * 8192, "a 8192x8192 image", available=2**30)
    assert memory.decode_bytes(None, 10) == 10 * memory.DEFAULT_FOOTPRINT["bytes_per_pixel"]


def test_a_stream_too_large_for_the_memory_is_refused_in_one_line(
        package_mbt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A short stream of a large image is refused before it is decoded when its estimate (padded pixels: 250x300
    pads to 256x320) exceeds the available memory (here made small); --no-memory-check (check_memory=False)
    decodes it anyway; memory that earlier decodes of the same codec keep (and the next one reuses) counts."""
    from lic_deploy.runtime.codec import Codec
    from lic_deploy.runtime.package import Package

    codec = Codec(package_mbt, threads=1)
    data = codec.encode_array(np.full((3, 250, 300), 0.5, dtype=np.float32))[0]
    stream = tmp_path / "flat.lic"
    stream.write_bytes(data)
    need = memory.decode_bytes(Package.open(package_mbt).manifest.get("footprint"), 256 * 320)
    monkeypatch.setattr(memory, "available_bytes", lambda: need - 1)
    monkeypatch.setattr(memory, "resident_bytes", lambda: 10**8)  # nothing held beyond the first decode's start
    with pytest.raises(DataError, match="decoding a 300x250 image needs about"):
        codec.decode(data)
    out = tmp_path / "dec"
    assert main(["decode", str(package_mbt), str(stream), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{stream}: decoding a 300x250 image needs about" in err[0]
    assert not out.exists() or not any(out.iterdir())  # nothing written
    assert main(["decode", str(package_mbt), str(stream), "-o", str(out), "--no-memory-check"]) == 0
    assert Codec(package_mbt, threads=1, check_memory=False).decode(data).image.shape == (250, 300, 3)
    monkeypatch.setattr(memory, "available_bytes", lambda: need)
    second = Codec(package_mbt, threads=1)
    assert second.decode(data).image.shape == (250, 300, 3)
    monkeypatch.setattr(memory, "available_bytes", lambda: need // 2)  # the first decode's memory is kept ...
    monkeypatch.setattr(memory, "resident_bytes", lambda: 10**8 + need // 2)  # ... and reused by the next
    assert second.decode(data).image.shape == (250, 300, 3)
    with pytest.raises(DataError, match="needs about"):
        Codec(package_mbt, threads=1).decode(data)  # a fresh codec holds nothing


def test_probe_reports_its_own_peak_not_the_parents(package_mbt: Path, tmp_path: Path) -> None:
    """The probe runs in a fresh process: its peak must not include this (here enlarged) process's memory, as
    ru_maxrss would after fork and exec on Linux."""
    from lic_deploy.runtime.codec import Codec

    stream = tmp_path / "small.lic"
    stream.write_bytes(Codec(package_mbt, threads=1).encode_array(np.full((3, 64, 64), 0.5, np.float32))[0])
    ballast = np.ones(2**30 // 8)  # 1 GiB resident in the parent
    peak = memory._probe(package_mbt, stream)
    assert 20 * 2**20 < peak < 2**30 and float(ballast[-1]) == 1.0
    with pytest.raises(PackageError, match="--no-footprint"):  # a probe that fails says how to export without it
        memory._probe(tmp_path / "no-package", stream)


def test_export_measures_the_footprint_and_the_manifest_checks_it(ckpt_mbt: Path, tmp_path: Path) -> None:
    from lic_deploy.runtime.package import Package, fingerprint

    pkg = tmp_path / "pkg"
    assert main(["export", str(ckpt_mbt), "-o", str(pkg), "--calib-count", "1", "--calib-size", "64"]) == 0
    manifest = json.loads((pkg / "manifest.json").read_text())
    fp = manifest["footprint"]
    # mbt2018-mean N=128/M=192 measured about 1580 bytes per pixel on this machine: bytes, not kB or MiB
    assert fp["base_bytes"] == 0 and 400 <= fp["bytes_per_pixel"] <= 5000 and fp["probe_size"] == 1024
    assert fingerprint(manifest) == manifest["fingerprint"]  # the footprint is outside the fingerprint
    assert Package.open(pkg).manifest["footprint"] == fp
    manifest["footprint"]["bytes_per_pixel"] = "1580"
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match=r"footprint\.bytes_per_pixel"):
        Package.open(pkg)
    quick = tmp_path / "quick"
    assert main(["export", str(ckpt_mbt), "-o", str(quick), "--calib-count", "1", "--calib-size", "64",
                 "--no-footprint"]) == 0
    assert "footprint" not in json.loads((quick / "manifest.json").read_text())
