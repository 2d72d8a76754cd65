"""How much memory decoding an image takes, and the check that refuses a decode this machine cannot hold.

Decoding costs memory in proportion to the image's pixels, whatever the stream's length: a flat 1024 x 1024
image is a 7 KB mbt2018-mean stream and 1.2 GB of decoding (the synthesis transform's activations and its
transposed convolutions' column buffers, at a few hundred to a few thousand bytes per pixel). A stream from an
untrusted source can claim any size up to the pixel cap, so before anything image-sized is allocated the decoder
compares its estimate with the memory available and refuses with one line instead of being killed for memory.

The estimate is the package's `footprint` (bytes = base + bytes_per_pixel x padded pixels), measured by
`lic-deploy export` (`measure_footprint`: a 1024 x 1024 decode in a fresh process, its peak resident memory, 25 %
added), or for packages without one `DEFAULT_FOOTPRINT`, a little above the largest measured so far. It covers the
CPU engines (ONNX Runtime, PyTorch on the CPU); a GPU engine's memory is not checked.

    python -m lic_deploy.runtime.memory PKG STREAM.lic   # peak resident bytes of decoding one stream (a probe)
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lic_deploy.errors import DataError, PackageError

MARGIN = 1.25
PROBE_SIZE = 1024  # pixels a side of the probe image
# measured footprints (session 13): mbt2018-mean N=128/M=192 1580 bytes per pixel, TCM-small 1552, ELIC 545
DEFAULT_FOOTPRINT = {"base_bytes": 0, "bytes_per_pixel": 1600}


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None


def available_bytes(root: Path = Path("/")) -> int | None:
    """Memory this process can still take, in bytes: the least of the kernel's MemAvailable and what the cgroup
    (v2 or v1) leaves under its limit; None where none of them can be read. (`root`: where /proc and /sys are.)"""
    found = []
    try:
        for line in (root / "proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    cgroup = root / "sys/fs/cgroup"
    for limit, used in (("memory.max", "memory.current"),  # cgroup v2, then v1
                        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        cap, now = _read_int(cgroup / limit), _read_int(cgroup / used)
        if cap is not None and now is not None and cap < 1 << 60:  # "max" or a page-rounded 2^63: no limit
            found.append(max(cap - now, 0))
    return min(found) if found else None


def decode_bytes(footprint: dict[str, Any] | None, pixels: int) -> int:
    """Estimated peak bytes of decoding `pixels` (padded height x width) with a package of this footprint."""
    fp = footprint or DEFAULT_FOOTPRINT
    return int(fp["base_bytes"]) + int(fp["bytes_per_pixel"]) * pixels


def check_decode(footprint: dict[str, Any] | None, height: int, width: int, available: int | None = None) -> None:
    """DataError when decoding a padded `height` x `width` image needs more memory than is available (None: ask
    the system; no check where it cannot say)."""
    available = available_bytes() if available is None else available
    need = decode_bytes(footprint, height * width)
    if available is not None and need > available:
        source = "this package's measured footprint" if footprint else "an estimate for packages without a footprint"
        raise DataError(f"decoding a {width}x{height} image needs about {need / 2**30:.1f} GiB ({source}), more "
                        f"than the {available / 2**30:.1f} GiB of memory available: decode it where there is more "
                        "memory, or lower the pixel cap (--max-pixels) to refuse such streams sooner")


def peak_resident_bytes() -> int:
    """This process's peak resident memory: Linux's VmHWM, which starts afresh at exec (ru_maxrss keeps the
    forking parent's size across it, so a probe started from a large process would report that process), else
    ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource  # (Unix only: imported here so that the codec imports on any system)

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kilobytes elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _probe(package: Path, stream: Path) -> int:
    """Peak resident bytes of a fresh process that opens `package` and decodes `stream`."""
    run = subprocess.run([sys.executable, "-m", "lic_deploy.runtime.memory", str(package), str(stream)],
                         capture_output=True, text=True, check=False)
    if run.returncode:
        why = ((run.stderr or run.stdout).strip().splitlines() or ["no output"])[-1]
        raise PackageError(f"{package}: measuring the decode memory footprint failed ({why}); export with "
                           "--no-footprint to skip it")
    return int(run.stdout.split()[-1])


def measure_footprint(package: str | os.PathLike) -> dict[str, int]:
    """A package's decode footprint: a flat two-tone `PROBE_SIZE`-pixel square encoded here and decoded in a fresh
    process, whose peak resident memory (the interpreter and libraries included) per padded pixel, 25 %
    added, is the estimate's bytes per pixel (no base: conservative for large images, where it matters; a fit of
    two smaller probes missed most of ELIC's per-pixel cost, which shows only above 512 x 512)."""
    from lic_deploy.runtime.codec import Codec

    codec = Codec(package, threads=1, check_memory=False)
    image = np.full((3, PROBE_SIZE, PROBE_SIZE), 0.5, dtype=np.float32)
    image[:, : PROBE_SIZE // 2] = 0.25
    padded = codec.package.pad(image)[0]
    with tempfile.TemporaryDirectory() as tmp:
        stream = Path(tmp) / "probe.lic"
        stream.write_bytes(codec.encode_array(image)[0])
        peak = _probe(Path(package), stream)
    return {"base_bytes": 0, "bytes_per_pixel": math.ceil(MARGIN * peak / (padded.shape[1] * padded.shape[2])),
            "probe_size": PROBE_SIZE}


def main(argv: list[str] | None = None) -> int:
    from lic_deploy.runtime.codec import Codec

    package, stream = argv or sys.argv[1:]
    codec = Codec(package, threads=1, check_memory=False)
    codec.decode(Path(stream).read_bytes())
    print(peak_resident_bytes())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
