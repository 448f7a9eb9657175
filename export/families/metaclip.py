"""MetaCLIP v1 repos in transformers: plain CLIP configs (``model_type`` "clip"), told apart
from OpenAI CLIP by the repo / directory name only. Same towers; QuickGELU comes from the
config's ``hidden_act``."""

from __future__ import annotations

from typing import Any

from clipfast.export.families import register
from clipfast.export.families.clip import ClipFamily


@register
class MetaClipFamily(ClipFamily):
    name = "metaclip"
    label = "metaclip"
    priority = 1
    summary = "MetaCLIP v1 (transformers CLIPModel repos facebook/metaclip-*; QuickGELU)"

    def claims_transformers(self, model_type: str, config: Any, name: str) -> bool:
        if model_type != "clip":
            return False
        hints = (name, str(getattr(config, "_name_or_path", "") or ""))
        return any("metaclip" in h.lower() for h in hints)

    def owns_tower(self, tower: Any) -> bool:
        return False  # its towers are CLIP's: attention and fusion as ClipFamily
