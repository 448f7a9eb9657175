"""Visual search over ``clipfast embed`` output: ``clipfast index`` (FAISS), ``clipfast search``,
and ``POST /v1/search`` with a search page on ``clipfast serve --index``.

Names are imported lazily so that ``clipfast --help`` pulls in neither faiss nor pyarrow.
"""

from __future__ import annotations

from clipfast.types import lazy_exports

_EXPORTS: dict[str, str] = {
    "IndexOptions": "clipfast.search.index",
    "SearchIndex": "clipfast.search.index",
    "build_index": "clipfast.search.index",
    "embed_query": "clipfast.search.query",
    "search": "clipfast.search.query",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports("clipfast.search", _EXPORTS)
