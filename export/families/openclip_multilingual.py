"""Multilingual / HF text towers in open_clip (xlm-roberta, mt5, nllb, roberta)"""

from __future__ import annotations

from typing import Any

from clipfast.export.families import register
from clipfast.export.families._openclip import OpenClipFamily


@register
class OpenClipMultilingualFamily(OpenClipFamily):
    name = "openclip-multilingual"
    label = "openclip"
    priority = 20
    image_pooling = "the image family's pooling (ViT CLS / SigLIP MAP)"
    text_pooling = ("transformers encoder (XLM-R, RoBERTa, mT5 / NLLB encoders): mean or CLS "
                    "pooler, linear or MLP projection")
    summary = "Multilingual / HF text towers in open_clip (xlm-roberta, mt5, nllb, roberta)"
    layer_names = ("resblocks", "layers", "layer", "blocks", "block")

    def claims_open_clip(self, model_name: str, cfg: dict[str, Any]) -> bool:
        return bool((cfg.get("text_cfg") or {}).get("hf_model_name"))
