"""EVA01 / EVA02 image towers (timm Eva: rotary embeddings, SwiGLU in EVA02)"""

from __future__ import annotations

from typing import Any

from clipfast.export.families import register
from clipfast.export.families._openclip import OpenClipFamily, timm_name


@register
class OpenClipEvaFamily(OpenClipFamily):
    name = "openclip-eva"
    label = "openclip"
    priority = 10
    image_pooling = "timm Eva CLS token, linear projection"
    text_pooling = "EOT token (argmax of ids), ln_final, text_projection"
    summary = "EVA01 / EVA02 image towers (timm Eva: rotary embeddings, SwiGLU in EVA02)"
    layer_names = ("resblocks", "blocks")

    def claims_open_clip(self, model_name: str, cfg: dict[str, Any]) -> bool:
        return timm_name(cfg).startswith("eva")
