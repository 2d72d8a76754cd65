"""Pack the data a GPU model-set run needs into `.gpu-data/` (git-ignored), small enough to travel with the working
tree to a lent GPU machine (64 MiB in all, of which the tracked tree takes about 37): every `--every`-th training
photo with its shorter side reduced to `--short-side` pixels (`load_image`'s bicubic resize, what `--downscale`
does at load time) and saved as JPEG `--quality`, and the first `--val-count` validation images as they are.

    PYTHONPATH=. python scripts/gpu_pack.py --data ../shared/data/train --val ../shared/data/kodak

Prints what it wrote and its size; exits 1 when the pack exceeds `--budget-mib` (default: what the 64 MiB leave
after the files git tracks or would track, `.whl`, and 1 MiB to spare). The copies are transient: never
commit them (the data's terms, ../shared/data/README.md).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

from lic_deploy.runtime.images import list_images
from lic_deploy.train.data import load_image


def pack(data: Path, val: Path, out: Path, every: int, short_side: int, quality: int, val_count: int) -> int:
    """Write out/train and out/kodak afresh; returns the bytes written."""
    shutil.rmtree(out, ignore_errors=True)
    (out / "train").mkdir(parents=True)
    (out / "kodak").mkdir()
    for path in list_images(data)[::every]:
        img = load_image(path, short_side, short_side, small="upscale")
        Image.fromarray(img).save(out / "train" / f"{path.stem}.jpg", quality=quality)
    for path in list_images(val)[:val_count]:
        shutil.copy2(path, out / "kodak" / path.name)
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


def travel_budget(limit_mib: float = 64.0, spare_mib: float = 1.0) -> float:
    """MiB left for the pack in a lent machine's working tree: the limit less the tree's other files and `.whl`."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], capture_output=True,
                            text=True, check=True).stdout.split("\n")
    files = {Path(f) for f in listed if f and Path(f).is_file()} | set(Path(".whl").glob("*"))
    return limit_mib - spare_mib - sum(f.stat().st_size for f in files) / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="training photos")
    parser.add_argument("--val", type=Path, required=True, help="validation images (the first --val-count)")
    parser.add_argument("-o", "--out", type=Path, default=Path(".gpu-data"))
    parser.add_argument("--every", type=int, default=2, help="keep every n-th training photo (2)")
    parser.add_argument("--short-side", type=int, default=320)
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (90)")
    parser.add_argument("--val-count", type=int, default=6)
    parser.add_argument("--budget-mib", type=float, help="the most the pack may take (default: travel_budget)")
    args = parser.parse_args()
    budget = args.budget_mib if args.budget_mib is not None else travel_budget()
    size = pack(args.data, args.val, args.out, args.every, args.short_side, args.quality, args.val_count)
    photos = len(list_images(args.out / "train"))
    print(f"{args.out}: {photos} training photos ({args.short_side} px, JPEG q{args.quality}), "
          f"{len(list_images(args.out / 'kodak'))} validation images, {size / 2**20:.1f} MiB")
    if size > budget * 2**20:
        print(f"error: over the {budget:.1f} MiB budget: raise --every or lower --quality", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
