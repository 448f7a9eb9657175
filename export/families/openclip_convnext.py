"""OpenCLIP ConvNeXt image towers (timm convnext_*)"""

from __future__ import annotations

from typing import Any

from clipfast.export.families import register
from clipfast.export.families._openclip import OpenClipFamily, timm_name


@register
class OpenClipConvNextFamily(OpenClipFamily):
    name = "openclip-convnext"
    label = "openclip"
    priority = 10
    image_pooling = "timm global average pool, linear or MLP projection"
    text_pooling = "EOT token (argmax of ids), ln_final, text_projection"
    summary = "OpenCLIP ConvNeXt image towers (timm convnext_*)"
    layer_names = ("resblocks", "blocks")

    def claims_open_clip(self, model_name: str, cfg: dict[str, Any]) -> bool:
        return timm_name(cfg).startswith("convnext")
