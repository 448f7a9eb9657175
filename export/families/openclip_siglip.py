"""SigLIP and SigLIP 2 in open_clip (timm ViT with MAP head, sigmoid logits)"""

from __future__ import annotations

from typing import Any

from clipfast.export.families import register
from clipfast.export.families._openclip import OpenClipFamily, timm_name


@register
class OpenClipSiglipFamily(OpenClipFamily):
    name = "openclip-siglip"
    label = "siglip"
    priority = 10
    image_pooling = "timm attention-pooling head (MAP)"
    text_pooling = "last token, non-causal, linear head"
    summary = "SigLIP and SigLIP 2 in open_clip (timm ViT with MAP head, sigmoid logits)"
    layer_names = ("resblocks", "blocks")

    def claims_open_clip(self, model_name: str, cfg: dict[str, Any]) -> bool:
        return "siglip" in timm_name(cfg)
