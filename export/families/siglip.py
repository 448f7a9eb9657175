"""SigLIP in transformers (``model_type`` "siglip"): ViT image tower with an attention-pooling
head, bidirectional text tower pooled at the last token; sigmoid logits with a bias."""

from __future__ import annotations

import torch
from torch import nn

from clipfast.errors import ExportError
from clipfast.export.families import register
from clipfast.export.families._hf import TransformersFamily
from clipfast.export.families.base import (
    TEXT_KEYS,
    VIT_KEYS,
    AttentionSpec,
    TowerParts,
    config_sizes,
    hf_attention,
)

__all__ = ["SiglipFamily", "SiglipImageTower", "SiglipTextTower"]


class SiglipImageTower(nn.Module):
    """SigLIP image tower: pixel_values (N, 3, H, W) -> (N, D) attention-pooled head output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vision_model = model.vision_model
        if not getattr(self.vision_model, "use_head", True):
            raise ExportError("SigLIP vision config has vision_use_head=False: no image embedding")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values=pixel_values).pooler_output


class SiglipTextTower(nn.Module):
    """SigLIP text tower: input_ids int32 (N, L) -> (N, D) head of the last token.

    SigLIP is trained on ids padded to max length with no attention mask (bidirectional attention
    over the padding), so none is taken here either.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.text_model = model.text_model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_model(input_ids=input_ids.to(torch.int64)).pooler_output


@register
class SiglipFamily(TransformersFamily):
    name = "siglip"
    label = "siglip"
    model_types = ("siglip",)
    default_context = 64
    image_pooling = "attention-pooling head (MAP)"
    text_pooling = "last token, linear head"
    summary = "SigLIP (transformers SiglipModel; sigmoid logits with bias)"
    tower_classes = (SiglipImageTower, SiglipTextTower)

    def build_towers(self, model: nn.Module, name: str) -> TowerParts:
        config = model.config
        tc, vc = config.text_config, config.vision_config
        embed_dim = int(vc.hidden_size)
        text_dim = int(getattr(tc, "projection_size", None) or tc.hidden_size)
        if text_dim != embed_dim:
            raise ExportError(
                f"SigLIP text projection_size {text_dim} != vision hidden_size {embed_dim}"
            )
        return TowerParts(
            image_tower=SiglipImageTower(model),
            text_tower=SiglipTextTower(model),
            text_inputs=("input_ids",),
            embed_dim=embed_dim,
            logits={"kind": "sigmoid", "scale": float(model.logit_scale.detach().exp()),
                    "bias": float(model.logit_bias.detach())},
            architecture=dict(vision=config_sizes(vc, VIT_KEYS), text=config_sizes(tc, TEXT_KEYS),
                              text_pooling="last_token"),
        )

    def attention(self, tower: nn.Module, which: str) -> tuple[AttentionSpec | None, str | None]:
        model = tower.vision_model if isinstance(tower, SiglipImageTower) else tower.text_model
        return hf_attention(model.config, "clip"), None
