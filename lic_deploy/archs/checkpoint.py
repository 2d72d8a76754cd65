"""Checkpoints in every form CompressAI users have, plus lic-deploy's own.

Accepted: a raw state dict; CompressAI's training-script dict `{"state_dict": ...}`; either with `module.`
prefixes (DataParallel); lic-deploy checkpoints (`{"lic_deploy": 1, "arch", "config", "state_dict",
"metadata", ...}`); and `.safetensors` files whose metadata may carry `arch`/`config`. Always loaded with
`torch.load(weights_only=True)`: a checkpoint can never run code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lic_deploy.archs.registry import get_adapter, infer_arch
from lic_deploy.atomic import atomic_path
from lic_deploy.errors import CheckpointError
from lic_deploy.runtime.package import file_sha256

FORMAT_KEY = "lic_deploy"
FORMAT_VERSION = 1
# Buffers CompressAI recomputes in `update()`: their absence or shape is never an error.
_DERIVED = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")


@dataclass
class LoadedModel:
    """A model ready for export, with where it came from."""

    model: Any
    arch: str
    config: dict[str, int]
    path: Path
    sha256: str
    metadata: dict[str, Any] = field(default_factory=dict)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state dict (prefixes stripped) and the metadata dict (arch, config, ...; may be empty)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):  # torch.save: a zip, or (legacy) a pickle
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (torch.save writes a zip archive or a pickle; this "
                              "file is neither)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for non-checkpoints; all mean "not loadable"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a loadable PyTorch checkpoint ({first[:160]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    meta: dict[str, Any] = {}
    if FORMAT_KEY in obj:
        meta = {"arch": obj.get("arch"), "config": obj.get("config"), **dict(obj.get("metadata") or {})}
        obj = obj.get("state_dict")
    elif "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: no state dict found in the checkpoint")
    return _clean(obj, path), meta


def _read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    meta: dict[str, Any] = {}
    for key, value in raw_meta.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    return _clean(state, path), meta


def _clean(state: dict[str, Any], path: Path) -> dict[str, Any]:
    import torch

    out = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is not a tensor; not a model state dict")
        out[key.removeprefix("module.")] = value
    return out


def load_model(path: str | os.PathLike, arch: str | None = None) -> LoadedModel:
    """Build the architecture (given, from metadata, or inferred from keys) and load the weights into it."""
    state, meta = read_checkpoint(path)
    name = arch or meta.get("arch")
    if name:
        adapter = get_adapter(str(name))
        config = adapter.config_from_state_dict(state)
        if config is None:
            raise CheckpointError(f"{path}: the checkpoint keys do not match architecture {name!r}")
    else:
        name, config = infer_arch(state)
        adapter = get_adapter(name)
    model = adapter.build(config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(_DERIVED)]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        k for k in state
        if k in expected and not k.endswith(_DERIVED) and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong))
                 if keys]
        raise CheckpointError(f"{path}: keys do not match {name} {config} ({'; '.join(parts)})")
    import torch

    # torch's own loader, not CompressAI's (which insists on the derived buffers); `update()` rebuilds those.
    weights = {k: v for k, v in state.items() if not k.endswith(_DERIVED)}
    bad = next((k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise CheckpointError(f"{path}: tensor {bad} holds NaN or infinite values (did training diverge?); "
                              "the model cannot be used")
    torch.nn.Module.load_state_dict(model, weights, strict=False)
    model.eval()
    return LoadedModel(model, name, config, Path(path), file_sha256(Path(path)), meta)


def to_cpu(obj: Any) -> Any:
    """`obj` with every tensor inside (dicts, lists, tuples) on the CPU: checkpoints written on a GPU load anywhere."""
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save_checkpoint(path: str | os.PathLike, model: Any, arch: str, config: dict[str, int],
                    metadata: dict[str, Any] | None = None, **extra: Any) -> None:
    """Write a lic-deploy checkpoint atomically (temporary file, then rename). `extra` holds optimizer states."""
    import torch

    path = Path(path)
    obj = {FORMAT_KEY: FORMAT_VERSION, "arch": arch, "config": dict(config),
           "state_dict": to_cpu(model.state_dict()), "metadata": dict(metadata or {}), **to_cpu(extra)}
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
