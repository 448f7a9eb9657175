"""Shared by the transformers families: masks and pooling written for export, and the readers
(image processor, tokenizer) every transformers family uses."""

from __future__ import annotations

from typing import Any

import torch

from clipfast.export.families.base import FamilySpec

__all__ = ["TransformersFamily", "causal_mask", "gather_rows", "neg_inf"]


def neg_inf(dtype: torch.dtype) -> float:
    # finfo.min, not -inf: a fully masked row then gives a uniform softmax instead of NaN
    return torch.finfo(dtype).min


def causal_mask(ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive causal mask ``(N, 1, L, L)`` for ids (N, L): 0 on and below the diagonal,
    finfo.min above. HF uses a ready 4D mask as-is.

    Written as Where(Less) -> Unsqueeze x2 -> Expand: the causal pattern ONNX Runtime's CLIP
    attention fusion recognises (it then fuses to Attention with unidirectional=1).
    """
    length = ids.shape[1]
    pos = torch.arange(length, device=ids.device)
    future = pos[:, None] < pos[None, :]  # (L, L): key position after query position
    zero = torch.zeros((), dtype=dtype, device=ids.device)
    mask = torch.where(future, neg_inf(dtype), zero)[None][None]
    return mask.expand(ids.shape[0], 1, length, length)


def gather_rows(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``hidden[b, index[b]]`` for each row: (N, L, W), (N,) -> (N, W), as one GatherElements."""
    idx = index.to(torch.int64).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
    return hidden.gather(1, idx).squeeze(1)


class TransformersFamily(FamilySpec):
    """A ``transformers:`` family: towers owned by class, HF processor and tokenizer readers."""

    loader = "transformers"
    # transformers encoders name their blocks "layers.N" (CLIP, SigLIP) or "layer.N" (BERT)
    layer_names = ("layers", "layer")
    tower_classes: tuple[type, ...] = ()

    def owns_tower(self, tower: Any) -> bool:
        return isinstance(tower, self.tower_classes)

    def preprocess(self, image_processor: Any) -> tuple[Any, Any]:
        from clipfast.export.preprocessing import hf_preprocess

        return hf_preprocess(image_processor)

    def tokenizer(self, tokenizer: Any, context_length: int | None = None,
                  text_inputs: tuple[str, ...] = ("input_ids",)) -> tuple[Any, str, Any]:
        from clipfast.export.tokenization import hf_tokenizer

        return hf_tokenizer(tokenizer, int(context_length or self.default_context or 77),
                            text_inputs)
