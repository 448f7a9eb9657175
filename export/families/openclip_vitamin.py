"""ViTamin image towers (timm vitamin_*)"""

from __future__ import annotations

from clipfast.export.families._openclip import timm_family

FAMILY = timm_family(
    "openclip-vitamin", timm_prefix="vitamin", priority=10,
    image_pooling="timm ViTamin (MbConv stem + ViT), global pool",
    summary="ViTamin image towers (timm vitamin_*)")
