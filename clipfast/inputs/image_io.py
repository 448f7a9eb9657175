"""Image loading: any supported input (path, bytes, file object, PIL image, uint8 array) to an
RGB PIL image, as the model's reference transform expects it, with the loading policy stated in
the README ("Image loading policy"): EXIF orientation, transparency composited over a
background, palette / CMYK / 16-bit / float conversions, regular files only, a read limit, and
the decompression-bomb pixel limit, all without touching process-wide state (warning filters).
Every per-item fault becomes an ImageLoadError naming the item's index.
"""

from __future__ import annotations

import io
import os
import re
import stat
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from clipfast.errors import ImageLoadError, InputError

EXIF_ORIENTATION = 0x0112  # the EXIF tag Pillow's exif_transpose reads

# The most bytes read from one path or file object (an encoded image). Larger files are refused
# before they are read (a path) or as soon as the limit is passed (a file object), so a huge
# file or an endless stream cannot exhaust memory. Change it here, per Engine
# (``max_image_bytes=``) or per call (``load_image(max_bytes=...)``); None reads without a limit.
MAX_IMAGE_BYTES: int | None = 256 * 1024 * 1024

_READ_CHUNK = 1 << 20

# (stored width, stored height) -> the smallest (width, height) wanted from a JPEG decode, or None
DraftFn = Callable[[tuple[int, int]], "tuple[int, int] | None"]



def _describe(item: Any) -> str:
    """Short printable description of an input for error messages; never raises."""
    try:
        if isinstance(item, (str, os.PathLike)):
            path = os.fspath(item)
            text = path if isinstance(path, str) else os.fsdecode(path)
            if not text:
                return "'' (empty path)"
            if not text.isprintable():
                text = repr(text)
            return text if len(text) <= 200 else f"{text[:100]}...{text[-97:]}"
        if isinstance(item, (bytes, bytearray, memoryview)):
            return f"<{type(item).__name__} of {len(item)} bytes>"
        if isinstance(item, np.ndarray):
            return f"<numpy array shape {item.shape} dtype {item.dtype}>"
        if isinstance(item, Image.Image):
            return f"<PIL image mode {item.mode} size {item.size[0]}x{item.size[1]}>"
        if _is_stream(item):
            name = getattr(item, "name", None)
            return f"<file object {name!r}>" if isinstance(name, str) else (
                f"<file object {type(item).__qualname__}>")
    except Exception:  # an exotic object (a PathLike whose __fspath__ fails, ...)
        pass
    return f"<{type(item).__module__}.{type(item).__qualname__}>"


def image_error(problem: str, index: int | None, item: Any) -> ImageLoadError:
    desc = _describe(item)
    where = f"image {index} ({desc})" if index is not None else f"image {desc}"
    return ImageLoadError(f"{where}: {problem}", index=index, item=desc)


def item_failure(exc: BaseException, index: int | None, item: Any) -> ImageLoadError:
    """An ImageLoadError naming ``item`` for a fault that is not an InputError (raise it
    ``from exc``)."""
    return image_error(f"preprocessing failed ({type(exc).__name__}: {exc})", index, item)


def _is_stream(item: Any) -> bool:
    return callable(getattr(item, "read", None)) and not isinstance(
        item, (str, bytes, bytearray, memoryview, os.PathLike, np.ndarray, Image.Image))


def _bomb_refusal(pixels: int | None) -> str:
    """The decompression-bomb message: one limit, Pillow's ``MAX_IMAGE_PIXELS``."""
    limit = Image.MAX_IMAGE_PIXELS
    has = f"image has {pixels} pixels" if pixels is not None else "image has too many pixels"
    return (
        f"{has}, more than the decompression-bomb limit PIL.Image.MAX_IMAGE_PIXELS = {limit}; "
        "if you trust this input, raise it (PIL.Image.MAX_IMAGE_PIXELS = <pixels>, or None to "
        "disable the check)"
    )


def _limit_hint(limit: int) -> str:
    return (
        f"the limit of {limit} bytes ({limit / 2**20:g} MiB) read per image; if you trust this "
        "input, raise it: clipfast.inputs.image_io.MAX_IMAGE_BYTES = <bytes> (None for no limit), "
        "Engine(..., max_image_bytes=<bytes>) or load_image(..., max_bytes=<bytes>)"
    )


def _resolve_limit(max_bytes: int | None) -> int | None:
    limit = MAX_IMAGE_BYTES if max_bytes is None else max_bytes
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer))
                              or limit < 0):
        raise ValueError(f"max_bytes / MAX_IMAGE_BYTES must be a non-negative int or None, "
                         f"got {limit!r}")
    return None if limit is None else int(limit)


