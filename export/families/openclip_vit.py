"""OpenCLIP ViT: open_clip VisionTransformer and text transformer, the default open_clip family
(also QuickGELU MetaCLIP v1, MetaCLIP 2 worldwide, CLIPA, DFN, OpenAI configs)."""

from __future__ import annotations

from typing import Any

from clipfast.export.families._openclip import open_clip_family


def claims(model_name: str, cfg: dict[str, Any]) -> bool:
    # every config: at priority 0, any more specific family wins
    return True


FAMILY = open_clip_family(
    "openclip-vit", priority=0, claims=claims,
    image_pooling="CLS token or token mean (global_average_pool), ln_post, proj",
    text_pooling="EOT token (argmax of ids) or the config's pool_type, ln_final, text_projection",
    summary=("OpenCLIP ViT: open_clip VisionTransformer + text transformer (also QuickGELU "
             "MetaCLIP v1, MetaCLIP 2 worldwide, CLIPA, DFN, OpenAI)"))
