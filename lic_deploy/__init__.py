"""lic-deploy: learned image codecs as deployable packages.

The runtime (this module's `encode`, `decode`, `Codec`) needs only numpy, ONNX Runtime, Pillow and the entropy
coder; the factory (training, export) imports torch and CompressAI lazily, only when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from lic_deploy.runtime.codec import Codec

__all__ = ["Codec", "__version__", "decode", "encode"]


def __getattr__(name: str) -> Any:
    if name == "Codec":
        from lic_deploy.runtime.codec import Codec

        return Codec
    if name in ("encode", "decode"):
        from lic_deploy.runtime import codec

        return getattr(codec, name)
    raise AttributeError(name)
