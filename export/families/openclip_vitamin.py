"""ViTamin image towers (timm vitamin_*)"""

from __future__ import annotations

from typing import Any

from clipfast.export.families import register
from clipfast.export.families._openclip import OpenClipFamily, timm_name


@register
class OpenClipVitaminFamily(OpenClipFamily):
    name = "openclip-vitamin"
    label = "openclip"
    priority = 10
    image_pooling = "timm ViTamin (MbConv stem + ViT), global pool"
    text_pooling = "EOT token (argmax of ids), ln_final, text_projection"
    summary = "ViTamin image towers (timm vitamin_*)"
    layer_names = ("resblocks", "blocks")

    def claims_open_clip(self, model_name: str, cfg: dict[str, Any]) -> bool:
        return timm_name(cfg).startswith("vitamin")
