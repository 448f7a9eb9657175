"""MobileCLIP and MobileCLIP2 (timm FastViT MCi and ViT-MCi image towers)"""

from __future__ import annotations

from typing import Any

from clipfast.export.families import register
from clipfast.export.families._openclip import OpenClipFamily, timm_name


@register
class OpenClipMobileClipFamily(OpenClipFamily):
    name = "openclip-mobileclip"
    label = "openclip"
    priority = 11
    image_pooling = "FastViT/MCi conv-attention stages, global pool, projection"
    text_pooling = "EOT token (argmax of ids); causal or not per config"
    summary = "MobileCLIP and MobileCLIP2 (timm FastViT MCi and ViT-MCi image towers)"
    layer_names = ("resblocks", "blocks")

    def claims_open_clip(self, model_name: str, cfg: dict[str, Any]) -> bool:
        return model_name.startswith("MobileCLIP") or "mci" in timm_name(cfg)
