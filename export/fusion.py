"""Fusable attention for export, and ONNX Runtime's transformer fusions with counted results.

ONNX Runtime fuses attention only when the exported subgraph matches one of its patterns
(``onnxruntime/transformers/fusion_attention_clip.py``, ``fusion_attention.py``), and it fails
silently when none matches. open_clip 3.x blocks use ``nn.MultiheadAttention``, whose traced graph
(one packed in-projection, a split, SDPA) matches none: a plain export fuses zero Attention nodes.
``fusable_tower`` gives an export copy of an open_clip tower whose attention modules are replaced
by ``EagerSelfAttention``, the same maths written as the pattern of transformers' eager CLIP
attention (separate Q/K/V MatMul+Add, one Reshape+Transpose each, QK^T * scale [+ causal mask],
Softmax, @V, Transpose+Reshape, out-projection). The reference tower is left untouched.

``optimize`` then runs ``onnxruntime.transformers.optimizer.optimize_model`` and returns the fused
operator counts, so the export can assert them (one fused Attention per layer).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipfast.errors import ExportError
from clipfast.export.families.base import AttentionSpec
from clipfast.export.onnx_files import PROTOBUF_LIMIT, model_bytes

log = logging.getLogger("clipfast.export")

__all__ = [
    "FUSED_OPS",
    "AttentionSpec",
    "EagerSelfAttention",
    "attention_spec",
    "count_ops",
    "fusable_tower",
    "fusion_plan",
    "optimize",
    "quiet_ort_tools",
    "unsupported_mha",
]

# Fused operators that the manifest records (a missing op type counts 0).
FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "LayerNormalization",
             "EmbedLayerNormalization", "BiasGelu", "FastGelu", "Gelu", "QuickGelu")


class EagerSelfAttention(nn.Module):
    """Batch-first self-attention, numerically ``nn.MultiheadAttention`` in eval mode.

    ``x (N, L, E) -> (N, L, E)``. Written so that the TorchScript-exported graph is the one
    ONNX Runtime's CLIP attention fusion matches:
    q/k/v: MatMul + Add -> Reshape (N, L, H, Dh) -> Transpose (K straight to (N, H, Dh, L)),
    scores: MatMul * scale [+ causal mask as Where(Less) -> Unsqueeze x2 -> Expand], Softmax,
    MatMul V, Transpose -> Reshape (N, L, E), out-projection MatMul + Add.

    causal: apply a causal mask built from the sequence length. The caller checked that the mask
    the source passes (open_clip's ``attn_mask`` buffer) is exactly causal, so the passed mask is
    not used; the fusion turns the built one into ``unidirectional=1``.
    The Linear layers share their weights with the source module (views of ``in_proj_weight``).
    """

    def __init__(self, mha: nn.MultiheadAttention, *, causal: bool = False):
        super().__init__()
        reason = unsupported_mha(mha)
        if reason:
            raise ExportError(f"cannot rewrite this nn.MultiheadAttention for fusion: {reason}")
        e, h = mha.embed_dim, mha.num_heads
        self.num_heads = h
        self.head_dim = e // h
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.causal = causal
        has_bias = mha.in_proj_bias is not None
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(e, e, bias=has_bias) for _ in range(3))
        for i, lin in enumerate((self.q_proj, self.k_proj, self.v_proj)):
            # Parameters made from slices share storage with the source: no weight copies.
            lin.weight = nn.Parameter(mha.in_proj_weight.detach()[i * e:(i + 1) * e],
                                      requires_grad=False)
            if has_bias:
                lin.bias = nn.Parameter(mha.in_proj_bias.detach()[i * e:(i + 1) * e],
                                        requires_grad=False)
        self.out_proj = mha.out_proj

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None,
                value: torch.Tensor | None = None, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None, **_: Any) -> tuple[torch.Tensor, None]:
        """Same call as ``nn.MultiheadAttention`` (batch_first); returns ``(out, None)``."""
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ExportError("EagerSelfAttention is self-attention only: key and value must be "
                              "the query tensor")
        x = query
        n, length = x.shape[0], x.shape[1]
        h, dh = self.num_heads, self.head_dim
        q = self.q_proj(x).view(n, length, h, dh).transpose(1, 2)  # (N, H, L, Dh)
        k = self.k_proj(x).view(n, length, h, dh).permute(0, 2, 3, 1)  # (N, H, Dh, L)
        v = self.v_proj(x).view(n, length, h, dh).transpose(1, 2)  # (N, H, L, Dh)
        scores = torch.matmul(q, k) * self.scale  # (N, H, L, L)
        if self.causal:
            scores = scores + _causal_mask(n, length, scores.dtype, x.device)
        elif attn_mask is not None:
            scores = scores + attn_mask.to(scores.dtype)
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(n, length, h * dh)
        return self.out_proj(out), None


def _causal_mask(n: int | torch.Tensor, length: int | torch.Tensor, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """Additive ``(N, 1, L, L)`` mask: 0 on and below the diagonal, finfo.min above.

    Where(Less) -> Unsqueeze x2 -> Expand is the causal pattern ORT's CLIP fusion recognises.
    finfo.min instead of -inf: exp() gives exactly 0 either way, and a fully masked row (never
    the case with a causal mask) would not turn into NaN.
    """
    pos = torch.arange(length, device=device)
    future = pos[:, None] < pos[None, :]
    zero = torch.zeros((), dtype=dtype, device=device)
    mask = torch.where(future, torch.finfo(dtype).min, zero)[None][None]
    return mask.expand(n, 1, length, length)


def unsupported_mha(mha: nn.MultiheadAttention) -> str | None:
    """Why ``mha`` cannot be rewritten as EagerSelfAttention, or None."""
    if not mha.batch_first:
        return "batch_first=False"
    if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
        return "separate q/k/v projection weights (kdim/vdim differ from embed_dim)"
    if mha.bias_k is not None or mha.bias_v is not None:
        return "add_bias_kv=True"
    if mha.add_zero_attn:
        return "add_zero_attn=True"
    if mha.embed_dim % mha.num_heads:
        return f"embed_dim {mha.embed_dim} not divisible by num_heads {mha.num_heads}"
    return None


def _blocks(transformer: nn.Module) -> list[nn.Module]:
    return list(getattr(transformer, "resblocks", []))


def fusion_plan(tower: nn.Module, which: str) -> tuple[nn.Module | None, bool, str | None]:
    """Find the transformer to rewrite in an open_clip tower wrapper: ``(transformer, causal,
    reason)``, ``transformer`` None and ``reason`` saying why when there is nothing to rewrite.

    which: "image" or "text". The rule belongs to the tower's family (open_clip families:
    ``families._openclip.open_clip_fusion_plan``).
    """
    from clipfast.export import families

    spec = families.for_tower(tower)
    plan = getattr(spec, "fusion_plan", None)
    if plan is None:
        return None, False, "not an open_clip tower wrapper"
    return plan(tower, which)


def fusable_tower(tower: nn.Module, which: str, attention_cls: type[nn.Module] | None = None
                  ) -> tuple[nn.Module, str | None]:
    """An export copy of an open_clip tower with every block's ``nn.MultiheadAttention``
    replaced by ``EagerSelfAttention``; ``tower`` itself is not modified.

    The copy shares parameters and buffers with ``tower`` (structure copied, tensors not), so it
    costs no weight memory. Returns ``(copy, None)``, or ``(tower, reason)`` when the tower has
    nothing to rewrite. ``attention_cls`` (default EagerSelfAttention) is the replacement module
    class, constructed as ``attention_cls(mha, causal=...)``.
    """
    transformer, causal, reason = fusion_plan(tower, which)
    if transformer is None:
        return tower, reason
    memo = {id(t): t for t in itertools.chain(tower.parameters(), tower.buffers())}
    export_copy = copy.deepcopy(tower, memo)
    transformer, _, _ = fusion_plan(export_copy, which)
    for block in _blocks(transformer):
        block.attn = (attention_cls or EagerSelfAttention)(block.attn, causal=causal)
    return export_copy.eval(), None


def attention_spec(tower: nn.Module, which: str) -> tuple[AttentionSpec | None, str | None]:
    """``(spec, None)`` for a tower whose attention ORT can fuse, else ``(None, reason)``.

    tower: a SourceModel tower (open_clip wrapper or a transformers family's tower);
    which: "image" or "text". The tower's family (``clipfast.export.families``) decides.
    """
    from clipfast.export import families

    spec = families.for_tower(tower)
    if spec is None:
        return None, "not an open_clip tower wrapper"
    return spec.attention(tower, which)


@contextlib.contextmanager
def quiet_ort_tools(level: int = logging.ERROR) -> Iterator[None]:
    """Raise the level of ONNX Runtime's transformer-tool loggers while they run.

    Those scripts import their modules as top-level names ("fusion_attention", "onnx_model",
    "symbolic_shape_infer", ...) and warn about every pattern or shape they give up on; the
    export records the outcome that matters (fused counts, or why fusion was not used) itself.
    """
    import onnxruntime

    root = os.path.dirname(onnxruntime.__file__)
    loggers = [logging.getLogger(name) for name, mod in list(sys.modules.items())
               if (getattr(mod, "__file__", None) or "").startswith(root)]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, lg.level))
    try:
        yield
    finally:
        for lg, old in saved:
            lg.setLevel(old)


def count_ops(model: Any) -> dict[str, int]:
    """``{op_type: count}`` of ``FUSED_OPS`` in an onnx ModelProto (0 for absent ones)."""
    counts = dict.fromkeys(FUSED_OPS, 0)
    for node in model.graph.node:
        if node.op_type in counts:
            counts[node.op_type] += 1
    return counts


def optimize(path: str | Path, out_path: str | Path, model_type: str, num_heads: int,
             hidden_size: int, *, opt_level: int = 0) -> dict[str, int]:
    """Run ONNX Runtime's transformer fusions on ``path``, save to ``out_path``, return the
    fused operator counts (``count_ops``).

    model_type: "clip" (CLIP/open_clip/MetaCLIP ViT and text towers), "bert" (ALIGN's text
    tower) or "vit". opt_level 0 (Python fusions only) or 1 (ONNX Runtime's basic,
    provider-independent rewrites first): higher levels add CPU-only layout and kernel fusions
    (NCHWc, FusedMatMul) that tie the saved graph to one execution provider; the runtime applies
    those itself when it loads the graph, for the provider it actually runs on.
    """
    if opt_level not in (0, 1):
        raise ExportError(f"opt_level {opt_level}: only 0 or 1 keep the saved graph portable")
    from onnxruntime.transformers.optimizer import optimize_model

    try:
        with quiet_ort_tools():
            optimized = optimize_model(str(path), model_type=model_type, num_heads=num_heads,
                                       hidden_size=hidden_size, opt_level=opt_level)
    except Exception as e:  # the fusion scripts raise assorted types on unexpected graphs
        raise ExportError(f"ONNX Runtime fusion of {Path(path).name} ({model_type}) failed: "
                          f"{type(e).__name__}: {e}") from e
    big = model_bytes(optimized.model) > PROTOBUF_LIMIT
    optimized.save_model_to_file(str(out_path), use_external_data_format=big)
    return count_ops(optimized.model)
