"""OpenCLIP ModifiedResNet image towers (RN50, RN101, RN50x4 ... RN50x64)"""

from __future__ import annotations

from typing import Any

from clipfast.export.families import register
from clipfast.export.families._openclip import OpenClipFamily


@register
class OpenClipResNetFamily(OpenClipFamily):
    name = "openclip-resnet"
    label = "openclip"
    priority = 10
    image_pooling = "attention pool (AttentionPool2d, query = mean token)"
    text_pooling = "EOT token (argmax of ids), ln_final, text_projection"
    summary = "OpenCLIP ModifiedResNet image towers (RN50, RN101, RN50x4 ... RN50x64)"
    layer_names = ("resblocks",)

    def claims_open_clip(self, model_name: str, cfg: dict[str, Any]) -> bool:
        return isinstance((cfg.get("vision_cfg") or {}).get("layers"), (list, tuple))
