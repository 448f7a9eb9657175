"""CPU image loading and preprocessing that reproduces the source models' own transforms.

The geometry (resize, center crop / pad) is computed with Pillow exactly as open_clip
(torchvision on PIL images) and transformers' PIL image processors do it, so the uint8 pixels
match the reference pixel for pixel (the one exception, extreme aspect ratios, is described at
``MAX_INTERMEDIATE_PIXELS``); normalization goes through a per-channel 256-entry float32 table
built with the references' own float32 arithmetic. No torch here.

Image mode policy (``load_image``), applied before any resizing:

- EXIF orientation is applied (``ImageOps.exif_transpose``) unless ``exif_transpose=False``
  (as ``transformers.image_utils.load_image`` does when it opens a file; the processors
  themselves, and open_clip's transform, take a PIL image's stored pixel grid as given).
- ``RGB`` passes through; ``L`` is replicated to RGB; ``1`` becomes ``L`` (0 / 255) then RGB.
  A ``transparency`` entry on an ``L`` / ``RGB`` image (PNG tRNS colour key) is ignored.
- Modes with an alpha band (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``) and ``P`` images with a
  ``transparency`` entry are composited over ``alpha_background`` (default white, as
  transformers' ``convert_to_rgb`` does) with ``Image.alpha_composite``.
- ``P`` without transparency goes through its palette to RGB *before* resizing, so palette images
  get the model's filter (Pillow resizes ``P`` and ``1`` images with nearest neighbour only).
  transformers converts before resizing too: for every mode above but the 16-bit ones our
  pixels equal its PIL processors'. open_clip converts *after* resizing (``P`` / ``1`` resized
  with nearest neighbour, ``RGBA`` resized then its alpha dropped), so for those inputs it
  differs from us; for RGB and L inputs the two orders agree (CMYK: within 1 level).
- ``CMYK``, ``YCbCr`` and other colour modes are converted by Pillow (``Image.convert("RGB")``).
- 16-bit modes (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) and ``I`` (treated as 16-bit data,
  clipped to 0..65535) are scaled to 8 bits as ``value >> 8`` (Pillow's own ``convert("L")``,
  hence transformers, clips 16-bit data at 255: a mostly white image); ``F`` is clipped to
  0..255 and truncated, as Pillow converts it (NaN -> 0).
- Animated / multi-frame files: the first frame.
- numpy arrays must be uint8 ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` (RGB) or ``(H, W, 4)``
  (RGBA, composited like above).
- Pillow's decompression-bomb limit ``PIL.Image.MAX_IMAGE_PIXELS`` is enforced strictly: images
  above it are refused (Pillow itself only warns up to twice the limit). The check compares the
  header's size with the limit; it never touches the process's warning filters.
- Paths must name regular files (pipes, devices and sockets are refused before anything is
  read); paths and binary file objects are read up to ``MAX_IMAGE_BYTES`` (``max_bytes=``).
- Empty images (a side of 0 pixels) are refused.
"""

from __future__ import annotations

import functools
import io
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from clipfast.errors import ImageLoadError, InputError

RESIZE_MODES = ("shortest", "squash", "longest")
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
CROP_ROUNDINGS = ("round", "floor")
# Pillow's filter support radii (Resample.c), in source pixels at scale 1.
_FILTER_SUPPORT = {
    "nearest": 0.5,
    "box": 0.5,
    "bilinear": 1.0,
    "hamming": 1.0,
    "bicubic": 2.0,
    "lanczos": 3.0,
}

# An intermediate (resized, not yet cropped) image above this many pixels is produced by
# resizing only the crop window (Pillow's ``box=``) instead of the whole image. This only
# triggers for extreme aspect ratios (a 1 x 20000 strip would otherwise need a 224 x 4.5M
# intermediate); the result can differ from the full resize by rounding (<= 1 uint8 level).
MAX_INTERMEDIATE_PIXELS = 1 << 25

_EXIF_ORIENTATION = 0x0112

# The most bytes read from one path or file object (an encoded image). Larger files are refused
# before they are read (a path) or as soon as the limit is passed (a file object), so a huge
# file or an endless stream cannot exhaust memory. Change it here, per Engine
# (``max_image_bytes=``) or per call (``load_image(max_bytes=...)``); None reads without a limit.
MAX_IMAGE_BYTES: int | None = 256 * 1024 * 1024

_READ_CHUNK = 1 << 20


# --------------------------------------------------------------------------- config


