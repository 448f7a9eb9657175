"""Fused GPU preprocessing (csrc/preprocess.cu) and its numpy reference.

``preprocess_reference`` is the algorithm of the kernel written in numpy, step for step:
Pillow's antialiased separable resampling (libImaging/Resample.c: double-precision filter
weights normalised per output pixel, quantised to int32 with 22 fractional bits, horizontal pass
rounded and clamped to uint8, then the vertical pass), the crop / pad window of
``clipfast.inputs.preprocess`` (one definition of the geometry for CPU and GPU), gray -> RGB, and
the
float32 normalisation table. ``preprocess_gpu`` runs the kernel on torch CUDA tensors (or CuPy
arrays, through ``__cuda_array_interface__``). ``preprocess_path`` is the one place that chooses
between them (``preprocess`` and the Engine's GPU preprocessing both ask it).

No torch import at module level: torch is imported inside the GPU functions only.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from clipfast.inputs.preprocess import FILTER_SUPPORT, PreprocessConfig, crop_offset, resized_size
from clipfast.kernels import _lib

logger = logging.getLogger("clipfast.kernels")

_PRECISION_BITS = 22  # Pillow's PRECISION_BITS = 32 - 8 - 2
# The resampling filters the kernel implements (Pillow's radii); "nearest" takes Pillow's
# separate non-resampling path, which the kernel does not.
_SUPPORT = {k: v for k, v in FILTER_SUPPORT.items() if k != "nearest"}
_HAMMING_A = float(np.float32(0.54))  # Pillow writes 0.54f / 0.46f: float constants
_HAMMING_B = float(np.float32(0.46))

__all__ = [
    "JpegDecoder",
    "pillow_coefficients",
    "plan_geometry",
    "preprocess",
    "preprocess_gpu",
    "preprocess_packed_gpu",
    "preprocess_path",
    "preprocess_reference",
    "resize_reference",
    "vertical_first",
]


# --------------------------------------------------------------------------- geometry


def plan_geometry(height: int, width: int, cfg: PreprocessConfig) -> tuple[int, int, int, int]:
    """(resized_h, resized_w, top, left) of one image: output pixel (y, x) is resized pixel
    (y + top, x + left); negative offsets and pixels past the resized image are ``fill_color``.

    Same rules as ``clipfast.inputs.preprocess.resize_and_crop`` (resize modes, crop rounding).
    """
    new_h, new_w = resized_size(height, width, cfg)
    out_h, out_w = cfg.image_size
    top = crop_offset(new_h, out_h, cfg.crop_rounding) if cfg.crop else 0
    left = crop_offset(new_w, out_w, cfg.crop_rounding) if cfg.crop else 0
    return int(new_h), int(new_w), int(top), int(left)


# --------------------------------------------------------------------------- Pillow resampling


def _filter(name: str, x: np.ndarray) -> np.ndarray:
    """Pillow's filter functions, same float64 expressions in the same order."""
    if name == "box":
        return np.where((x > -0.5) & (x <= 0.5), 1.0, 0.0)
    ax = np.abs(x)
    if name == "bilinear":
        return np.where(ax < 1.0, 1.0 - ax, 0.0)
    if name == "bicubic":
        a = -0.5
        inner = ((a + 2.0) * ax - (a + 3.0)) * ax * ax + 1
        outer = (((ax - 5) * ax + 8) * ax - 4) * a
        return np.where(ax < 1.0, inner, np.where(ax < 2.0, outer, 0.0))
    if name == "hamming":
        xp = ax * math.pi
        with np.errstate(divide="ignore", invalid="ignore"):
            val = np.sin(xp) / xp * (_HAMMING_A + _HAMMING_B * np.cos(xp))
        return np.where(ax == 0.0, 1.0, np.where(ax >= 1.0, 0.0, val))
    if name == "lanczos":
        def sinc(t: np.ndarray) -> np.ndarray:
            tp = t * math.pi
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where(t == 0.0, 1.0, np.sin(tp) / tp)
        return np.where((x >= -3.0) & (x < 3.0), sinc(x) * sinc(x / 3), 0.0)
    raise ValueError(
        f"interpolation {name!r} has no Pillow-exact kernel; expected one of {sorted(_SUPPORT)}"
    )


