"""Reading the JSON documents the bench tools take as input (results files, training logs) without surprises."""

from __future__ import annotations

import os
from pathlib import Path

from lic_deploy.errors import DataError

MAX_BYTES = 256 << 20  # results files and training logs are kilobytes to megabytes


def read_text(path: str | os.PathLike, what: str) -> str:
    """The text of `path`, a regular file of at most MAX_BYTES; DataError naming `what` it should be otherwise
    (a folder, a FIFO or device, which could block or never end, a file too large, bytes that are not UTF-8)."""
    p = Path(path)
    try:
        if not p.is_file():
            raise DataError(f"{path}: not a regular file ({what} expected)")
        if p.stat().st_size > MAX_BYTES:
            raise DataError(f"{path}: {p.stat().st_size} bytes is too large for {what} (at most {MAX_BYTES})")
        return p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read {what} ({exc})") from None