def _read_stream(f: Any, limit: int | None, index: int | None, item: Any) -> bytes:
    """Read a binary file object to its end, refusing it as soon as it passes ``limit``."""
    chunks, total = [], 0
    while True:
        want = _READ_CHUNK if limit is None else min(_READ_CHUNK, limit + 1 - total)
        chunk = f.read(want)
        if chunk is None:
            raise image_error("the file object has no data ready (a non-blocking stream)",
                              index, item)
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise image_error(f"the file object's read() returned {type(chunk).__name__}, not "
                              "bytes: open it in binary mode ('rb')", index, item)
        if not len(chunk):
            return b"".join(chunks)
        chunks.append(bytes(chunk))
        total += len(chunk)
        if limit is not None and total > limit:
            raise image_error(f"more than {limit} bytes to read, above {_limit_hint(limit)}",
                         index, item)


_FILE_KINDS = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
)


def _not_regular(mode: int) -> str | None:
    """Why a file of this ``st_mode`` is not read, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory, not an image file"
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
    return (f"is {kind}, not a regular file; only regular files are read (read it yourself and "
            "pass the bytes)")


def _read_path(path: Any, limit: int | None, index: int | None, item: Any) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; ImageLoadError otherwise.

    The file's type is checked before it is opened (opening a FIFO blocks until a writer
    comes, a device can read forever), and again on the opened descriptor, in case the path
    was replaced in between; the open itself is non-blocking for the same reason.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        hint = " (URLs are not fetched: download the file first)" if "://" in str(path) else ""
        raise image_error(f"file not found{hint}", index, item) from None
    except ValueError as exc:  # embedded NUL
        raise image_error(f"invalid path ({exc})", index, item) from exc
    except OSError as exc:
        raise image_error(f"cannot read file ({exc.strerror or exc})", index, item) from exc
    problem = _not_regular(st.st_mode)
    if problem is not None:
        raise image_error(problem, index, item)
    if limit is not None and st.st_size > limit:
        raise image_error(f"file is {st.st_size} bytes, above {_limit_hint(limit)}", index, item)
    flags = (os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)
             | getattr(os, "O_NOCTTY", 0))
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise image_error(f"cannot read file ({exc.strerror or exc})", index, item) from exc
    try:
        with open(fd, "rb", closefd=True) as f:
            problem = _not_regular(os.fstat(f.fileno()).st_mode)
            if problem is not None:
                raise image_error(problem, index, item)
            return _read_stream(f, limit, index, item)
    except OSError as exc:
        raise image_error(f"cannot read file ({exc.strerror or exc})", index, item) from exc


def read_image_bytes(item: Any, *, index: int | None = None, max_bytes: int | None = None
                     ) -> bytes:
    """The encoded bytes of a path (a regular file) or a binary file object, at most
    ``max_bytes`` (default ``MAX_IMAGE_BYTES``) of them; ImageLoadError naming the item
    otherwise."""
    limit = _resolve_limit(max_bytes)
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        if not path:
            raise image_error("empty path", index, item)
        return _read_path(path, limit, index, item)
    try:
        return _read_stream(item, limit, index, item)
    except InputError:
        raise
    except Exception as exc:
        raise image_error(f"cannot read the file object ({type(exc).__name__}: {exc})", index,
                     item) from exc


_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _decode(data: bytes, index: int | None, item: Any, draft: DraftFn | None = None
            ) -> Image.Image:
    """Open and fully decode encoded image bytes, enforcing the decompression-bomb limit.

    draft: for a JPEG, called with the stored ``(width, height)``; a size it returns is passed to
    Pillow's ``draft`` (DCT-domain downscaling by 1/2, 1/4 or 1/8, keeping each side at least
    that size) before decoding. None (default) decodes at full size."""
    # The pixel limit is checked here on the header's size, before decoding, instead of turning
    # Pillow's DecompressionBombWarning into an error: warning filters are process-wide, and
    # changing them from decode threads is not thread-safe. Image.open itself still raises
    # DecompressionBombError above twice the limit, and warns (through the caller's filters,
    # as Pillow always does) between the limit and twice it, before this refusal.
    try:
        img = Image.open(io.BytesIO(data))
        limit = Image.MAX_IMAGE_PIXELS
        pixels = max(1, img.size[0]) * max(1, img.size[1])
        if limit is not None and pixels > limit:
            raise image_error(_bomb_refusal(pixels), index, item)
        if draft is not None and img.format == "JPEG":
            wanted = draft(img.size)
            if wanted is not None:
                img.draft(None, wanted)
        # Image.open only reads the header: load() decodes everything, so truncated or
        # corrupt data fails here, with the item named, and not later inside a batch.
        img.load()
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = _BOMB_PIXELS.search(str(exc))
        raise image_error(_bomb_refusal(int(found.group(1)) if found else None), index,
                     item) from exc
    except Image.UnidentifiedImageError as exc:
        raise image_error(
            "cannot identify image data (not an image, or a format Pillow cannot read)",
            index,
            item,
        ) from exc
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error...
        raise image_error(
            f"corrupt or truncated image data ({type(exc).__name__}: {exc})", index, item
        ) from exc
    return img


def _from_array(arr: np.ndarray, index: int | None) -> Image.Image:
    if arr.dtype != np.uint8:
        raise image_error(
            f"numpy arrays must be uint8, got dtype {arr.dtype} (scale to 0..255 and cast with "
            ".astype(np.uint8))",
            index,
            arr,
        )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise image_error(
            f"numpy arrays must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape "
            f"{arr.shape}",
            index,
            arr,
        )
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise image_error(f"image is empty (shape {arr.shape})", index, arr)
    return Image.fromarray(np.ascontiguousarray(arr))


def _composite(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if img.mode == "La":  # premultiplied: Pillow converts it to LA only
        img = img.convert("LA")
    rgba = img.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Convert any Pillow mode to RGB following the module's mode policy."""
    mode = img.mode
    if mode == "RGB":
        return img
    bands = img.getbands()
    if "A" in bands or "a" in bands or (mode == "P" and "transparency" in img.info):
        return _composite(img, background)
    if mode in ("L", "P", "CMYK", "YCbCr", "RGBX"):
        return img.convert("RGB")
    if mode == "1":
        return img.convert("L").convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img)
        if mode == "I":
            arr = np.clip(arr, 0, 65535)
        return Image.fromarray((arr.astype(np.uint32) >> 8).astype(np.uint8)).convert("RGB")
    if mode == "F":
        # Truncated like Pillow's own F -> L conversion (what transformers' convert_to_rgb does).
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0)
        arr = np.clip(arr, 0.0, 255.0).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    return img.convert("RGB")


