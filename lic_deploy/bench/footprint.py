"""`make bench-runtime`: what a deployment costs to install and to start.

Creates a fresh virtual environment holding the runtime layer only (`pip install .`, no extras), reports its
size on disk, checks that torch and compressai are absent, and times `lic-deploy decode` of one small image in
it (median of 5 process starts), against importing the factory layer (torch + compressai) in the full venv.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def du_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def timed(cmd: list[str], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("package", help="a codec package to decode with")
    parser.add_argument("--out", default="out/bench-runtime")
    args = parser.parse_args()
    out = Path(args.out)
    venv = out / "runtime-venv"
    if venv.exists():
        shutil.rmtree(venv)
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "."], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    has_torch = any(site.glob("torch")) or any(site.glob("compressai"))
    from PIL import Image

    Image.new("RGB", (64, 48), (120, 60, 30)).save(out / "small.png")
    cli = str(venv / "bin" / "lic-deploy")
    subprocess.run([cli, "encode", args.package, str(out / "small.png"), "-o", str(out), "--no-psnr"], check=True,
                   capture_output=True)
    decode_s = timed([cli, "decode", args.package, str(out / "small.lic"), "-o", str(out / "dec")])
    help_s = timed([cli, "--help"])
    factory_s = timed([sys.executable, "-c", "import torch, compressai"], repeat=3)
    print(f"runtime venv: {du_mb(site):.0f} MB of packages in site-packages, torch/compressai installed: {has_torch}")
    print(f"lic-deploy decode of a 64x48 image (process start to exit, median of 5): {1000 * decode_s:.0f} ms")
    print(f"lic-deploy --help: {1000 * help_s:.0f} ms; importing torch + compressai (factory layer): "
          f"{1000 * factory_s:.0f} ms")


if __name__ == "__main__":
    main()
