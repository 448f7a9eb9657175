"""clipfast's CUDA kernels (csrc/) and the references they are checked against.

Every kernel has a pure reference next to its binding and one dispatcher that takes the kernel
only on CUDA inputs with the library loaded (for preprocessing, ``preprocess_path`` makes that
choice and says why)::

    from clipfast.kernels import kernels_available, preprocess, attention
    ok, reason = kernels_available()   # loads libclipfast_kernels.so once, logs the reason

Importing this package neither imports torch nor initialises CUDA; the library is loaded on
first use. ``CLIPFAST_DISABLE_KERNELS=1`` disables it, ``CLIPFAST_KERNELS_LIB`` points at it.
"""

from __future__ import annotations

from clipfast.kernels._lib import KernelError, kernels_available, load_library
from clipfast.kernels.attention import (
    attention,
    attention_gpu,
    attention_path,
    attention_reference,
    attention_torch_reference,
)
from clipfast.kernels.preprocess import (
    JpegDecoder,
    plan_geometry,
    preprocess,
    preprocess_gpu,
    preprocess_packed_gpu,
    preprocess_path,
    preprocess_reference,
    resize_reference,
)

__all__ = [
    "JpegDecoder",
    "KernelError",
    "attention",
    "attention_gpu",
    "attention_path",
    "attention_reference",
    "attention_torch_reference",
    "kernels_available",
    "load_library",
    "plan_geometry",
    "preprocess",
    "preprocess_gpu",
    "preprocess_packed_gpu",
    "preprocess_path",
    "preprocess_reference",
    "resize_reference",
]
