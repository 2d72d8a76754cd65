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


def _kb_field(path: Path, key: str) -> int | None:
    """Bytes of a `key:  N kB` line of a /proc file (meminfo, status); None where the file or line is missing."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _stat(path: Path, key: str) -> int:
    """A counter of a cgroup's memory.stat (0 where absent)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _cgroups(root: Path) -> list[tuple[Path, tuple[str, str, str, str]]]:
    """This process's memory cgroup folders and their ancestors, each with its file names (limit, usage, stat,
    the stat's reclaimable file cache): cgroup v2's unified tree and v1's memory controller, from
    /proc/self/cgroup; the mount roots where that cannot be read (a container's own namespace starts there)."""
    v2 = ("memory.max", "memory.current", "memory.stat", "inactive_file")
    v1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat", "total_inactive_file")
    bases = {"v2": (root / "sys/fs/cgroup", v2), "v1": (root / "sys/fs/cgroup/memory", v1)}
    found = []
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        hierarchy, controllers, path = [*line.split(":", 2), "", ""][:3]
        kind = "v2" if hierarchy == "0" and not controllers else "v1" if "memory" in controllers.split(",") else None
        if kind is not None:
            base, names = bases[kind]
            parts = Path(path.strip().lstrip("/")).parts
            found += [(base.joinpath(*parts[:k]), names) for k in range(len(parts), -1, -1)]
    return found or [bases["v2"], bases["v1"]]


def available_bytes(root: Path = Path("/")) -> int | None:
    """Memory this process can still take, in bytes: the least of the kernel's MemAvailable and what each memory
    cgroup above it (v2 or v1) leaves under its limit, its reclaimable file cache counted as free (as container
    runtimes count it); None where none of them can be read. (`root`: where /proc and /sys are.)"""
    found = [] if (free := _kb_field(root / "proc/meminfo", "MemAvailable")) is None else [free]
    for folder, (limit, usage, stat, cache) in _cgroups(root):
        cap, used = _read_int(folder / limit), _read_int(folder / usage)
        if cap is not None and used is not None and cap < 1 << 60:  # "max" or a page-rounded 2^63: no limit
            found.append(max(cap - max(used - _stat(folder / stat, cache), 0), 0))
    return min(found) if found else None


def resident_bytes() -> int:
    """This process's resident memory now (Linux's VmRSS; 0 where it cannot be read)."""
    return _kb_field(Path("/proc/self/status"), "VmRSS") or 0


def decode_bytes(footprint: dict[str, Any] | None, pixels: int) -> int:
    """Estimated peak bytes of a process decoding `pixels` (padded height x width) with a package of this
    footprint, the interpreter and libraries included."""
    fp = footprint or DEFAULT_FOOTPRINT
    return int(fp["base_bytes"]) + int(fp["bytes_per_pixel"]) * pixels


def check_decode(footprint: dict[str, Any] | None, pixels: int, image: str, *, held: int = 0,
                 available: int | None = None) -> None:
    """DataError when decoding `pixels` (padded) of `image` (its description, for the message) needs more memory
    than is available (None: ask the system; no check where it cannot say). `held`: memory this process already
    holds that the decode reuses (ONNX Runtime's arena keeps what the last decode took; disabling it made decodes
    1.55x slower), so a second stream in a tight container is not refused for the first one's memory."""
    available = available_bytes() if available is None else available
    need = decode_bytes(footprint, pixels)
    if available is not None and need - held > available:
        source = "this package's measured footprint" if footprint else "an estimate for packages without a footprint"
        raise DataError(f"decoding {image} needs about {need / 2**30:.1f} GiB ({source}), more than the "
                        f"{(available + held) / 2**30:.1f} GiB of memory available: decode it where there is more "
                        "memory, or lower the pixel cap (--max-pixels) to refuse such streams sooner")


def peak_resident_bytes() -> int:
    """This process's peak resident memory: Linux's VmHWM, which starts afresh at exec (ru_maxrss keeps the
    forking parent's size across it, so a probe started from a large process would report that process), else
    ru_maxrss."""
    peak = _kb_field(Path("/proc/self/status"), "VmHWM")
    if peak is not None:
        return peak
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
