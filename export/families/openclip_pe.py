"""Perception Encoder PE-Core (timm vit_pe_core_*: rotary 2D positions, attention pool)"""

from __future__ import annotations

from clipfast.export.families._openclip import timm_family

FAMILY = timm_family(
    "openclip-pe", timm_prefix="vit_pe_core", priority=10,
    image_pooling="timm PE-Core attention pool, projection",
    summary="Perception Encoder PE-Core (timm vit_pe_core_*: rotary 2D positions, attention pool)")
