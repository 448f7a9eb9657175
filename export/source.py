"""The loaded source model: two export-friendly towers plus everything the manifest records."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from clipfast.artifact.spec import LogitsConfig
from clipfast.inputs.preprocess import PreprocessConfig
from clipfast.inputs.tokenizer import TokenizerConfig


@dataclass
class SourceModel:
    """A source checkpoint prepared for export and for reference measurements.

    image_tower: ``forward(pixel_values: float32 (batch, 3, H, W)) -> (batch, D)`` embeddings,
        not L2-normalised.
    text_tower: ``forward(input_ids: int32 (batch, L)[, attention_mask: int32 (batch, L)])
        -> (batch, D)``, not L2-normalised; the input names are ``text_inputs`` in that order.
    reference_transform: the source's own image transform, ``PIL.Image (RGB) -> float32 (3, H, W)``.
    reference_tokenize: the source's own tokenizer, ``list[str] -> {name: int64 (batch, L)}`` with
        the keys of ``text_inputs``.
    spec: the ``source`` section of the manifest, enough to load this model again
        (``clipfast.export.sources.load_source(spec)``).
    """

    loader: str
    family: str
    spec: dict[str, Any]
    image_tower: torch.nn.Module
    text_tower: torch.nn.Module
    text_inputs: tuple[str, ...]
    embed_dim: int
    preprocess: PreprocessConfig
    reference_transform: Callable[[Image.Image], np.ndarray]
    tokenizer: TokenizerConfig
    tokenizer_json: str
    reference_tokenize: Callable[[list[str]], dict[str, np.ndarray]]
    logits: LogitsConfig
    architecture: dict[str, Any] = field(default_factory=dict)
    random_weights: bool = False


def weights_fingerprint(source: SourceModel) -> str:
    """sha256 over the names, shapes and bytes of both towers' parameters and buffers, in name
    order (a tensor shared by both towers under one name is hashed once)."""
    tensors = {**source.image_tower.state_dict(), **source.text_tower.state_dict()}
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
