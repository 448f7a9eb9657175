"""Image preprocessing on a CUDA device: nvJPEG decode + the fused resize/normalise kernel.

Plain JPEGs (baseline or progressive, RGB or gray, no EXIF rotation to apply, within Pillow's
pixel limit) are decoded on the GPU in one batched nvJPEG call; every other input goes through the
CPU loader (``clipfast.preprocess.load_image``: same mode and alpha policy as the CPU path) and is
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

log = logging.getLogger("clipfast")

_JPEG_MAGIC = b"\xff\xd8\xff"
_EXIF_ORIENTATION = 0x0112


def jpeg_bytes_for_gpu(item: Any, exif_transpose: bool) -> bytes | None:
    """The encoded bytes of ``item`` if nvJPEG can decode it to exactly what the CPU loader
    would produce, else None (then the CPU loader handles it). Reads headers only."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
    elif isinstance(item, (str, os.PathLike)) and os.path.isfile(item):
        with open(item, "rb") as f:
            data = f.read()
    else:
        return None
    if not data.startswith(_JPEG_MAGIC):
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                return None  # CMYK / YCCK JPEGs: Pillow's conversion is the reference
            w, h = im.size
            if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
                return None  # the CPU loader refuses it with the decompression-bomb message
            if exif_transpose and im.getexif().get(_EXIF_ORIENTATION, 1) not in (0, 1):
                return None
    except Exception:
        return None  # unreadable header: let the CPU loader name the problem
    return data


class GpuPreprocessor:
    """``items -> (torch float32 (M, 3, H, W) on device, good indices, failures)``."""

    def __init__(self, cfg, device: str, *, exif_transpose: bool = True,
                 alpha_background: tuple[int, int, int] = (255, 255, 255)):
        from clipfast.kernels import kernels_available
        from clipfast.kernels.preprocess import _SUPPORT

        ok, reason = kernels_available()
        if not ok:
            raise BackendUnavailable(f"GPU preprocessing off, CPU path used: {reason}")
        if cfg.interpolation not in _SUPPORT:
            raise BackendUnavailable(
                f"GPU preprocessing off: no kernel for interpolation {cfg.interpolation!r}")
        try:
            import torch
        except ImportError as e:
            raise BackendUnavailable(f"GPU preprocessing needs PyTorch with CUDA ({e})") from e
        if not torch.cuda.is_available():
            raise BackendUnavailable("GPU preprocessing off: no CUDA device visible to PyTorch")
        self.cfg = cfg
        self.device = torch.device(device)
        self.exif_transpose = exif_transpose
        self.alpha_background = alpha_background
        self.jpeg_reason = None
        try:
            from clipfast.kernels import JpegDecoder

            self._jpeg = JpegDecoder(self.device)
        except Exception as e:  # nvJPEG missing or failing: decode on CPU, say so once
            self._jpeg = None
            self.jpeg_reason = f"nvJPEG unavailable, JPEGs decoded on CPU: {e}"
            log.warning("clipfast: %s", self.jpeg_reason)

    def __call__(self, items: list, offset: int, errors: str):
        import torch

        from clipfast.engine import Failure
        from clipfast.kernels import preprocess_gpu, preprocess_packed_gpu
        from clipfast.preprocess import load_image

        jpeg_idx, jpeg_data, host_idx, host_arrays, failures = [], [], [], [], []
        for i, item in enumerate(items, start=offset):
            data = (jpeg_bytes_for_gpu(item, self.exif_transpose)
                    if self._jpeg is not None else None)
            if data is not None:
                jpeg_idx.append(i)
                jpeg_data.append(data)
                continue
            try:
                img = load_image(item, index=i, exif_transpose=self.exif_transpose,
                                 alpha_background=self.alpha_background)
                host_idx.append(i)
                host_arrays.append(np.asarray(img))
            except InputError as e:
                if errors == "raise":
                    raise
                failures.append(Failure(i, e.item or type(item).__name__, str(e)))
        parts: dict[int, Any] = {}
        if jpeg_data:
            try:
                packed, shapes = self._jpeg.decode(jpeg_data)
                out = preprocess_packed_gpu(packed, shapes, self.cfg)
                parts.update({i: out[k] for k, i in enumerate(jpeg_idx)})
            except Exception as e:  # one bad stream fails the nvJPEG batch: redo it on CPU
                log.info("clipfast: nvJPEG batch failed (%s); decoding it on CPU", e)
                for i, data in zip(jpeg_idx, jpeg_data):
                    try:
                        host_arrays.append(np.asarray(load_image(
                            data, index=i, exif_transpose=self.exif_transpose,
                            alpha_background=self.alpha_background)))
                        host_idx.append(i)
                    except InputError as err:
                        if errors == "raise":
                            raise
                        failures.append(Failure(i, err.item or "bytes", str(err)))
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
