"""OpenAI CLIP checkpoints in transformers (``model_type`` "clip"): ViT image tower with the
projected CLS token, causal text tower pooled at the EOS token."""

from __future__ import annotations

import torch
from torch import nn

from clipfast.errors import ExportError
from clipfast.export.families import register
from clipfast.export.families._hf import TransformersFamily, causal_mask, gather_rows
from clipfast.export.families.base import (
    TEXT_KEYS,
    VIT_KEYS,
    AttentionSpec,
    TowerParts,
    config_sizes,
    hf_attention,
)

__all__ = ["CLIPImageTower", "CLIPTextTower", "ClipFamily", "clip_towers"]


class CLIPImageTower(nn.Module):
    """CLIP / MetaCLIP 2 image tower: pixel_values (N, 3, H, W) -> (N, D) projected CLS, not
    normalised (= ``get_image_features(...).pooler_output``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vision_model = model.vision_model
        self.visual_projection = model.visual_projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.vision_model(pixel_values=pixel_values)
        return self.visual_projection(out.pooler_output)


class CLIPTextTower(nn.Module):
    """CLIP / MetaCLIP 2 text tower: input_ids int32 (N, L) -> (N, D) projected EOS features.

    Pooling as CLIPTextTransformer does it: with the legacy config ``eos_token_id == 2`` (released
    OpenAI / MetaCLIP v1 repos) the position of the largest id (EOT is the largest id in the CLIP
    vocab); otherwise the first position equal to ``eos_token_id``. MetaCLIP 2 always uses the
    first-EOS rule (its ``eos_token_id`` is 2 = XLM-R ``</s>``). Both are ArgMax on int32, which
    returns the first maximal index in PyTorch and ONNX alike. Attention is causal, so padding
    after EOS never reaches the pooled token and no attention mask is needed.
    """

    def __init__(self, model: nn.Module, *, eos_token_id: int, argmax_ids: bool):
        super().__init__()
        self.text_model = model.text_model
        self.text_projection = model.text_projection
        self.eos_token_id = int(eos_token_id)
        self.argmax_ids = bool(argmax_ids)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids32 = input_ids.to(torch.int32)
        ids = ids32.to(torch.int64)
        mask = causal_mask(ids, self.text_projection.weight.dtype)
        out = self.text_model(input_ids=ids, attention_mask=mask)
        hidden = out.last_hidden_state  # (N, L, W), final LayerNorm applied
        if self.argmax_ids:  # config value, fixed at construction: not data-dependent
            index = ids32.argmax(dim=-1)
        else:
            index = (ids32 == self.eos_token_id).to(torch.int32).argmax(dim=-1)
        return self.text_projection(gather_rows(hidden, index))


def clip_towers(model: nn.Module, model_type: str) -> TowerParts:
    """Towers of a CLIP-architecture dual encoder (clip, metaclip_2)."""
    config = model.config
    tc, vc = config.text_config, config.vision_config
    eos = tc.eos_token_id
    if not isinstance(eos, int):
        raise ExportError(
            f"{model_type} text config eos_token_id must be one integer (text pooling finds "
            f"it in the ids), got {eos!r}"
        )
    # CLIP keeps the pre-#24773 behaviour for eos_token_id == 2; MetaCLIP 2 never does
    argmax_ids = model_type == "clip" and eos == 2
    embed_dim = int(config.projection_dim)
    return TowerParts(
        image_tower=CLIPImageTower(model),
        text_tower=CLIPTextTower(model, eos_token_id=eos, argmax_ids=argmax_ids),
        text_inputs=("input_ids",),
        embed_dim=embed_dim,
        logits={"kind": "softmax", "scale": float(model.logit_scale.detach().exp()),
                "bias": None},
        architecture=dict(vision=config_sizes(vc, VIT_KEYS), text=config_sizes(tc, TEXT_KEYS),
                          projection_dim=embed_dim,
                          text_pooling="argmax_ids" if argmax_ids else f"first_eos({eos})"),
    )


@register
class ClipFamily(TransformersFamily):
    """CLIP-architecture dual encoders; the MetaCLIP families subclass it (same towers)."""

    name = "clip"
    label = "clip"
    model_types = ("clip",)
    default_context = 77
    image_pooling = "CLS token, post-LayerNorm, linear projection"
    text_pooling = "EOT token (argmax of ids, or first eos_token_id), linear projection"
    summary = "OpenAI CLIP (transformers CLIPModel)"
    tower_classes = (CLIPImageTower, CLIPTextTower)

    def build_towers(self, model: nn.Module, name: str) -> TowerParts:
        return clip_towers(model, self.model_types[0])

    def attention(self, tower: nn.Module, which: str) -> tuple[AttentionSpec | None, str | None]:
        model = tower.vision_model if isinstance(tower, CLIPImageTower) else tower.text_model
        return hf_attention(model.config, "clip"), None

    def text_padding_free(self, tower: nn.Module) -> tuple[bool, str]:
        """Causal attention, pooled at the (first) EOS token."""
        if isinstance(tower, CLIPTextTower):
            return True, "causal attention and EOS-token pooling"
        return False, "not a CLIP text tower"