def pillow_coefficients(
    in_size: int, out_size: int, interpolation: str, start: int = 0, stop: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for outputs [start, stop).

    Returns (xmin (n,) int64, count (n,) int64, weights (n, ksize) int32 with 22 fractional
    bits, zero past ``count``), as csrc/preprocess_kernels.cuh ``compute_entry`` computes them.
    """
    stop = out_size if stop is None else stop
    # Pillow's box is float32: (in1 - in0) is a float, promoted to double.
    scale = float(np.float32(in_size)) / out_size
    filterscale = max(scale, 1.0)
    support = _SUPPORT[interpolation] * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    i = np.arange(start, stop, dtype=np.float64)
    center = 0.0 + (i + 0.5) * scale
    ss = 1.0 / filterscale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64)
    count = xmax - xmin
    taps = np.arange(ksize)
    valid = taps[None, :] < count[:, None]
    arg = ((taps[None, :] + xmin[:, None]).astype(np.float64) - center[:, None] + 0.5) * ss
    w = np.where(valid, _filter(interpolation, arg), 0.0)
    # Sequential sum in tap order, as the C loop does (np.sum would sum pairwise).
    ww = np.zeros(len(i))
    for t in range(ksize):
        ww = ww + w[:, t]
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(ww[:, None] != 0.0, w / ww[:, None], w)
    scaled = w * float(1 << _PRECISION_BITS)
    q = np.where(w < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int32)
    return xmin, count, q


def _clip8(acc: np.ndarray) -> np.ndarray:
    """Pillow's clip8: arithmetic shift (floor) by 22 bits, clamp to 0..255."""
    return np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)


def _pass(img: np.ndarray, axis: int, xmin: np.ndarray, count: np.ndarray,
          w: np.ndarray) -> np.ndarray:
    """One 8-bit resampling pass along ``axis`` (0 rows, 1 columns) of uint8 (H, W, C)."""
    src = img.astype(np.int64)
    size = img.shape[axis]
    shape = list(img.shape)
    shape[axis] = len(xmin)
    acc = np.full(shape, 1 << (_PRECISION_BITS - 1), dtype=np.int64)
    for t in range(w.shape[1]):
        idx = np.minimum(xmin + t, size - 1)
        wt = np.where(t < count, w[:, t], 0).astype(np.int64)
        if axis == 0:
            acc += src[idx, :, :] * wt[:, None, None]
        else:
            acc += src[:, idx, :] * wt[None, :, None]
    return _clip8(acc)


def _as_hwc(img: Any, index: int) -> np.ndarray:
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise ValueError(f"images[{index}] must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(
            f"images[{index}] must be (H, W), (H, W, 1) or (H, W, 3) uint8 with H, W >= 1, got "
            f"shape {arr.shape}; convert RGBA and other modes with "
            "clipfast.inputs.preprocess.load_image"
        )
    return arr


@functools.lru_cache(maxsize=1)
def pillow_vertical_first_rule() -> bool:
    """Whether the installed Pillow runs the vertical pass first when the height shrinks more
    than twice as much as the width (Pillow 13 does; older releases always go horizontal
    first). Found by resizing a small random image both ways, once."""
    from PIL import Image

    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(img).resize((60, 4), Image.Resampling.BICUBIC,
                                                 reducing_gap=None))
    hx, hc, hk = pillow_coefficients(64, 60, "bicubic")
    vy, vc, vk = pillow_coefficients(64, 4, "bicubic")
    vert_first = _pass(_pass(img, 0, vy, vc, vk), 1, hx, hc, hk)
    horiz_first = _pass(_pass(img, 1, hx, hc, hk), 0, vy, vc, vk)
    if np.array_equal(ref, vert_first):
        return True
    if not np.array_equal(ref, horiz_first):
        logger.warning("Pillow %s resizes with neither pass order this module knows; GPU "
                       "preprocessing may differ from it by more than 1 level",
                       getattr(Image, "__version__", "?"))
    return False


