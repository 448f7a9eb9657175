"""Request inputs to what the towers take, with the server's limits; no web framework here.

Images arrive inline only, following infinity's convention for ``/v1/embeddings``: a
``data:image/<type>;base64,<data>`` URL (or bare base64) per item. URLs are never fetched.
A request-wide limit breach fails the whole request (``LimitExceeded``: 413 or 422 naming the
limit); an image that cannot be decoded, or is over ``--max-image-pixels``, fails only its own
item (``Failure``).

Request bodies are checked before they are parsed (``check_json``): the count of JSON values
and the length of numbers are read from the body with its strings blanked out, so neither a
body of millions of tiny values nor a number of thousands of digits reaches the parser.
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
# A JSON string (escapes included), written as the unrolled loop so that the scan is linear.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
MAX_NUMBER_DIGITS = 32  # no field of a request needs more (int64 has 19 digits)
_LONG_NUMBER = re.compile(rb"[0-9]{%d}" % (MAX_NUMBER_DIGITS + 1))
# bytes.translate table: digits -> "0", everything else -> " " (a C-speed digit-run search).
_DIGITS = bytes(0x30 if 0x30 <= c <= 0x39 else 0x20 for c in range(256))
_SLICE = 1 << 20
TEMPLATE_SLOT = "{}"
MAX_TEMPLATE_CHARS = 1000


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


def check_json(body: bytes, max_values: int) -> None:
    """Refuse a JSON body before parsing it when it holds more than ``max_values`` values
    (arrays, objects and elements, counted from the brackets and commas outside strings:
    the parsed objects of a body of tiny values take many times its bytes) or a number longer
    than ``MAX_NUMBER_DIGITS`` digits. The raw counts come first (C speed, an upper bound);
    only a body they do not clear has its strings blanked out and is counted again."""
    raw, long_run = 0, False
    run = b"0" * (MAX_NUMBER_DIGITS + 1)
    # By slices of 1 MiB: each bytes call holds the GIL, the event loop's thread gets it back
    # between slices.
    for start in range(0, len(body), _SLICE):
        stop = start + _SLICE
        raw += body.count(b",", start, stop) + body.count(b"[", start, stop) + body.count(
            b"{", start, stop)
        if not long_run:
            long_run = run in body[max(0, start - MAX_NUMBER_DIGITS):stop].translate(_DIGITS)
    if raw <= max_values and not long_run:
        return
    skeleton = _JSON_STRING.sub(b'""', body)
    values = skeleton.count(b",") + skeleton.count(b"[") + skeleton.count(b"{")
    if values > max_values:
        raise LimitExceeded(f"the JSON body holds about {values} values (arrays, objects and "
                            f"their elements), more than the {max_values} this server's limits "
                            "allow (--max-items, --max-labels)", limit="max_json_values",
                            status=413)
    if _LONG_NUMBER.search(skeleton):
        raise InputError(f"the JSON body holds a number of more than {MAX_NUMBER_DIGITS} digits")


def check_texts(texts: list[str], max_chars: int, what: str = "input") -> None:
    """Every text at most ``max_chars`` characters (413 naming the first one over)."""
    for i, t in enumerate(texts):
        if len(t) > max_chars:
            raise LimitExceeded(f"{what}[{i}]: {len(t)} characters, more than the limit of "
                                f"{max_chars} per text (--max-text-chars); the model reads only "
                                "its context's first tokens, so send the start of the text",
                                limit="max_text_chars", status=413)


def check_template(template: str) -> None:
    """A classification template is literal text with exactly one ``{}`` where the label
    goes (filled by replacement, never ``str.format``), at most ``MAX_TEMPLATE_CHARS``."""
    if len(template) > MAX_TEMPLATE_CHARS:
        raise LimitExceeded(f"template: {len(template)} characters, more than the limit of "
                            f"{MAX_TEMPLATE_CHARS}", limit="max_template_chars", status=413)
    if (template.count(TEMPLATE_SLOT) != 1 or template.count("{") != 1
            or template.count("}") != 1):
        raise InputError(f"template {template[:80]!r}: expected literal text with exactly one "
                         "'{}' where the label goes, and no other braces (e.g. 'a photo of a "
                         "{}.')")


def fill_template(template: str, label: str) -> str:
    return template.replace(TEMPLATE_SLOT, label, 1)


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


def check_pixels(data: bytes, index: int, max_pixels: int) -> Failure | None:
    """The item's Failure when its header says it has more than ``max_pixels`` pixels."""
    size = image_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        return Failure(index, f"<{size[0]}x{size[1]} image>",
                       f"image {index}: {size[0]}x{size[1]} = {size[0] * size[1]} pixels, more "
                       f"than the limit of {max_pixels} (--max-image-pixels); downscale it first")
    return None


def preprocess_one(engine: Engine, data: bytes, index: int, max_pixels: int
                   ) -> np.ndarray | Failure:
    """Encoded bytes -> float32 ``(3, H, W)``, exactly the row ``Engine.encode_images`` would feed
    the tower, or the item's Failure (over the pixel limit, or not decodable). Runs in a decode
    thread."""
    over = check_pixels(data, index, max_pixels)
    if over is not None:
        return over
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
