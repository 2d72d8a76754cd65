"""Writing a file atomically: into a temporary file beside it, renamed over it once complete, so that a failure or
an interruption leaves the old file (or none), never a partial one."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path in `path`'s folder to write instead of `path`: renamed over `path` when the block ends
    without error, removed otherwise. Short-named (`path`'s own name may be at the file system's limit), ending in
    `path`'s suffix (for writers that take the format from it), and not created here, so the writer gives it the
    usual permissions."""
    path = Path(path)
    tmp = path.with_name(f".lic-{secrets.token_hex(6)}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """`data` to `path` atomically (`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