def vertical_first(height: int, width: int, resized_h: int, resized_w: int) -> bool:
    """Pass order of one resize as the installed Pillow does it (CLIPFAST_VERTICAL_FIRST)."""
    dh, dw = height - resized_h, width - resized_w
    return (resized_h != height and resized_w != width and dh > 0 and dh > dw * 2
            and pillow_vertical_first_rule())


def _resample_window(img: np.ndarray, size: tuple[int, int], interpolation: str,
                     rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """Resized pixels [rows) x [cols) of uint8 (H, W, C) resized to ``size`` (h, w)."""
    h, w = img.shape[:2]
    rh, rw = size
    y0, y1 = rows
    x0, x1 = cols
    if rw != w:  # Pillow skips a pass whose size does not change
        hx, hc, hk = pillow_coefficients(w, rw, interpolation, x0, x1)
    if rh != h:
        vy, vc, vk = pillow_coefficients(h, rh, interpolation, y0, y1)
    if vertical_first(h, w, rh, rw):
        c0, c1 = int(hx[0]), int(hx[-1] + hc[-1])  # source columns the window needs
        band = _pass(img[:, c0:c1], 0, vy, vc, vk)
        return _pass(band, 1, hx - c0, hc, hk)
    if rh != h:
        src_rows = (int(vy[0]), int(vy[-1] + vc[-1]))
    else:
        src_rows = (y0, y1)
    band = img[src_rows[0]:src_rows[1]]
    band = _pass(band, 1, hx, hc, hk) if rw != w else band[:, x0:x1]
    if rh != h:
        return _pass(band, 0, vy - src_rows[0], vc, vk)
    return band


def resize_reference(img: np.ndarray, size: tuple[int, int],
                     interpolation: str = "bicubic") -> np.ndarray:
    """uint8 (H, W[, C]) -> uint8 (h, w[, C]): ``Image.resize((w, h), filter,
    reducing_gap=None)`` reproduced in numpy (the kernel's resampling, without crop)."""
    arr = _as_hwc(img, 0)
    h, w = size
    out = _resample_window(arr, (h, w), interpolation, (0, h), (0, w))
    return out if np.asarray(img).ndim == 3 else out[:, :, 0]


def _normalize_lut(cfg: PreprocessConfig) -> np.ndarray:
    """float32 (3, 256): the kernel's table, float32(x * rescale) [+ offset] - mean, / std."""
    x = (np.arange(256, dtype=np.float64) * cfg.rescale).astype(np.float32)
    if cfg.offset != 0.0:
        x = x + np.float32(cfg.offset)
    mean = np.asarray(cfg.mean, dtype=np.float32)[:, None]
    std = np.asarray(cfg.std, dtype=np.float32)[:, None]
    return (x[None, :] - mean) / std


def _check_cfg(cfg: PreprocessConfig) -> None:
    if cfg.interpolation not in _SUPPORT:
        raise ValueError(
            f"preprocess kernel: interpolation {cfg.interpolation!r} is not implemented (Pillow "
            f"uses a different, non-resampling path for it); expected one of {sorted(_SUPPORT)}"
        )


def _pixels_reference(arr: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """uint8 (H, W, C) -> uint8 (out_h, out_w, 3): resize, crop / pad, gray -> RGB."""
    h, w = arr.shape[:2]
    rh, rw, top, left = plan_geometry(h, w, cfg)
    out_h, out_w = cfg.image_size
    canvas = np.full((out_h, out_w, 3), cfg.fill_color, dtype=np.uint8)
    y0, y1 = max(top, 0), min(top + out_h, rh)
    x0, x1 = max(left, 0), min(left + out_w, rw)
    if y1 > y0 and x1 > x0:
        win = _resample_window(arr, (rh, rw), cfg.interpolation, (y0, y1), (x0, x1))
        canvas[y0 - top:y1 - top, x0 - left:x1 - left] = win  # (.., 1) broadcasts gray
    return canvas


def preprocess_reference(images: Sequence[np.ndarray], cfg: PreprocessConfig) -> np.ndarray:
    """Numpy twin of the kernel: uint8 (H, W[, 1 | 3]) images -> float32 (N, 3, H, W)."""
    _check_cfg(cfg)
    lut = _normalize_lut(cfg)
    out = np.empty((len(images), 3, *cfg.image_size), dtype=np.float32)
    for i, img in enumerate(images):
        pix = _pixels_reference(_as_hwc(img, i), cfg)
        for c in range(3):
            out[i, c] = lut[c][pix[:, :, c]]
    return out


# --------------------------------------------------------------------------- GPU


def _params(cfg: PreprocessConfig, dtype: str) -> _lib.PreprocessParams:
    if dtype not in _lib.DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_lib.DTYPES)}, got {dtype!r}")
    p = _lib.PreprocessParams()
    p.out_h, p.out_w = cfg.image_size
    p.filter = _lib.FILTERS[cfg.interpolation]
    p.out_dtype = _lib.DTYPES[dtype]
    p.fill = cfg.fill_color
    p.rescale = cfg.rescale
    p.offset = cfg.offset
    p.mean[:] = list(cfg.mean)
    p.std[:] = list(cfg.std)
    return p


