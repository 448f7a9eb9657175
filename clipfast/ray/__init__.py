"""Past one machine: Ray Data for bulk embedding and Ray Serve for online embedding.

Needs the extra: ``pip install 'clipfast[ray]'``. Names are imported lazily so that
``import clipfast.ray`` names the missing extra instead of failing deep inside Ray.
"""

from __future__ import annotations

from clipfast.types import lazy_exports

# name -> module that defines it (clipfast.ray.data: Ray Data; clipfast.ray.serve: Ray Serve)
_EXPORTS: dict[str, str] = {
    "EmbedBatch": "clipfast.ray.data",
    "run_ray_batches": "clipfast.ray.data",
    "ClipfastDeployment": "clipfast.ray.serve",
    "build_app": "clipfast.ray.serve",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports("clipfast.ray", _EXPORTS, needs=("ray", "ray"))
