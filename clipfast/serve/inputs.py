"""Request inputs to what the towers take, with the server's limits; no web framework here.

Images arrive inline only, following infinity's convention for ``/v1/embeddings``: a
``data:image/<type>;base64,<data>`` URL (or bare base64) per item. URLs are never fetched.
A limit breach fails the whole request (``LimitExceeded``: 413 or 422 naming the limit);
an image that cannot be decoded fails only its own item (``Failure``).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import TYPE_CHECKING, Any

import numpy as np

from clipfast.errors import InputError
from clipfast.types import Failure

if TYPE_CHECKING:
    from clipfast.engine import Engine

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,",
                       re.IGNORECASE)
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


class LimitExceeded(InputError):
    """A request over one of the server's limits; ``status`` is 413 or 422, ``limit`` its name
    (the ``clipfast serve`` flag)."""

    def __init__(self, message: str, *, limit: str, status: int):
        super().__init__(message)
        self.limit = limit
        self.status = status


class BadItem(InputError):
    """One item of a request that cannot be used (its index in ``index``)."""


def check_items(n: int, max_items: int, what: str = "input") -> None:
    if n < 1:
        raise InputError(f"{what}: at least one item is needed")
    if n > max_items:
        raise LimitExceeded(f"{what}: {n} items, more than the limit of {max_items} per request "
                            "(--max-items); split the request", limit="max_items", status=413)


def decode_inline(item: Any, index: int) -> bytes:
    """An inline image (data URL or bare base64 string) -> its encoded bytes; BadItem otherwise.
    URLs of any other scheme are refused, never fetched."""
    if not isinstance(item, str):
        raise BadItem(f"image {index}: expected a base64 string or a data: URL, got "
                      f"{type(item).__name__}", index=index, item=type(item).__name__)
    text = item.strip()
    match = _DATA_URL.match(text)
    if match:
        mime = (match.group("mime") or "").lower()
        if mime and not mime.startswith("image/") and mime != "application/octet-stream":
            raise BadItem(f"image {index}: data URL of type {mime!r}, expected image/*",
                          index=index, item=f"data:{mime}")
        text = text[match.end():]
    elif text[:5].lower() == "data:":
        raise BadItem(f"image {index}: a data URL must be base64 (data:image/...;base64,...)",
                      index=index, item=text[:40])
    elif _SCHEME.match(text):
        raise BadItem(f"image {index}: URLs are not fetched ({text[:60]!r}); send the image "
                      "inline as a data:image/...;base64 URL or a multipart upload",
                      index=index, item=text[:60])
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadItem(f"image {index}: invalid base64 ({e})", index=index,
                      item=f"<{len(text)} characters>") from e
    if not data:
        raise BadItem(f"image {index}: empty image data", index=index, item="<0 bytes>")
    return data


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the image header without decoding the pixels; None if Pillow
    cannot identify the data (the full decode then reports why)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:
        return None


def check_pixels(data: bytes, index: int, max_pixels: int) -> None:
    size = image_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        raise LimitExceeded(
            f"image {index}: {size[0]}x{size[1]} = {size[0] * size[1]} pixels, more than the "
            f"limit of {max_pixels} (--max-image-pixels); downscale it first",
            limit="max_image_pixels", status=422)


def preprocess_one(engine: Engine, data: bytes, index: int, max_pixels: int
                   ) -> np.ndarray | Failure:
    """Encoded bytes -> float32 ``(3, H, W)``, exactly the row ``Engine.encode_images`` would feed
    the tower, or the item's Failure. Runs in a decode thread. LimitExceeded propagates."""
    check_pixels(data, index, max_pixels)
    result = engine.preprocess([data], errors="skip")
    if result.failures:
        f = result.failures[0]
        return Failure(index, f.item, f.error.replace("image 0 ", f"image {index} ", 1))
    return result.embeddings[0]


def token_rows(tokens: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """``{name: (N, L)}`` -> N rows ``{name: (L,)}`` (the batcher regroups them)."""
    n = len(next(iter(tokens.values())))
    return [{k: v[i] for k, v in tokens.items()} for i in range(n)]


def token_count(tokens: dict[str, np.ndarray], pad_id: int) -> int:
    """Non-padding tokens, for the ``usage`` field."""
    mask = tokens.get("attention_mask")
    if mask is not None:
        return int(np.count_nonzero(mask))
    ids = tokens.get("input_ids", next(iter(tokens.values())))
    return int(np.count_nonzero(ids != pad_id))
