"""SigLIP and SigLIP 2 in open_clip (timm ViT with MAP head, sigmoid logits)"""

from __future__ import annotations

from typing import Any

from clipfast.export.families._openclip import TIMM_LAYER_NAMES, open_clip_family, timm_name


def claims(model_name: str, cfg: dict[str, Any]) -> bool:
    return "siglip" in timm_name(cfg)


FAMILY = open_clip_family(
    "openclip-siglip", label="siglip", priority=10, claims=claims, layer_names=TIMM_LAYER_NAMES,
    image_pooling="timm attention-pooling head (MAP)",
    text_pooling="last token, non-causal, linear head",
    summary="SigLIP and SigLIP 2 in open_clip (timm ViT with MAP head, sigmoid logits)")
