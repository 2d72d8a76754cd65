"""The architecture registry: names -> adapters, and recognising an architecture from checkpoint keys."""

from __future__ import annotations

from typing import Any

from lic_deploy.archs.base import Adapter
from lic_deploy.archs.elic import ADAPTERS as ELIC
from lic_deploy.archs.hyperprior import ADAPTERS as HYPERPRIOR
from lic_deploy.archs.tcm import ADAPTERS as TCM
from lic_deploy.errors import CheckpointError

REGISTRY: dict[str, Adapter] = {a.name: a for a in (*HYPERPRIOR, *ELIC, *TCM)}


def get_adapter(name: str) -> Adapter:
    """The adapter called `name`; CheckpointError listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise CheckpointError(f"unknown architecture {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def infer_arch(state_dict: dict[str, Any]) -> tuple[str, dict[str, int]]:
    """Architecture name and config recognised from a state dict's keys and shapes."""
    for name, adapter in REGISTRY.items():
        config = adapter.config_from_state_dict(state_dict)
        if config is not None:
            return name, config
    hint = " (autoregressive context models are not supported)" if any(
        k.startswith("context_prediction.") for k in state_dict
    ) else ""
    raise CheckpointError(
        f"cannot recognise the architecture from the checkpoint keys{hint}; pass --arch "
        f"(known: {', '.join(sorted(REGISTRY))})"
    )
