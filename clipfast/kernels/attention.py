"""Fused short-sequence attention (csrc/attention.cu) and its references.

Shapes are ``(batch, heads, tokens, head_dim)`` throughout; the output is
``softmax(scale * q @ k^T [+ causal mask]) @ v`` with ``scale`` defaulting to ``head_dim**-0.5``
and the causal mask hiding key j from query i when j > i (torch's ``is_causal``).

- ``attention_reference``: numpy, float64 math (the ground truth of the tests).
- ``attention_torch_reference``: torch, float32 math, explicit matmul / softmax.
- ``attention_gpu``: the kernel on CUDA fp16 / bf16 tensors (head_dim 64, 80, 128).
- ``attention``: the dispatcher (kernel only when it applies, else the torch reference).

No torch import at module level.
"""

from __future__ import annotations

import ctypes
import logging
import math
from typing import Any

import numpy as np

from clipfast.kernels import _lib

logger = logging.getLogger("clipfast.kernels")

HEAD_DIMS = (64, 80, 128)
MAX_TOKENS = 4096  # csrc kMaxTokens

__all__ = ["attention", "attention_gpu", "attention_path", "attention_reference",
           "attention_torch_reference"]


def _scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def attention_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool = False,
                        scale: float | None = None) -> np.ndarray:
    """float64 (batch, heads, tokens, head_dim) attention of any float inputs (max-subtracted
    softmax)."""
    q64, k64, v64 = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    if q64.ndim != 4 or q64.shape != k64.shape or q64.shape != v64.shape:
        raise ValueError(f"q, k, v must share one (batch, heads, tokens, head_dim) shape, got "
                         f"{q64.shape}, {k64.shape}, {v64.shape}")
    s = np.einsum("bhid,bhjd->bhij", q64, k64) * _scale(q64.shape[-1], scale)
    if causal:
        t = s.shape[-1]
        s = np.where(np.triu(np.ones((t, t), dtype=bool), k=1), -np.inf, s)
    s = s - s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("bhij,bhjd->bhid", p, v64)


def attention_torch_reference(q: Any, k: Any, v: Any, causal: bool = False,
                              scale: float | None = None) -> Any:
    """torch twin, float32 math on q's device; returns q's dtype."""
    import torch

    qf, kf, vf = (x.float() for x in (q, k, v))
    s = torch.matmul(qf, kf.transpose(-1, -2)) * _scale(q.shape[-1], scale)
    if causal:
        t = s.shape[-1]
        mask = torch.ones(t, t, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), vf).to(q.dtype)


def attention_path(tokens: int, head_dim: int) -> str:
    """"resident" or "tiled": the path the kernel takes for this shape on the current device."""
    lib = _lib.require_library()
    path = lib.clipfast_attention_path(tokens, head_dim)
    if path == 0:
        _lib.check(lib, _lib.EINVAL, "clipfast_attention_path")
    return {1: "resident", 2: "tiled"}[path]


def _check_gpu_inputs(q: Any, k: Any, v: Any) -> None:
    import torch

    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch tensor, got {type(x).__name__}")
        if x.device.type != "cuda":
            raise ValueError(f"{name} must be on a CUDA device, got {x.device}")
        if x.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"{name} must be float16 or bfloat16, got {x.dtype}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be (batch, heads, tokens, head_dim), got shape "
                             f"{tuple(x.shape)}")
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous (batch, heads, tokens, head_dim); got "
                             f"strides {x.stride()}: call .contiguous()")
        if x.data_ptr() % 16:
            raise ValueError(f"{name} must be 16-byte aligned, got data_ptr {x.data_ptr():#x}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have one shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        raise ValueError("q, k, v must share dtype and device")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of 64, 80, 128, got {q.shape[-1]}")
    if not 1 <= q.shape[2] <= MAX_TOKENS:
        raise ValueError(f"tokens must be in 1..{MAX_TOKENS}, got {q.shape[2]}")


def attention_gpu(q: Any, k: Any, v: Any, causal: bool = False,
                  scale: float | None = None) -> Any:
    """The kernel: CUDA fp16 / bf16 contiguous (batch, heads, tokens, head_dim) -> same.

    Runs on torch's current stream of q's device.
    """
    import torch

    lib = _lib.require_library()
    _check_gpu_inputs(q, k, v)
    b, h, t, d = q.shape
    out = torch.empty_like(q)
    dtype = _lib.DTYPES["float16" if q.dtype == torch.float16 else "bfloat16"]
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        rc = lib.clipfast_attention(
            ctypes.c_void_p(q.data_ptr()), ctypes.c_void_p(k.data_ptr()),
            ctypes.c_void_p(v.data_ptr()), ctypes.c_void_p(out.data_ptr()), b, h, t, d, dtype,
            _scale(d, scale), int(bool(causal)), ctypes.c_void_p(stream))
    _lib.check(lib, rc, "clipfast_attention")
    return out


def _kernel_applies(q: Any, k: Any, v: Any) -> bool:
    try:
        _check_gpu_inputs(q, k, v)
    except (TypeError, ValueError):
        return False
    return _lib.load_library() is not None


def attention(q: Any, k: Any, v: Any, causal: bool = False, scale: float | None = None) -> Any:
    """Dispatcher: the kernel when q, k, v are contiguous CUDA fp16 / bf16 tensors of a
    supported head_dim and the library loaded; the torch reference for other tensors (strided
    ones included); the numpy reference (float64) for numpy arrays."""
    if isinstance(q, np.ndarray):
        return attention_reference(q, k, v, causal=causal, scale=scale)
    if _kernel_applies(q, k, v):
        return attention_gpu(q, k, v, causal=causal, scale=scale)
    return attention_torch_reference(q, k, v, causal=causal, scale=scale)
