"""Other timm image towers in open_clip (Swin, timm ViTs with relpos / GAP)"""

from __future__ import annotations

from typing import Any

from clipfast.export.families._openclip import TIMM_LAYER_NAMES, open_clip_family, timm_name


def claims(model_name: str, cfg: dict[str, Any]) -> bool:
    # any timm trunk; the families of specific timm models outrank this one (priority)
    return bool(timm_name(cfg))


FAMILY = open_clip_family(
    "openclip-timm", priority=5, claims=claims, layer_names=(*TIMM_LAYER_NAMES, "block"),
    image_pooling="the timm model's pooling, linear projection",
    summary="Other timm image towers in open_clip (Swin, timm ViTs with relpos / GAP)")
