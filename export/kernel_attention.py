"""The torch backend's use of the fused short-sequence attention kernel (csrc/attention.cu).

``kernel_attention_tower`` gives a copy of an open_clip tower whose attention calls
``clipfast.kernels.attention``: the CUDA kernel for contiguous fp16 / bf16 CUDA tensors of a
supported head dim when the library is loaded, the torch reference otherwise (so on CPU, or in
fp32, the copy computes exactly what the source does). It is opt-in
(``CLIPFAST_TORCH_ATTENTION=kernel``): the kernel is kept only where a benchmark on the target GPU
shows it beating PyTorch's scaled_dot_product_attention, and none has been measured yet.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from clipfast.export.fusion import EagerSelfAttention, fusable_tower


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
    cannot be replaced (not open_clip's built-in transformer blocks, a non-causal text mask...)."""
    return fusable_tower(tower, which, attention_cls=KernelSelfAttention)
