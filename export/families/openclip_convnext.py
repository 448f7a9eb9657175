"""OpenCLIP ConvNeXt image towers (timm convnext_*)"""

from __future__ import annotations

from clipfast.export.families._openclip import timm_family

FAMILY = timm_family(
    "openclip-convnext", timm_prefix="convnext", priority=10,
    image_pooling="timm global average pool, linear or MLP projection",
    summary="OpenCLIP ConvNeXt image towers (timm convnext_*)")
