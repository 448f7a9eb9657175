"""MetaCLIP 2 (worldwide) in transformers (``model_type`` "metaclip_2"): CLIP towers with an
XLM-R vocabulary; text pooled at the first ``</s>`` (eos_token_id 2)."""

from __future__ import annotations

from torch import nn

from clipfast.export.families import register
from clipfast.export.families._hf import TransformersFamily
from clipfast.export.families.base import AttentionSpec, TowerParts
from clipfast.export.families.clip import clip_attention, clip_padding_free, clip_towers


@register
class MetaClip2Family(TransformersFamily):
    name = "metaclip2"
    label = "metaclip2"
    model_types = ("metaclip_2",)
    default_context = 77
    image_pooling = "CLS token, post-LayerNorm, linear projection"
    text_pooling = "first eos_token_id (</s>), linear projection"
    summary = "MetaCLIP 2 worldwide (transformers MetaClip2Model, XLM-V tokenizer)"

    def build_towers(self, model: nn.Module, name: str) -> TowerParts:
        return clip_towers(model, "metaclip_2")

    def owns_tower(self, tower: object) -> bool:
        return False  # CLIPImageTower / CLIPTextTower: fused as ClipFamily does

    def attention(self, tower: nn.Module, which: str) -> tuple[AttentionSpec | None, str | None]:
        return clip_attention(tower, which)

    def text_padding_free(self, tower: nn.Module) -> tuple[bool, str]:
        return clip_padding_free(tower)
