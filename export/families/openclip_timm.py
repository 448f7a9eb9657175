"""Other timm image towers in open_clip (Swin, timm ViTs with relpos / GAP)"""

from __future__ import annotations

from typing import Any

from clipfast.export.families import register
from clipfast.export.families._openclip import OpenClipFamily, timm_name


@register
class OpenClipTimmFamily(OpenClipFamily):
    name = "openclip-timm"
    label = "openclip"
    priority = 5
    image_pooling = "the timm model's pooling, linear projection"
    text_pooling = "EOT token (argmax of ids), ln_final, text_projection"
    summary = "Other timm image towers in open_clip (Swin, timm ViTs with relpos / GAP)"
    layer_names = ("resblocks", "blocks", "block")

    def claims_open_clip(self, model_name: str, cfg: dict[str, Any]) -> bool:
        return bool(timm_name(cfg))
