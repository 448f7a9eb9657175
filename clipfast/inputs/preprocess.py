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
  read); paths and binary file objects are read up to ``clipfast.inputs.image_io.MAX_IMAGE_BYTES``
  (``max_bytes=``).
- Empty images (a side of 0 pixels) are refused.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

# Loading lives in clipfast.inputs.image_io; its public names stay importable from here.
from clipfast.inputs.image_io import (  # noqa: F401
    EXIF_ORIENTATION,
    image_error,
    item_failure,
    load_image,
    read_image_bytes,
)

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
FILTER_SUPPORT = {
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
    support = FILTER_SUPPORT[interpolation]
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


def resize_and_crop(img: Image.Image, cfg: PreprocessConfig, *,
                    reducing_gap: float | None = None) -> np.ndarray:
    """Geometry only: RGB PIL image -> uint8 (H, W, 3) at ``cfg.image_size``.

    reducing_gap: Pillow's ``resize(reducing_gap=)``: first shrink by an integer factor with a
    box filter while the image stays at least ``reducing_gap`` times the target, then resample.
    Faster on large images, not pixel-exact; None (default) is the reference resize."""
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
        resized = img.resize((new_w, new_h), resample=resample, reducing_gap=reducing_gap)
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
    draft: Any = None,
    reducing_gap: float | None = None,
) -> np.ndarray:
    """One image (anything ``load_image`` accepts) -> float32 (3, H, W).

    Loads it once with the given policy, then resizes, crops and normalises it (into ``out``
    if given). Any failure is an ImageLoadError naming ``index``, chained from the cause.
    draft / reducing_gap: the fast, not pixel-exact decode and resize (``load_image``,
    ``resize_and_crop``); both None (default) is the reference path.
    """
    rgb = load_image(img, index=index, exif_transpose=exif_transpose,
                     alpha_background=alpha_background, max_bytes=max_bytes, draft=draft)
    try:
        # The reference call stays resize_and_crop(rgb, cfg) (tests stand in for it).
        resized = (resize_and_crop(rgb, cfg) if reducing_gap is None
                   else resize_and_crop(rgb, cfg, reducing_gap=reducing_gap))
        return normalize(resized, cfg, out=out)
    except Exception as exc:
        raise image_error(
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
