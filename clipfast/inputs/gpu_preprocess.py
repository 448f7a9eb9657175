"""Image preprocessing on a CUDA device: nvJPEG decode + the fused resize/normalise kernel.

It needs PyTorch with CUDA whatever the Engine's backend: the kernels are called on torch
tensors and torch's current stream, so ``Engine(device="cuda")`` imports torch even with the
TensorRT or ONNX Runtime backend. Without torch (or the kernel library) the Engine preprocesses
on the CPU with Pillow and says why in ``engine.fallbacks`` and ``engine.describe()["preprocess"]``.

Plain JPEGs (baseline or progressive, RGB or gray, no EXIF rotation to apply, within Pillow's
pixel limit) are decoded on the GPU in one batched nvJPEG call; every other input goes through the
CPU loader (``clipfast.inputs.preprocess.load_image``: same mode and alpha policy as the CPU path)
and is
uploaded. Then one kernel launch resizes, crops or pads, and normalises the whole batch.

Unverified on hardware in this version: the kernels are built and their references tested on CPU.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any

import numpy as np
from PIL import Image

from clipfast.errors import BackendUnavailable, InputError
from clipfast.inputs.image_io import EXIF_ORIENTATION, item_failure, load_image, read_image_bytes
from clipfast.types import Failure

log = logging.getLogger("clipfast")

_JPEG_MAGIC = b"\xff\xd8\xff"


def jpeg_bytes_for_gpu(item: Any, exif_transpose: bool,
                       max_bytes: int | None = None) -> bytes | None:
    """The encoded bytes of ``item`` if nvJPEG can decode it to exactly what the CPU loader
    would produce, else None (then the CPU loader handles it, and names any problem: a
    missing, special, unreadable or too large file, bad data). Reads headers only; never
    raises for a bad item."""
    try:
        if isinstance(item, (bytes, bytearray, memoryview)):
            data = bytes(item)
        elif isinstance(item, (str, os.PathLike)) and os.path.isfile(item):
            # Same rules as the CPU loader: regular files only, at most max_bytes.
            data = read_image_bytes(item, max_bytes=max_bytes)
        else:
            return None
        if not data.startswith(_JPEG_MAGIC):
            return None
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                return None  # CMYK / YCCK JPEGs: Pillow's conversion is the reference
            w, h = im.size
            if w < 1 or h < 1:
                return None
            if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
                return None  # the CPU loader refuses it with the decompression-bomb message
            if exif_transpose and im.getexif().get(EXIF_ORIENTATION, 1) not in (0, 1):
                return None
    except Exception:
        return None  # unreadable file or header: let the CPU loader name the problem
    return data


def load_host_image(item: Any, index: int, *, exif_transpose: bool,
                    alpha_background: tuple[int, int, int],
                    max_bytes: int | None = None) -> np.ndarray:
    """One item through the CPU loader: uint8 (H, W, 3) RGB, at least 1 x 1. Every fault of
    the item is an ImageLoadError naming ``index`` (chained from the cause)."""
    try:
        img = load_image(item, index=index, exif_transpose=exif_transpose,
                         alpha_background=alpha_background, max_bytes=max_bytes)
        arr = np.asarray(img)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
            raise item_failure(ValueError(f"loader returned shape {arr.shape}"), index, item)
        return arr
    except InputError:
        raise
    except Exception as e:
        raise item_failure(e, index, item) from e


class GpuPreprocessor:
    """``items -> (torch float32 (M, 3, H, W) on device, good indices, failures)``.

    Whether the kernel runs is decided by ``clipfast.kernels.preprocess.preprocess_path`` (the
    same choice ``clipfast.kernels.preprocess`` makes); when it says "reference",
    construction raises BackendUnavailable with its reason and the Engine preprocesses on the
    CPU with Pillow instead (the numpy reference is a test oracle, not a fast path).
    """

    def __init__(self, cfg, device: str, *, exif_transpose: bool = True,
                 alpha_background: tuple[int, int, int] = (255, 255, 255),
                 max_bytes: int | None = None):
        from clipfast.kernels.preprocess import preprocess_path

        path, how = preprocess_path(cfg, device)
        if path != "kernel":
            raise BackendUnavailable(f"GPU preprocessing off: {how}")
        import torch

        self.cfg = cfg
        self.device = torch.device(device)
        self.path = how
        self.exif_transpose = exif_transpose
        self.alpha_background = alpha_background
        self.max_bytes = max_bytes
        self.jpeg_reason = None
        try:
            from clipfast.kernels import JpegDecoder

            self._jpeg = JpegDecoder(self.device)
        except Exception as e:  # nvJPEG missing or failing: decode on CPU, say so once
            self._jpeg = None
            self.jpeg_reason = f"nvJPEG unavailable, JPEGs decoded on CPU: {e}"
            log.warning("clipfast: %s", self.jpeg_reason)

    def describe(self) -> str:
        """The path in words: "gpu (csrc kernel via torch, nvJPEG decode)", or with the reason
        JPEGs are decoded on the CPU."""
        if self._jpeg is not None:
            return f"gpu ({self.path}, nvJPEG decode)"
        return f"gpu ({self.path}; {self.jpeg_reason or 'JPEGs decoded on CPU'})"

    def _host(self, item: Any, i: int, errors: str, failures: list) -> np.ndarray | None:
        """The CPU loader on one item; its fault becomes a Failure (or raises, errors="raise")."""
        try:
            return load_host_image(item, i, exif_transpose=self.exif_transpose,
                                   alpha_background=self.alpha_background,
                                   max_bytes=self.max_bytes)
        except InputError as e:
            if errors == "raise":
                raise
            failures.append(Failure(i, e.item if e.item is not None else type(item).__name__,
                                    str(e)))
            return None

    def __call__(self, items: list, offset: int, errors: str):
        import torch

        from clipfast.kernels import preprocess_gpu, preprocess_packed_gpu

        jpeg_idx, jpeg_data, host_idx, host_arrays, failures = [], [], [], [], []
        for i, item in enumerate(items, start=offset):
            data = (jpeg_bytes_for_gpu(item, self.exif_transpose, self.max_bytes)
                    if self._jpeg is not None else None)
            if data is not None:
                jpeg_idx.append(i)
                jpeg_data.append(data)
                continue
            arr = self._host(item, i, errors, failures)
            if arr is not None:
                host_idx.append(i)
                host_arrays.append(arr)
        parts: dict[int, Any] = {}
        if jpeg_data:
            try:
                packed, shapes = self._jpeg.decode(jpeg_data)
                out = preprocess_packed_gpu(packed, shapes, self.cfg)
                parts.update({i: out[k] for k, i in enumerate(jpeg_idx)})
            except Exception as e:  # one bad stream fails the nvJPEG batch: redo it on CPU
                log.info("clipfast: nvJPEG batch failed (%s); decoding it on CPU", e)
                for i in jpeg_idx:
                    arr = self._host(items[i - offset], i, errors, failures)
                    if arr is not None:
                        host_idx.append(i)
                        host_arrays.append(arr)
        if host_arrays:
            out = preprocess_gpu(host_arrays, self.cfg, device=self.device)
            parts.update({i: out[k] for k, i in enumerate(host_idx)})
        order = sorted(parts)
        h, w = self.cfg.image_size
        pixels = (torch.stack([parts[i] for i in order]) if order
                  else torch.empty((0, 3, h, w), device=self.device))
        failures.sort(key=lambda f: f.index)
        if pixels.is_cuda:
            # The towers may read these on another stream (ONNX Runtime, TensorRT) or from
            # another thread (the Engine's prefetch): the kernels that wrote them must be done.
            torch.cuda.current_stream(pixels.device).synchronize()
        return pixels, order, failures