def _pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value), int(value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ValueError(f"preprocess config: {name} must be an int or (height, width), got {value!r}")


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return tuple(float(v) for v in value)  # type: ignore[return-value]
    raise ValueError(f"preprocess config: {name} must be 3 floats, got {value!r}")


@dataclass(frozen=True)
class PreprocessConfig:
    """How one model turns an RGB image into its ``float32 (3, H, W)`` input. Pure data.

    image_size: (H, W) of the tower input.
    resize_mode:
        "shortest": scale so the image covers the target, keeping the aspect ratio. With an int
            ``resize_size`` s the short side becomes s and the long side ``int(s * long / short)``
            (torchvision ``Resize(int)`` / transformers ``shortest_edge``); with an (H, W)
            ``resize_size`` the scale is ``min(h / H, w / W)`` and each side is
            ``round(side / scale)`` (open_clip ``ResizeKeepRatio``, non-square targets).
        "squash": resize to ``resize_size`` (H, W) ignoring the aspect ratio.
        "longest": scale so the image fits inside the (H, W) box ``resize_size``:
            ``round(side / max(h / H, w / W))`` (open_clip ``ResizeKeepRatio(longest=1)``).
    interpolation: Pillow filter name, one of ``INTERPOLATIONS``.
    crop: center crop (padding with ``fill_color`` where the image is smaller) to image_size.
        Without crop the resized size must be image_size ("squash" only).
    crop_rounding: offset of the crop window, per axis with ``d = size - target``:
        "round": torchvision, ``int(round(d / 2))`` (Python rounding, half to even) when cropping,
            ``(-d) // 2`` pixels of padding before the image when padding;
        "floor": transformers, ``d // 2`` (negative means ``ceil(-d / 2)`` pixels of padding).
    fill_color: 0..255, the padding value in every channel.
    rescale, offset, mean, std: ``pixel = ((x * rescale + offset) - mean) / std`` per channel,
        each step rounded to float32 like the references (identity mean 0 / std 1 for ALIGN).
    """

    image_size: tuple[int, int]
    resize_mode: str = "shortest"
    resize_size: int | tuple[int, int] = 224
    interpolation: str = "bicubic"
    crop: bool = True
    crop_rounding: str = "round"
    fill_color: int = 0
    rescale: float = 1.0 / 255.0
    offset: float = 0.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        # Normalise container types so equality and hashing do not depend on list vs tuple.
        object.__setattr__(self, "image_size", _pair(self.image_size, "image_size"))
        if isinstance(self.resize_size, (list, tuple)):
            object.__setattr__(self, "resize_size", _pair(self.resize_size, "resize_size"))
        elif isinstance(self.resize_size, (int, np.integer)) and not isinstance(
            self.resize_size, bool
        ):
            object.__setattr__(self, "resize_size", int(self.resize_size))
        else:
            raise TypeError(
                "preprocess config: resize_size must be an int or (height, width), "
                f"got {self.resize_size!r}"
            )
        object.__setattr__(self, "mean", _triple(self.mean, "mean"))
        object.__setattr__(self, "std", _triple(self.std, "std"))
        object.__setattr__(self, "rescale", float(self.rescale))
        object.__setattr__(self, "offset", float(self.offset))
        object.__setattr__(self, "fill_color", int(self.fill_color))
        object.__setattr__(self, "crop", bool(self.crop))

        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(
                f"preprocess config: unknown resize_mode {self.resize_mode!r}; "
                f"expected one of {list(RESIZE_MODES)}"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"preprocess config: unknown interpolation {self.interpolation!r}; "
                f"expected one of {sorted(INTERPOLATIONS)}"
            )
        if self.crop_rounding not in CROP_ROUNDINGS:
            raise ValueError(
                f"preprocess config: unknown crop_rounding {self.crop_rounding!r}; "
                f"expected one of {list(CROP_ROUNDINGS)}"
            )
        if min(self.image_size) < 1:
            raise ValueError(
                f"preprocess config: image_size must be positive, got {self.image_size}"
            )
        sizes = self.resize_size if isinstance(self.resize_size, tuple) else (self.resize_size,)
        if min(sizes) < 1:
            raise ValueError(
                f"preprocess config: resize_size must be positive, got {self.resize_size}"
            )
        if self.resize_mode == "squash" and not isinstance(self.resize_size, tuple):
            object.__setattr__(self, "resize_size", (self.resize_size, self.resize_size))
        if not self.crop and not (
            self.resize_mode == "squash" and self.resize_size == self.image_size
        ):
            raise ValueError(
                "preprocess config: crop=False needs resize_mode 'squash' with resize_size == "
                f"image_size (got resize_mode {self.resize_mode!r}, resize_size "
                f"{self.resize_size}, image_size {self.image_size})"
            )
        if not 0 <= self.fill_color <= 255:
            raise ValueError(f"preprocess config: fill_color must be 0..255, got {self.fill_color}")
        if any(s == 0.0 for s in self.std):
            raise ValueError(f"preprocess config: std must be non-zero, got {self.std}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists), the manifest's ``preprocess`` section."""
        return {
            "image_size": list(self.image_size),
            "resize_mode": self.resize_mode,
            "resize_size": (
                list(self.resize_size) if isinstance(self.resize_size, tuple) else self.resize_size
            ),
            "interpolation": self.interpolation,
            "crop": self.crop,
            "crop_rounding": self.crop_rounding,
            "fill_color": self.fill_color,
            "rescale": self.rescale,
            "offset": self.offset,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        """Inverse of ``to_dict``; raises ValueError naming unknown keys or values.

        The artifact loader is expected to wrap this in an ArtifactError naming the manifest.
        """
        if not isinstance(d, dict):
            raise TypeError(f"preprocess config: expected a dict, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"preprocess config: unknown keys {unknown}; known keys are {sorted(known)}"
            )
        if "image_size" not in d:
            raise ValueError("preprocess config: missing required key 'image_size'")
        return cls(**d)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(3, H, W) of one preprocessed image."""
        return (3, *self.image_size)


# --------------------------------------------------------------------------- loading


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


def _error(problem: str, index: int | None, item: Any) -> ImageLoadError:
    desc = _describe(item)
    where = f"image {index} ({desc})" if index is not None else f"image {desc}"
    return ImageLoadError(f"{where}: {problem}", index=index, item=desc)


def item_failure(exc: BaseException, index: int | None, item: Any) -> ImageLoadError:
    """An ImageLoadError naming ``item`` for a fault that is not an InputError (raise it
    ``from exc``)."""
    return _error(f"preprocessing failed ({type(exc).__name__}: {exc})", index, item)


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
        "input, raise it: clipfast.preprocess.MAX_IMAGE_BYTES = <bytes> (None for no limit), "
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
            raise _error("the file object has no data ready (a non-blocking stream)", index, item)
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise _error(f"the file object's read() returned {type(chunk).__name__}, not bytes: "
                         "open it in binary mode ('rb')", index, item)
        if not len(chunk):
            return b"".join(chunks)
        chunks.append(bytes(chunk))
        total += len(chunk)
        if limit is not None and total > limit:
            raise _error(f"more than {limit} bytes to read, above {_limit_hint(limit)}",
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
        raise _error(f"file not found{hint}", index, item) from None
    except ValueError as exc:  # embedded NUL
        raise _error(f"invalid path ({exc})", index, item) from exc
    except OSError as exc:
        raise _error(f"cannot read file ({exc.strerror or exc})", index, item) from exc
    problem = _not_regular(st.st_mode)
    if problem is not None:
        raise _error(problem, index, item)
    if limit is not None and st.st_size > limit:
        raise _error(f"file is {st.st_size} bytes, above {_limit_hint(limit)}", index, item)
    flags = (os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)
             | getattr(os, "O_NOCTTY", 0))
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _error(f"cannot read file ({exc.strerror or exc})", index, item) from exc
    try:
        with open(fd, "rb", closefd=True) as f:
            problem = _not_regular(os.fstat(f.fileno()).st_mode)
            if problem is not None:
                raise _error(problem, index, item)
            return _read_stream(f, limit, index, item)
    except OSError as exc:
        raise _error(f"cannot read file ({exc.strerror or exc})", index, item) from exc


def read_image_bytes(item: Any, *, index: int | None = None, max_bytes: int | None = None
                     ) -> bytes:
    """The encoded bytes of a path (a regular file) or a binary file object, at most
    ``max_bytes`` (default ``MAX_IMAGE_BYTES``) of them; ImageLoadError naming the item
    otherwise."""
    limit = _resolve_limit(max_bytes)
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        if not path:
            raise _error("empty path", index, item)
        return _read_path(path, limit, index, item)
    try:
        return _read_stream(item, limit, index, item)
    except InputError:
        raise
    except Exception as exc:
        raise _error(f"cannot read the file object ({type(exc).__name__}: {exc})", index,
                     item) from exc


_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _decode(data: bytes, index: int | None, item: Any) -> Image.Image:
    """Open and fully decode encoded image bytes, enforcing the decompression-bomb limit."""
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
            raise _error(_bomb_refusal(pixels), index, item)
        # Image.open only reads the header: load() decodes everything, so truncated or
        # corrupt data fails here, with the item named, and not later inside a batch.
        img.load()
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = _BOMB_PIXELS.search(str(exc))
        raise _error(_bomb_refusal(int(found.group(1)) if found else None), index,
                     item) from exc
    except Image.UnidentifiedImageError as exc:
        raise _error(
            "cannot identify image data (not an image, or a format Pillow cannot read)",
            index,
            item,
        ) from exc
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error...
        raise _error(
            f"corrupt or truncated image data ({type(exc).__name__}: {exc})", index, item
        ) from exc
    return img


def _from_array(arr: np.ndarray, index: int | None) -> Image.Image:
    if arr.dtype != np.uint8:
        raise _error(
            f"numpy arrays must be uint8, got dtype {arr.dtype} (scale to 0..255 and cast with "
            ".astype(np.uint8))",
            index,
            arr,
        )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise _error(
            f"numpy arrays must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape "
            f"{arr.shape}",
            index,
            arr,
        )
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise _error(f"image is empty (shape {arr.shape})", index, arr)
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
) -> Image.Image:
    """Load one image input as a fully decoded PIL image in mode RGB.

    item: a PIL image, a path (str / os.PathLike) to a regular file, a binary file object
        (anything with ``read()``, read from its current position to its end), encoded bytes
        (bytes, bytearray, memoryview) or a uint8 numpy array (H, W), (H, W, 1), (H, W, 3) or
        (H, W, 4).
    index: position in the caller's batch, used in error messages.
    max_bytes: the most bytes read from a path or file object; default ``MAX_IMAGE_BYTES``.
    Raises ImageLoadError naming the item and the problem, whatever the fault. Mode policy:
    module docstring.
    """
    try:
        return _load_image(item, index, exif_transpose, alpha_background, max_bytes)
    except InputError:
        raise
    except Exception as exc:  # a fault nobody foresaw is still this item's fault
        raise _error(f"could not be loaded ({type(exc).__name__}: {exc})", index, item) from exc


def _load_image(
    item: Any,
    index: int | None,
    exif_transpose: bool,
    alpha_background: tuple[int, int, int],
    max_bytes: int | None,
) -> Image.Image:
    if isinstance(item, Image.Image):
        img = item
        try:
            img.load()
        except Exception as exc:
            raise _error(
                f"PIL image could not be decoded ({type(exc).__name__}: {exc})", index, item
            ) from exc
    elif isinstance(item, (str, os.PathLike)):
        # Read the bytes up front: no file handle stays open behind a lazily decoded image.
        img = _decode(read_image_bytes(item, index=index, max_bytes=max_bytes), index, item)
    elif isinstance(item, (bytes, bytearray, memoryview)):
        if len(item) == 0:
            raise _error("empty bytes", index, item)
        img = _decode(bytes(item), index, item)
    elif isinstance(item, np.ndarray):
        img = _from_array(item, index)
    elif _is_stream(item):
        data = read_image_bytes(item, index=index, max_bytes=max_bytes)
        if not data:
            raise _error("the file object is empty (at its current position)", index, item)
        img = _decode(data, index, item)
    else:
        raise _error(
            f"unsupported input type {type(item).__name__}; expected a PIL image, a path, a "
            "binary file object, encoded bytes or a uint8 numpy array (H, W[, C])",
            index,
            item,
        )
    if img.size[0] < 1 or img.size[1] < 1:
        raise _error(f"image is empty ({img.size[0]}x{img.size[1]} pixels)", index, item)

    if exif_transpose and not isinstance(item, np.ndarray):
        try:
            # Checking the tag first avoids exif_transpose's full copy for the usual case.
            if img.getexif().get(_EXIF_ORIENTATION, 1) not in (1, None):
                img = ImageOps.exif_transpose(img)
        except Exception as exc:
            raise _error(
                f"EXIF orientation could not be applied ({type(exc).__name__}: {exc}); pass "
                "exif_transpose=False to use the stored pixel grid",
                index,
                item,
            ) from exc
    try:
        return _to_rgb(img, tuple(int(c) for c in alpha_background))  # type: ignore[arg-type]
    except Exception as exc:
        raise _error(
            f"cannot convert mode {img.mode} to RGB ({type(exc).__name__}: {exc})", index, item
        ) from exc


# --------------------------------------------------------------------------- geometry


def resized_size(height: int, width: int, cfg: PreprocessConfig) -> tuple[int, int]:
    """(H, W) of the image after the resize step, before crop / pad."""
    mode, size = cfg.resize_mode, cfg.resize_size
    if mode == "squash":
        return size  # type: ignore[return-value]
    if mode == "shortest" and isinstance(size, int):
        # torchvision _compute_resized_output_size == transformers get_resize_output_image_size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size, int(size * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    # open_clip ResizeKeepRatio.get_params, same float expressions (longest is 0. or 1.).
    target_h, target_w = size if isinstance(size, tuple) else (size, size)
    longest = 1.0 if mode == "longest" else 0.0
    ratio_h = height / target_h
    ratio_w = width / target_w
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    # The reference fails on a zero-sized side (a 1 x 2000 strip fitted in 224); keep 1 pixel.
    return max(1, round(height * 1.0 / ratio)), max(1, round(width * 1.0 / ratio))


def crop_offset(size: int, target: int, rounding: str) -> int:
    """Start of the target window in image coordinates (negative: padding before the image)."""
    d = size - target
    if rounding == "floor":
        return d // 2
    # torchvision: pads (target - size) // 2 before, then crops at int(round(d / 2.0)).
    return round(d / 2.0) if d >= 0 else -((-d) // 2)


def _resize_window(
    img: Image.Image, size: tuple[int, int], window: tuple[int, int, int, int], interpolation: str
) -> Image.Image:
    """The ``window`` (x0, y0, x1, y1) of ``img.resize(size)``, computing only that window.

    Pillow resizes in two separable passes, horizontal first, rounding to uint8 in between;
    this does the same passes explicitly. A pass whose output is not restricted is exact; a
    restricted one resizes a crop of the source with a ``box`` in the crop's local coordinates
    (Pillow keeps box coordinates in float32: small local values keep the sample positions
    precise), which can move a pixel by 1 level through coefficient rounding. (A single
    ``resize(box=...)`` call restricting both axes of an RGB image was measured 22 levels off
    with Pillow 13, hence the explicit passes.)
    """
    w, h = img.size
    new_w, new_h = size
    x0, y0, x1, y1 = window
    sx, sy = w / new_w, h / new_h
    resample = INTERPOLATIONS[interpolation]
    support = _FILTER_SUPPORT[interpolation]
    crop_y = (y0, y1) != (0, new_h)
    if crop_y:
        # Rows the vertical pass reads; the horizontal pass is row by row, so this is exact.
        margin = support * max(sy, 1.0) + 2
        ay, by = max(0, int(y0 * sy - margin)), min(h, int(y1 * sy + margin) + 1)
        img = img.crop((0, ay, w, by))
    else:
        ay, by = 0, h
    rows = by - ay
    if (x0, x1) != (0, new_w):
        margin = support * max(sx, 1.0) + 2
        ax, bx = max(0, int(x0 * sx - margin)), min(w, int(x1 * sx + margin) + 1)
        img = img.crop((ax, 0, bx, rows)).resize(
            (x1 - x0, rows), resample=resample, box=(x0 * sx - ax, 0, x1 * sx - ax, rows)
        )
    elif new_w != w:
        img = img.resize((new_w, rows), resample=resample)
    cols = img.size[0]
    if crop_y:
        img = img.resize(
            (cols, y1 - y0), resample=resample, box=(0, y0 * sy - ay, cols, y1 * sy - ay)
        )
    elif new_h != rows:
        img = img.resize((cols, new_h), resample=resample)
    return img


def resize_and_crop(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """Geometry only: RGB PIL image -> uint8 (H, W, 3) at ``cfg.image_size``."""
    if img.mode != "RGB":
        raise ValueError(f"resize_and_crop needs an RGB image, got mode {img.mode}")
    w, h = img.size
    new_h, new_w = resized_size(h, w, cfg)
    out_h, out_w = cfg.image_size
    resample = INTERPOLATIONS[cfg.interpolation]
    top = crop_offset(new_h, out_h, cfg.crop_rounding) if cfg.crop else 0
    left = crop_offset(new_w, out_w, cfg.crop_rounding) if cfg.crop else 0

    if new_h * new_w > MAX_INTERMEDIATE_PIXELS:
        # Compute only the visible window [y0, y1) x [x0, x1) of the intermediate.
        y0, y1 = max(0, top), min(new_h, top + out_h)
        x0, x1 = max(0, left), min(new_w, left + out_w)
        resized = _resize_window(img, (new_w, new_h), (x0, y0, x1, y1), cfg.interpolation)
        top, left = top - y0, left - x0
        new_h, new_w = y1 - y0, x1 - x0
    elif (new_h, new_w) != (h, w):
        resized = img.resize((new_w, new_h), resample=resample, reducing_gap=None)
    else:
        resized = img
    arr = np.asarray(resized)
    if (top, left) == (0, 0) and (new_h, new_w) == (out_h, out_w):
        return arr
    out = np.full((out_h, out_w, 3), cfg.fill_color, dtype=np.uint8)
    # Intersection of the target window [top, top + out_h) with the image [0, new_h).
    sy0, sy1 = max(0, top), min(new_h, top + out_h)
    sx0, sx1 = max(0, left), min(new_w, left + out_w)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - top : sy1 - top, sx0 - left : sx1 - left] = arr[sy0:sy1, sx0:sx1]
    return out


# --------------------------------------------------------------------------- normalization


@functools.lru_cache(maxsize=32)
def _lut(
    rescale: float, offset: float, mean: tuple[float, ...], std: tuple[float, ...]
) -> np.ndarray:
    """float32 (3, 256): the normalized value of every uint8 level, per channel.

    Steps rounded like the references: ``float32(float64(x) * rescale)`` (transformers
    ``rescale``; equal to torchvision's float32 ``x / 255`` because x / 255 is never within
    float64 error of a float32 rounding boundary), then float32 ``+ offset``, ``- mean``,
    ``/ std`` (torchvision ``Normalize`` / transformers ``normalize`` in float32).
    """
    x = (np.arange(256, dtype=np.float64) * rescale).astype(np.float32)
    if offset != 0.0:
        x = x + np.float32(offset)
    m = np.asarray(mean, dtype=np.float32)[:, None]
    s = np.asarray(std, dtype=np.float32)[:, None]
    lut = (x[None, :] - m) / s
    lut.setflags(write=False)
    return lut


def normalize(
    pixels: np.ndarray, cfg: PreprocessConfig, out: np.ndarray | None = None
) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, H, W) with the config's rescale / offset / mean / std."""
    lut = _lut(cfg.rescale, cfg.offset, cfg.mean, cfg.std)
    if out is None:
        out = np.empty((3, pixels.shape[0], pixels.shape[1]), dtype=np.float32)
    for c in range(3):
        np.take(lut[c], pixels[:, :, c], out=out[c], mode="clip")
    return out


def preprocess_image(
    img: Any,
    cfg: PreprocessConfig,
    *,
    index: int | None = None,
    exif_transpose: bool = True,
    alpha_background: tuple[int, int, int] = (255, 255, 255),
    max_bytes: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """One image (anything ``load_image`` accepts) -> float32 (3, H, W).

    Loads it once with the given policy, then resizes, crops and normalises it (into ``out``
    if given). Any failure is an ImageLoadError naming ``index``, chained from the cause.
    """
    rgb = load_image(img, index=index, exif_transpose=exif_transpose,
                     alpha_background=alpha_background, max_bytes=max_bytes)
    try:
        return normalize(resize_and_crop(rgb, cfg), cfg, out=out)
    except Exception as exc:
        raise _error(
            f"cannot resize or normalise it ({type(exc).__name__}: {exc})", index, img
        ) from exc


def preprocess_batch(
    images: Sequence[Any],
    cfg: PreprocessConfig,
    *,
    exif_transpose: bool = True,
    alpha_background: tuple[int, int, int] = (255, 255, 255),
    max_bytes: int | None = None,
) -> np.ndarray:
    """A sequence of images -> float32 (N, 3, H, W); errors name the failing index."""
    if isinstance(images, (str, bytes, bytearray, memoryview, Image.Image)) or (
        isinstance(images, np.ndarray) and images.ndim != 4
    ):
        raise TypeError(
            "preprocess_batch expects a sequence of images (or a uint8 (N, H, W, C) array); "
            "use preprocess_image for one image"
        )
    items = list(images)
    out = np.empty((len(items), *cfg.input_shape), dtype=np.float32)
    for i, item in enumerate(items):
        preprocess_image(item, cfg, index=i, exif_transpose=exif_transpose,
                         alpha_background=alpha_background, max_bytes=max_bytes, out=out[i])
    return out
