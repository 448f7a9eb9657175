"""OpenCLIP ViT: open_clip VisionTransformer and text transformer, the default open_clip family
(also QuickGELU MetaCLIP v1, MetaCLIP 2 worldwide, CLIPA, DFN, OpenAI configs)."""

from __future__ import annotations

from typing import Any

from clipfast.export.families import register
from clipfast.export.families._openclip import OpenClipFamily


@register
class OpenClipVitFamily(OpenClipFamily):
    name = "openclip-vit"
    label = "openclip"
    priority = 0
    image_pooling = "CLS token or token mean (global_average_pool), ln_post, proj"
    text_pooling = ("EOT token (argmax of ids) or the config's pool_type, ln_final, "
                    "text_projection")
    summary = ("OpenCLIP ViT: open_clip VisionTransformer + text transformer (also QuickGELU "
               "MetaCLIP v1, MetaCLIP 2 worldwide, CLIPA, DFN, OpenAI)")
    layer_names = ("resblocks",)

    def claims_open_clip(self, model_name: str, cfg: dict[str, Any]) -> bool:
        return True
