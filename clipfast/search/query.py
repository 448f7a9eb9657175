"""Queries: a text or an image embedded by the Engine of the index's artifact, then searched."""

from __future__ import annotations

from typing import Any

import numpy as np

from clipfast.errors import InputError
from clipfast.search.index import Hit, SearchIndex


def embed_query(engine: Any, *, text: str | None = None, image: Any = None) -> np.ndarray:
    """One normalised query embedding (1, D): ``text`` through the text tower, or ``image``
    (a path, bytes, PIL image or uint8 array) through the image tower; exactly one of them."""
    if (text is None) == (image is None):
        raise InputError("a query is a text or an image (exactly one)")
    if text is not None:
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"query text {text!r}: expected a non-empty string")
        return engine.encode_texts([text])
    return engine.encode_images([image])


def search(index: SearchIndex, engine: Any, *, text: str | None = None, image: Any = None,
           k: int = 10) -> list[Hit]:
    """Top-``k`` hits for a text or image query; refuses an Engine of another artifact."""
    index.check_artifact(engine)
    return index.search(embed_query(engine, text=text, image=image), k)[0]
