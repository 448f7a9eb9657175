"""Multilingual / HF text towers in open_clip (xlm-roberta, mt5, nllb, roberta)"""

from __future__ import annotations

from typing import Any

from clipfast.export.families._openclip import open_clip_family


def claims(model_name: str, cfg: dict[str, Any]) -> bool:
    return bool((cfg.get("text_cfg") or {}).get("hf_model_name"))


FAMILY = open_clip_family(
    "openclip-multilingual", priority=20, claims=claims,
    layer_names=("resblocks", "layers", "layer", "blocks", "block"),
    image_pooling="the image family's pooling (ViT CLS / SigLIP MAP)",
    text_pooling=("transformers encoder (XLM-R, RoBERTa, mT5 / NLLB encoders): mean or CLS "
                  "pooler, linear or MLP projection"),
    summary="Multilingual / HF text towers in open_clip (xlm-roberta, mt5, nllb, roberta)")
