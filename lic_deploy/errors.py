"""Error types. Every error a user can cause is a `LicError`; the CLI prints it as one line and exits 2."""


class LicError(Exception):
    """Base class for user-facing errors (bad input, missing files, unavailable backends)."""


class CheckpointError(LicError):
    """A checkpoint cannot be read or does not match an architecture."""


class PackageError(LicError):
    """A codec package is missing, incomplete, corrupt or from an unsupported schema."""


class DataError(LicError):
    """An image or an image folder cannot be used."""


class BitstreamError(LicError):
    """A `.lic` stream is malformed, truncated, corrupt or belongs to another package."""


class BackendUnavailable(LicError):
    """A requested engine (TensorRT, CUDA, torch) is not installed or has no device."""
