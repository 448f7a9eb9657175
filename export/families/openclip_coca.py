"""CoCa: its contrastive embedding towers (the captioning decoder is not exported)"""

from __future__ import annotations

from typing import Any

from clipfast.export.families._openclip import open_clip_family


def claims(model_name: str, cfg: dict[str, Any]) -> bool:
    # CoCa configs carry the captioning decoder's multimodal_cfg
    return "multimodal_cfg" in cfg or model_name.lower().startswith("coca")


FAMILY = open_clip_family(
    "openclip-coca", priority=30, claims=claims,
    image_pooling="attentional pooler: first pooled token (contrastive embedding)",
    text_pooling="CLS token appended after the text (non-causal to it), ln_final, projection",
    summary="CoCa: its contrastive embedding towers (the captioning decoder is not exported)")
