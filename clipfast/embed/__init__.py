"""Bulk embedding (``clipfast embed``): folders, list files, webdataset tar shards and tables
streamed through an Engine into resumable parquet shards.

Names are imported lazily so that ``clipfast.embed.cli`` (imported by ``clipfast --help``)
pulls in neither pyarrow nor the runtime.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EmbedInterrupted": "clipfast.embed.job",
    "EmbedOptions": "clipfast.embed.job",
    "EmbedSummary": "clipfast.embed.job",
    "run_embed": "clipfast.embed.job",
    "Embeddings": "clipfast.embed.output",
    "read_embeddings": "clipfast.embed.output",
    "read_failures": "clipfast.embed.output",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clipfast.embed' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
