"""MetaCLIP 2 (worldwide) in transformers (``model_type`` "metaclip_2"): CLIP towers with an
XLM-R vocabulary; text pooled at the first ``</s>`` (eos_token_id 2)."""

from __future__ import annotations

from clipfast.export.families import register
from clipfast.export.families.clip import ClipFamily


@register
class MetaClip2Family(ClipFamily):
    """ClipFamily's towers (``clip_towers`` picks first-EOS pooling for metaclip_2), attention
    and padding rule, for its own model type."""

    name = "metaclip2"
    label = "metaclip2"
    model_types = ("metaclip_2",)
    text_pooling = "first eos_token_id (</s>), linear projection"
    summary = "MetaCLIP 2 worldwide (transformers MetaClip2Model, XLM-V tokenizer)"

    def owns_tower(self, tower: object) -> bool:
        return False  # CLIPImageTower / CLIPTextTower: fused as ClipFamily does
