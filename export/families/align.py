"""ALIGN in transformers (``model_type`` "align"): EfficientNet image tower pooled by a global
mean (no projection), BERT text tower with the projected CLS state."""

from __future__ import annotations

import torch
from torch import nn

from clipfast.errors import ExportError
from clipfast.export.families import register
from clipfast.export.families._hf import TransformersFamily
from clipfast.export.families.base import (
    TEXT_KEYS,
    AttentionSpec,
    TowerParts,
    config_sizes,
    hf_attention,
)

__all__ = ["AlignFamily", "AlignImageTower", "AlignTextTower"]


class AlignImageTower(nn.Module):
    """ALIGN image tower: pixel_values (N, 3, H, W) -> (N, D) pooled top features, no projection.

    HF pools with ``AvgPool2d(hidden_dim, ceil_mode=True)``: a kernel far larger than the feature
    map whose ceil-mode window is clipped to the map, i.e. a plain global mean (divisor H*W). It is
    rewritten as ``mean`` over H, W so the export works at any input size and TensorRT does not see
    a 640x640 pooling window.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        vision = model.vision_model
        if vision.config.pooling_type != "mean":
            raise ExportError(
                f"ALIGN vision pooling_type {vision.config.pooling_type!r} is not supported "
                "(only 'mean', the released setting)"
            )
        self.embeddings = vision.embeddings
        self.encoder = vision.encoder

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embeddings(pixel_values)).last_hidden_state  # (N, C, h, w)
        return hidden.mean(dim=(2, 3))


class AlignTextTower(nn.Module):
    """ALIGN text tower: input_ids, attention_mask int32 (N, L) -> (N, D) projection of the BERT
    CLS state (not BERT's tanh pooler), as ``get_text_features``; token_type_ids are all 0."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.text_model = model.text_model
        self.text_projection = model.text_projection

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to(torch.int64)
        # HF builds the additive mask from the 2D one. Under tracing it never takes its
        # "no padding -> no mask" shortcut (guarded by is_tracing), so the graph is right for
        # padded batches even when traced on an unpadded one; the tests check exactly that.
        # Its traced pattern is the one ONNX Runtime's BERT fusion knows ("transformers 5 eager
        # mask"): Attention and EmbedLayerNormalization fuse.
        out = self.text_model(input_ids=ids, attention_mask=attention_mask.to(torch.int64))
        return self.text_projection(out.last_hidden_state[:, 0, :])


@register
class AlignFamily(TransformersFamily):
    name = "align"
    label = "align"
    model_types = ("align",)
    default_context = 64
    image_pooling = "global mean of the top conv features (no projection)"
    text_pooling = "CLS state, linear projection"
    summary = "ALIGN (transformers AlignModel: EfficientNet-B7 + BERT)"
    tower_classes = (AlignImageTower, AlignTextTower)

    def build_towers(self, model: nn.Module, name: str) -> TowerParts:
        config = model.config
        image_tower = AlignImageTower(model)
        embed_dim = int(config.projection_dim)
        vision_dim = image_tower.encoder.blocks[-1].projection.project_conv.out_channels
        if vision_dim != embed_dim:
            raise ExportError(
                f"ALIGN image features have {vision_dim} channels but text projection_dim is "
                f"{embed_dim}: the towers do not share an embedding space"
            )
        return TowerParts(
            image_tower=image_tower,
            text_tower=AlignTextTower(model),
            text_inputs=("input_ids", "attention_mask"),
            embed_dim=embed_dim,
            logits={"kind": "softmax", "scale": float(1.0 / model.temperature.detach()),
                    "bias": None},
            architecture=dict(
                vision=config_sizes(config.vision_config, (
                    "image_size", "width_coefficient", "depth_coefficient", "hidden_dim",
                    "hidden_act", "num_hidden_layers")),
                text=config_sizes(config.text_config, TEXT_KEYS), projection_dim=embed_dim,
                text_pooling="cls"),
        )

    def text_padding_free(self, tower: nn.Module) -> tuple[bool, str]:
        if isinstance(tower, AlignTextTower):
            return True, "attention mask over the padding, CLS pooling"
        return False, "not an ALIGN text tower"

    def attention(self, tower: nn.Module, which: str) -> tuple[AttentionSpec | None, str | None]:
        if isinstance(tower, AlignImageTower):
            return None, "convolutional tower (EfficientNet): no attention to fuse"
        return hf_attention(tower.text_model.config, "bert"), None
