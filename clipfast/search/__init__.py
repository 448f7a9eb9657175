"""Visual search over ``clipfast embed`` output: ``clipfast index`` (FAISS), ``clipfast search``,
and ``POST /v1/search`` with a search page on ``clipfast serve --index``.

Names are imported lazily so that ``clipfast --help`` pulls in neither faiss nor pyarrow.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "IndexOptions": "clipfast.search.index",
    "SearchIndex": "clipfast.search.index",
    "build_index": "clipfast.search.index",
    "embed_query": "clipfast.search.query",
    "search": "clipfast.search.query",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clipfast.search' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
