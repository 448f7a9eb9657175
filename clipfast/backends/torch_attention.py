"""The torch backend's use of the fused short-sequence attention kernel (csrc/attention.cu).

``kernel_attention_tower`` gives a copy of an open_clip tower whose attention calls
``clipfast.kernels.attention``: the CUDA kernel for contiguous fp16 / bf16 CUDA tensors of a
supported head dim when the library is loaded, the torch reference otherwise (so on CPU, or in
fp32, the copy computes exactly what the source does).

The torch backend on CUDA takes the kernel by default ("auto") only after ``self_check`` on the
device it runs on: the kernel tower and the source tower (PyTorch's scaled_dot_product_attention)
both run the same small batch in the backend's dtype, and each is measured against the fp32
source tower; ``check_passes`` is the rule. ``CLIPFAST_TORCH_ATTENTION=sdpa|kernel`` forces
either side.

Imported by the torch backend when it tries the kernel, never by the CPU runtime: it needs torch
and the export extras (``clipfast.export.fusion`` rebuilds open_clip's attention blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from clipfast.artifact.fidelity import centred_relative_error
from clipfast.export.fusion import EagerSelfAttention, fusable_tower
from clipfast.kernels.attention import HEAD_DIMS

# NOTE: the kernel is held to the flash-attention rule: its error against the fp32 reference at
# most twice the error PyTorch's own attention makes in the same dtype on the same batch. Both
# errors are centred relative errors of whole-tower embeddings (clipfast.artifact.fidelity), so
# they carry
# every fp16 rounding of the tower, not only the attention's; on ViT-B-32 fp16 those are about
# 1e-3. The floor keeps a tower whose PyTorch error happens to be tiny (a shallow test tower) from
# failing on noise: 2e-3 is a fifth of the fp16 gate (1e-2), so a kernel inside it cannot move an
# fp16 artifact past its gate.
CHECK_RATIO = 2.0
CHECK_FLOOR = 2e-3


class KernelSelfAttention(EagerSelfAttention):
    """``nn.MultiheadAttention`` (batch-first, eval) with the core computed by the csrc kernel:
    ``x (N, L, E) -> (N, L, E)``; q, k, v go to the kernel as contiguous ``(N, H, L, Dh)``."""

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None,
                value: torch.Tensor | None = None, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None, **_: Any) -> tuple[torch.Tensor, None]:
        from clipfast.kernels import attention

        x = query
        n, length = x.shape[0], x.shape[1]
        h, dh = self.num_heads, self.head_dim

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, length, h, dh).transpose(1, 2).contiguous()

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = attention(q, k, v, causal=self.causal, scale=self.scale)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, h * dh)), None


def kernel_attention_tower(tower: nn.Module, which: str) -> tuple[nn.Module, str | None]:
    """``(copy with KernelSelfAttention, None)`` or ``(tower, reason)`` when the tower's attention
    cannot be replaced (not open_clip's built-in transformer blocks, a non-causal text mask, a
    head dim the kernel has no variant for...)."""
    copy, reason = fusable_tower(tower, which, attention_cls=KernelSelfAttention)
    if reason:
        return tower, reason
    dims = sorted({m.head_dim for m in copy.modules() if isinstance(m, KernelSelfAttention)})
    bad = [d for d in dims if d not in HEAD_DIMS]
    if bad:
        return tower, (f"head dim {bad[0]} has no kernel variant (supported: "
                       f"{', '.join(map(str, HEAD_DIMS))})")
    return copy, None


def check_passes(kernel_error: float, source_error: float) -> bool:
    """The self-check rule (see the NOTE on CHECK_RATIO): finite, and at most
    ``max(CHECK_RATIO * source_error, CHECK_FLOOR)``."""
    return bool(np.isfinite(kernel_error)) and kernel_error <= max(CHECK_RATIO * source_error,
                                                                   CHECK_FLOOR)


@dataclass(frozen=True)
class SelfCheck:
    """Max centred relative errors against the fp32 source on the check batch."""

    kernel_error: float
    source_error: float

    @property
    def passed(self) -> bool:
        return check_passes(self.kernel_error, self.source_error)

    def summary(self) -> str:
        return (f"kernel error {self.kernel_error:.2e}, PyTorch attention {self.source_error:.2e}"
                f" (limit {max(CHECK_RATIO * self.source_error, CHECK_FLOOR):.2e})")


def self_check(kernel_tower: nn.Module, source_tower: nn.Module, inputs: tuple[torch.Tensor, ...],
               reference: np.ndarray) -> SelfCheck:
    """Run both towers (already in the dtype they will serve in) on ``inputs`` and measure each
    against ``reference``, the fp32 source tower's ``(N, D)`` output on the same inputs
    (N >= 2: the error is centred on the batch mean)."""
    with torch.inference_mode():
        got_kernel = kernel_tower(*inputs).float().cpu().numpy()
        got_source = source_tower(*inputs).float().cpu().numpy()
    return SelfCheck(float(centred_relative_error(got_kernel, reference).max()),
                     float(centred_relative_error(got_source, reference).max()))
