"""Bulk embedding (``clipfast embed``): folders, list files, webdataset tar shards and tables
streamed through an Engine into resumable parquet shards.

Names are imported lazily so that ``clipfast.embed.cli`` (imported by ``clipfast --help``)
pulls in neither pyarrow nor the runtime.
"""

from __future__ import annotations

from clipfast.types import lazy_exports

_EXPORTS: dict[str, str] = {
    "EmbedInterrupted": "clipfast.embed.job",
    "EmbedOptions": "clipfast.embed.job",
    "EmbedSummary": "clipfast.embed.job",
    "run_embed": "clipfast.embed.job",
    "Embeddings": "clipfast.embed.output",
    "read_embeddings": "clipfast.embed.output",
    "read_failures": "clipfast.embed.output",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports("clipfast.embed", _EXPORTS)
