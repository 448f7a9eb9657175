"""EVA01 / EVA02 image towers (timm Eva: rotary embeddings, SwiGLU in EVA02)"""

from __future__ import annotations

from clipfast.export.families._openclip import timm_family

FAMILY = timm_family(
    "openclip-eva", timm_prefix="eva", priority=10,
    image_pooling="timm Eva CLS token, linear projection",
    summary="EVA01 / EVA02 image towers (timm Eva: rotary embeddings, SwiGLU in EVA02)")
