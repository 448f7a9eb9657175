"""MobileCLIP and MobileCLIP2 (timm FastViT MCi and ViT-MCi image towers)"""

from __future__ import annotations

from typing import Any

from clipfast.export.families._openclip import TIMM_LAYER_NAMES, open_clip_family, timm_name


def claims(model_name: str, cfg: dict[str, Any]) -> bool:
    return model_name.startswith("MobileCLIP") or "mci" in timm_name(cfg)


FAMILY = open_clip_family(
    "openclip-mobileclip", priority=11, claims=claims, layer_names=TIMM_LAYER_NAMES,
    image_pooling="FastViT/MCi conv-attention stages, global pool, projection",
    text_pooling="EOT token (argmax of ids); causal or not per config",
    summary="MobileCLIP and MobileCLIP2 (timm FastViT MCi and ViT-MCi image towers)")
