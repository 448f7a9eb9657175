"""Past one machine: Ray Data for bulk embedding and Ray Serve for online embedding.

Needs the extra: ``pip install 'clipfast[ray]'``. Names are imported lazily so that
``import clipfast.ray`` names the missing extra instead of failing deep inside Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> module that defines it (clipfast.ray.data: Ray Data; clipfast.ray.serve: Ray Serve)
_EXPORTS: dict[str, str] = {
    "EmbedBatch": "clipfast.ray.data",
    "run_ray_batches": "clipfast.ray.data",
    "ClipfastDeployment": "clipfast.ray.serve",
    "build_app": "clipfast.ray.serve",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clipfast.ray' has no attribute {name!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as e:
        if (e.name or "").split(".")[0] != "ray":
            raise
        raise ImportError(
            f"clipfast.ray.{name} needs Ray: pip install 'clipfast[ray]' ({e})"
        ) from e


def __dir__() -> list[str]:
    return sorted(_EXPORTS)