def _torch_dtype(dtype: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def preprocess_packed_gpu(packed: Any, shapes: Sequence[tuple[int, int, int]],
                          cfg: PreprocessConfig, *, dtype: str = "float32",
                          offsets: Sequence[int] | None = None) -> Any:
    """Kernel on a packed CUDA uint8 buffer (torch tensor or ``__cuda_array_interface__``).

    shapes: (height, width, channels) per image; offsets: byte offset of each (default: dense,
    in order). Returns a torch tensor (N, 3, H, W) of ``dtype`` on the buffer's device,
    enqueued on torch's current stream of that device.
    """
    import torch

    _check_cfg(cfg)
    lib = _lib.require_library()
    buf = torch.as_tensor(packed, device="cuda") if not isinstance(packed, torch.Tensor) else packed
    if buf.device.type != "cuda" or buf.dtype != torch.uint8 or not buf.is_contiguous():
        raise ValueError(
            f"packed must be a contiguous uint8 CUDA buffer, got {buf.dtype} on {buf.device}"
        )
    n = len(shapes)
    if n == 0:
        return torch.empty((0, 3, *cfg.image_size), dtype=_torch_dtype(dtype), device=buf.device)
    descs = (_lib.ImageDesc * n)()
    pos = 0
    for i, (h, w, c) in enumerate(shapes):
        rh, rw, top, left = plan_geometry(int(h), int(w), cfg)
        off = pos if offsets is None else int(offsets[i])
        flags = _lib.VERTICAL_FIRST if vertical_first(int(h), int(w), rh, rw) else 0
        descs[i] = _lib.ImageDesc(off, int(h), int(w), int(c), rh, rw, top, left, flags)
        pos += int(h) * int(w) * int(c)
    params = _params(cfg, dtype)
    out = torch.empty((n, 3, *cfg.image_size), dtype=_torch_dtype(dtype), device=buf.device)
    with torch.cuda.device(buf.device):
        stream = torch.cuda.current_stream(buf.device).cuda_stream
        rc = lib.clipfast_preprocess(
            ctypes.c_void_p(buf.data_ptr()), buf.numel(), descs, n, ctypes.byref(params),
            ctypes.c_void_p(out.data_ptr()), ctypes.c_void_p(stream))
    _lib.check(lib, rc, "clipfast_preprocess")
    return out


def preprocess_gpu(images: Sequence[Any], cfg: PreprocessConfig, *, device: Any = "cuda",
                   dtype: str = "float32") -> Any:
    """Kernel path: uint8 (H, W[, 1 | 3]) images -> torch (N, 3, H, W) on ``device``.

    images: numpy arrays (copied once through pinned memory), torch tensors, or CuPy arrays
    (zero-copy through ``__cuda_array_interface__``). Runs on torch's current stream.
    """
    _lib.require_library()  # BackendUnavailable with the reason, before touching CUDA
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"preprocess_gpu needs a CUDA device, got {dev}")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    flats, shapes = [], []
    host = all(isinstance(img, np.ndarray) for img in images)
    for i, img in enumerate(images):
        if isinstance(img, np.ndarray):
            arr = np.ascontiguousarray(_as_hwc(img, i))
            shapes.append(arr.shape)
            flats.append(arr.reshape(-1))
            continue
        t = img if isinstance(img, torch.Tensor) else torch.as_tensor(img, device=dev)
        if t.dtype != torch.uint8:
            raise ValueError(f"images[{i}] must be uint8, got {t.dtype}")
        if t.dim() == 2:
            t = t.unsqueeze(-1)
        if t.dim() != 3 or t.shape[2] not in (1, 3) or t.shape[0] < 1 or t.shape[1] < 1:
            raise ValueError(f"images[{i}] must be (H, W), (H, W, 1) or (H, W, 3), got "
                             f"{tuple(t.shape)}")
        shapes.append(tuple(t.shape))
        flats.append(t.to(dev).contiguous().reshape(-1))
    if not flats:
        return torch.empty((0, 3, *cfg.image_size), dtype=_torch_dtype(dtype), device=dev)
    if host:
        # One host->device copy for the batch; pinned so it overlaps with other work.
        packed = torch.from_numpy(np.concatenate(flats)).pin_memory().to(dev, non_blocking=True)
    else:
        packed = torch.cat([f if isinstance(f, torch.Tensor) else torch.from_numpy(f).to(dev)
                            for f in flats])
    return preprocess_packed_gpu(packed, shapes, cfg, dtype=dtype)


