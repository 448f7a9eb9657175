"""Where an artifact's local caches live: one rule for every kind (the *purpose*: TensorRT
engines, ONNX Runtime's TensorRT provider caches).

- ``<artifact>/<purpose>`` when the artifact directory is writable: the cache stays with the
  artifact and goes away with it.
- otherwise ``<root>/<artifact digest>/<purpose>``, root being ``$CLIPFAST_CACHE_DIR`` (default
  ``~/.cache/clipfast``, see clipfast.settings). The digest (``clipfast.artifact.manifest.
  artifact_digest``: 16 hex digits of the files' checksums) changes with a re-export, so a cache
  of an older export is never picked up, and copies of one artifact share one cache.

Everything inside a cache is keyed by what it depends on (TensorRT version, GPU, profile, graph
checksum) by its owner; this module only decides the folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from clipfast import settings
from clipfast.artifact.manifest import artifact_digest
from clipfast.errors import ClipfastError


def writable_dir(path: Path) -> bool:
    """Whether files can be created in ``path`` (created, with its parents, if missing)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def shared_cache_dir(manifest, purpose: str) -> Path:
    """``<root>/<artifact digest>/<purpose>``: the cache outside the artifact (not created)."""
    return Path(settings.CLIPFAST_CACHE_DIR) / artifact_digest(manifest) / purpose


def artifact_cache_dir(manifest, purpose: str) -> Path:
    """The folder for ``purpose``'s cache of this artifact, created: ``<artifact>/<purpose>`` when
    that can be written, else ``<root>/<artifact digest>/<purpose>`` (module docstring).

    Raises ClipfastError naming both places when neither can be written.
    """
    if not purpose or Path(purpose).name != purpose or purpose in (".", ".."):
        raise ValueError(f"cache purpose {purpose!r}: expected one folder name")
    artifact = Path(manifest.directory)
    inside = artifact / purpose
    if inside.is_dir() and os.access(inside, os.W_OK | os.X_OK):
        return inside
    if not inside.exists() and os.access(artifact, os.W_OK | os.X_OK) and writable_dir(inside):
        return inside
    shared = shared_cache_dir(manifest, purpose)
    if not writable_dir(shared):
        raise ClipfastError(f"no writable {purpose} cache: {inside} and {shared} cannot be "
                            "written; set CLIPFAST_CACHE_DIR to a writable directory")
    return shared


__all__ = ["artifact_cache_dir", "shared_cache_dir", "writable_dir"]