def load_image(
    item: Any,
    *,
    index: int | None = None,
    exif_transpose: bool = True,
    alpha_background: tuple[int, int, int] = (255, 255, 255),
    max_bytes: int | None = None,
    draft: DraftFn | None = None,
) -> Image.Image:
    """Load one image input as a fully decoded PIL image in mode RGB.

    item: a PIL image, a path (str / os.PathLike) to a regular file, a binary file object
        (anything with ``read()``, read from its current position to its end), encoded bytes
        (bytes, bytearray, memoryview) or a uint8 numpy array (H, W), (H, W, 1), (H, W, 3) or
        (H, W, 4).
    index: position in the caller's batch, used in error messages.
    max_bytes: the most bytes read from a path or file object; default ``MAX_IMAGE_BYTES``.
    draft: encoded JPEGs only (path, bytes, file object): given the stored size, the smallest
        size wanted, or None; Pillow's JPEG draft then decodes at 1/2, 1/4 or 1/8 scale (faster,
        not pixel-exact). None (default): full-size decode.
    Raises ImageLoadError naming the item and the problem, whatever the fault. Mode policy:
    module docstring.
    """
    try:
        return _load_image(item, index, exif_transpose, alpha_background, max_bytes, draft)
    except InputError:
        raise
    except Exception as exc:  # a fault nobody foresaw is still this item's fault
        raise image_error(f"could not be loaded ({type(exc).__name__}: {exc})", index,
                          item) from exc


def _load_image(
    item: Any,
    index: int | None,
    exif_transpose: bool,
    alpha_background: tuple[int, int, int],
    max_bytes: int | None,
    draft: DraftFn | None = None,
) -> Image.Image:
    if isinstance(item, Image.Image):
        img = item
        try:
            img.load()
        except Exception as exc:
            raise image_error(
                f"PIL image could not be decoded ({type(exc).__name__}: {exc})", index, item
            ) from exc
    elif isinstance(item, (str, os.PathLike)):
        # Read the bytes up front: no file handle stays open behind a lazily decoded image.
        img = _decode(read_image_bytes(item, index=index, max_bytes=max_bytes), index, item,
                      draft)
    elif isinstance(item, (bytes, bytearray, memoryview)):
        if len(item) == 0:
            raise image_error("empty bytes", index, item)
        img = _decode(bytes(item), index, item, draft)
    elif isinstance(item, np.ndarray):
        img = _from_array(item, index)
    elif _is_stream(item):
        data = read_image_bytes(item, index=index, max_bytes=max_bytes)
        if not data:
            raise image_error("the file object is empty (at its current position)", index, item)
        img = _decode(data, index, item, draft)
    else:
        raise image_error(
            f"unsupported input type {type(item).__name__}; expected a PIL image, a path, a "
            "binary file object, encoded bytes or a uint8 numpy array (H, W[, C])",
            index,
            item,
        )
    if img.size[0] < 1 or img.size[1] < 1:
        raise image_error(f"image is empty ({img.size[0]}x{img.size[1]} pixels)", index, item)

    if exif_transpose and not isinstance(item, np.ndarray):
        try:
            # Checking the tag first avoids exif_transpose's full copy for the usual case.
            if img.getexif().get(EXIF_ORIENTATION, 1) not in (1, None):
                img = ImageOps.exif_transpose(img)
        except Exception as exc:
            raise image_error(
                f"EXIF orientation could not be applied ({type(exc).__name__}: {exc}); pass "
                "exif_transpose=False to use the stored pixel grid",
                index,
                item,
            ) from exc
    try:
        return _to_rgb(img, tuple(int(c) for c in alpha_background))  # type: ignore[arg-type]
    except Exception as exc:
        raise image_error(
            f"cannot convert mode {img.mode} to RGB ({type(exc).__name__}: {exc})", index, item
        ) from exc