class JpegDecoder:
    """nvJPEG batched decoder (csrc/jpeg_decode.cu) for one CUDA device; not thread-safe.

    Hardware JPEG engine when the GPU has one (A100, H100, ...), CUDA backend otherwise;
    images it cannot decode (CMYK, not JPEG) raise KernelError naming the index: decode those
    on the CPU (clipfast.inputs.preprocess.load_image).
    """

    def __init__(self, device: Any = "cuda", prefer_hardware: bool = True):
        import torch

        self._lib = _lib.require_library()
        _lib.preload_nvjpeg()
        self.device = torch.device(device)
        handle = ctypes.c_void_p()
        with torch.cuda.device(self.device):
            rc = self._lib.clipfast_jpeg_decoder_create(int(prefer_hardware), ctypes.byref(handle))
        _lib.check(self._lib, rc, "clipfast_jpeg_decoder_create")
        self._handle = handle
        self.hardware = bool(self._lib.clipfast_jpeg_decoder_backend(handle))

    def close(self) -> None:
        if getattr(self, "_handle", None):
            self._lib.clipfast_jpeg_decoder_destroy(self._handle)
            self._handle = None

    def __del__(self) -> None:
        self.close()

    def decode(self, datas: Sequence[bytes]) -> tuple[Any, list[tuple[int, int, int]]]:
        """Encoded JPEGs -> (packed uint8 CUDA tensor, [(h, w, 3)]): interleaved RGB, gray
        replicated. Returns after the decode finished (the host bytes may then be freed)."""
        import torch

        n = len(datas)
        if n == 0:
            return torch.empty(0, dtype=torch.uint8, device=self.device), []
        bufs = [bytes(d) for d in datas]
        ptrs = (ctypes.c_void_p * n)(*[ctypes.cast(ctypes.c_char_p(b), ctypes.c_void_p)
                                        for b in bufs])
        lens = (ctypes.c_size_t * n)(*[len(b) for b in bufs])
        hs, ws, cs = (ctypes.c_int32 * n)(), (ctypes.c_int32 * n)(), (ctypes.c_int32 * n)()
        rc = self._lib.clipfast_jpeg_info(self._handle, ptrs, lens, n, hs, ws, cs)
        _lib.check(self._lib, rc, "clipfast_jpeg_info")
        sizes = [int(hs[i]) * int(ws[i]) * 3 for i in range(n)]
        offs = (ctypes.c_int64 * n)(*np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist())
        packed = torch.empty(int(sum(sizes)), dtype=torch.uint8, device=self.device)
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device).cuda_stream
            rc = self._lib.clipfast_jpeg_decode(
                self._handle, ptrs, lens, n, ctypes.c_void_p(packed.data_ptr()), packed.numel(),
                offs, hs, ws, ctypes.c_void_p(stream))
        _lib.check(self._lib, rc, "clipfast_jpeg_decode")
        return packed, [(int(hs[i]), int(ws[i]), 3) for i in range(n)]


