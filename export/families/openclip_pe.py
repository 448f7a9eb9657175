"""Perception Encoder PE-Core (timm vit_pe_core_*: rotary 2D positions, attention pool)"""

from __future__ import annotations

from typing import Any

from clipfast.export.families import register
from clipfast.export.families._openclip import OpenClipFamily, timm_name


@register
class OpenClipPeFamily(OpenClipFamily):
    name = "openclip-pe"
    label = "openclip"
    priority = 10
    image_pooling = "timm PE-Core attention pool, projection"
    text_pooling = "EOT token (argmax of ids), ln_final, text_projection"
    summary = "Perception Encoder PE-Core (timm vit_pe_core_*: rotary 2D positions, attention pool)"
    layer_names = ("resblocks", "blocks")

    def claims_open_clip(self, model_name: str, cfg: dict[str, Any]) -> bool:
        return timm_name(cfg).startswith("vit_pe_core")
