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
MAX_NUMBER_DIGITS = 32  # no field of a request needs more (int64 has 19 digits)
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


def _scan_json(body: bytes) -> tuple[int, bool]:
    """(commas and opening brackets outside strings, whether a run of more than
    ``MAX_NUMBER_DIGITS`` digits lies outside strings) of a JSON body.

    Hand-written rather than a regex over the whole body: each step is one bytes call over at
    most ``_SLICE`` bytes (or one Python step per quote), so the event loop's thread gets the
    GIL back between steps; a single regex call over 32 MB held it for up to seconds."""
    values, long_run, inside, carry = 0, False, False, False
    run = b"0" * (MAX_NUMBER_DIGITS + 1)
    pos, n = 0, len(body)
    while pos < n:
        stop = min(n, pos + _SLICE)
        q = body.find(b'"', pos, stop)
        end = stop if q < 0 else q
        if not inside:
            values += (body.count(b",", pos, end) + body.count(b"[", pos, end)
                       + body.count(b"{", pos, end))
            if not long_run:
                # A digit run may continue across a slice boundary: keep the previous tail.
                lo = max(0, pos - MAX_NUMBER_DIGITS) if carry else pos
                long_run = run in body[lo:end].translate(_DIGITS)
        if q < 0:
            carry = not inside
            pos = stop
            continue
        carry = False
        if inside and _backslashes_before(body, q) % 2:
            pos = q + 1  # an escaped quote: still inside the string
            continue
        inside = not inside
        pos = q + 1
    return values, long_run


def _backslashes_before(body: bytes, q: int) -> int:
    """How many backslashes end ``body[:q]``: by windows growing from 64 bytes to ``_SLICE``,
    one bytes call each (most quotes have none or one before them)."""
    k, width = 0, 64
    while True:
        lo = max(0, q - k - width)
        seg = body[lo:q - k]
        stripped = len(seg) - len(seg.rstrip(b"\\"))
        k += stripped
        if stripped < len(seg) or lo == 0:
            return k
        width = min(_SLICE, width * 2)


def check_json(body: bytes, max_values: int) -> None:
    """Refuse a JSON body before parsing it when it holds more than ``max_values`` values
    (arrays, objects and elements, counted from the brackets and commas outside strings:
    the parsed objects of a body of tiny values take many times its bytes) or a number longer
    than ``MAX_NUMBER_DIGITS`` digits. Strings are never looked into."""
    values, long_run = _scan_json(body)
    if values > max_values:
        raise LimitExceeded(f"the JSON body holds about {values} values (arrays, objects and "
                            f"their elements), more than the {max_values} this server's limits "
                            "allow (--max-items, --max-labels)", limit="max_json_values",
                            status=413)
    if long_run:
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
    """Encoded bytes of a request's item ``index`` -> float32 ``(3, H, W)``, exactly the row
    ``Engine.encode_images`` would feed the tower, or the item's Failure (over the pixel limit,
    or not decodable) naming ``index``. Runs in a decode thread.

    The Engine loads and preprocesses the item at its request position (``offset``), so its
    Failure carries the request's index and says it: nothing is relabelled afterwards."""
    over = check_pixels(data, index, max_pixels)
    if over is not None:
        return over
    prepare = getattr(engine, "prepare_images", None)
    if prepare is not None:  # the Engine's public input pipeline, where it has one
        pixels, _, failures = prepare([data], offset=index)
    else:  # the same policy and preprocessing, at position ``index``
        pixels, _, failures = engine._pixels([data], index, "skip")
    if failures:
        return failures[0]
    return pixels[0]


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