_fallback_logged = False


def _host_array(img: Any) -> np.ndarray:
    """numpy view / copy of an image given as numpy, torch (any device) or CuPy."""
    if isinstance(img, np.ndarray):
        return img
    if hasattr(img, "detach"):  # torch
        return img.detach().cpu().numpy()
    if hasattr(img, "__cuda_array_interface__") and hasattr(img, "get"):  # CuPy
        return img.get()
    return np.asarray(img)


def preprocess_path(cfg: PreprocessConfig, device: Any) -> tuple[str, str]:
    """The one choice between the kernel and the numpy reference, for every caller (the
    ``preprocess`` function below and the Engine's
    ``clipfast.inputs.gpu_preprocess.GpuPreprocessor``).

    Returns ``("kernel", how)`` when ``device`` is CUDA, the interpolation has a kernel, the
    library is loaded and PyTorch sees a CUDA device (the kernel is driven through torch
    tensors and streams), else ``("reference", why not)``. Imports torch only once the library
    has loaded for a CUDA device.
    """
    if not str(device).startswith("cuda"):
        return "reference", f"device {str(device)!r} is not a CUDA device"
    if cfg.interpolation not in _SUPPORT:
        return "reference", (f"no preprocessing kernel for interpolation "
                             f"{cfg.interpolation!r} (kernels: {sorted(_SUPPORT)})")
    ok, reason = _lib.kernels_available()
    if not ok:
        return "reference", reason
    try:
        import torch
    except ImportError as e:
        return "reference", f"the kernel runs through PyTorch, which is not installed ({e})"
    if not torch.cuda.is_available():
        return "reference", "no CUDA device visible to PyTorch"
    return "kernel", "csrc kernel via torch"


def preprocess(images: Sequence[Any], cfg: PreprocessConfig, device: Any = "cpu", *,
               dtype: str = "float32") -> Any:
    """Images through the path ``preprocess_path`` picks: the kernel, else the numpy reference
    (Pillow's own path for "nearest", which has no kernel). CPU: numpy float32 (N, 3, H, W);
    CUDA: a torch tensor of ``dtype`` on ``device``."""
    global _fallback_logged
    path, reason = preprocess_path(cfg, device)
    if path == "kernel":
        return preprocess_gpu(images, cfg, device=device, dtype=dtype)
    on_cuda = str(device).startswith("cuda")
    if on_cuda and not _fallback_logged:
        logger.warning("preprocess on %s runs the numpy reference: %s", device, reason)
        _fallback_logged = True
    host = [_host_array(img) for img in images]
    if cfg.interpolation in _SUPPORT:
        ref = preprocess_reference(host, cfg)
    else:
        from clipfast.inputs.preprocess import preprocess_batch

        ref = preprocess_batch(host, cfg)
    if not on_cuda:
        return ref
    import torch

    return torch.from_numpy(ref).to(device=device, dtype=_torch_dtype(dtype))
