"""`transformers:` model sources: CLIP (OpenAI, MetaCLIP v1 repos), MetaCLIP 2, ALIGN, SigLIP.

``load_transformers_source("ORG/NAME" | DIR)`` loads the checkpoint with the transformers Auto
classes and hands it to the family registered for its ``config.model_type``
(``clipfast.export.families``; the name only tells MetaCLIP v1 repos from OpenAI CLIP), whose
module wraps the two towers in small export-friendly modules that reproduce
``get_image_features`` / ``get_text_features``:

- no Python control flow on tensor values (masks and pooling indices are computed with tensor ops,
  so a traced graph is right for every input, padded or not);
- integer inputs arrive as int32 (what the runtime feeds) and are cast to int64 inside;
- eager attention, masks written so the traced graph matches ONNX Runtime's attention fusions
  (CLIP causal pattern, transformers-5 BERT mask pattern).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from clipfast.errors import ExportError
from clipfast.export import families
from clipfast.export.families.align import AlignImageTower, AlignTextTower
from clipfast.export.families.clip import CLIPImageTower, CLIPTextTower
from clipfast.export.families.siglip import SiglipImageTower, SiglipTextTower

if TYPE_CHECKING:
    from clipfast.export.source import SourceModel

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "AlignImageTower",
    "AlignTextTower",
    "CLIPImageTower",
    "CLIPTextTower",
    "HFTowers",
    "SiglipImageTower",
    "SiglipTextTower",
    "build_towers",
    "load_transformers_source",
    "load_transformers_towers",
]

# transformers model types some family builds (clipfast.export.families)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = families.supported_model_types()
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# "ORG/NAME" or "NAME"; anything else (absolute, relative with more parts, ~) is a directory
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class HFTowers:
    """A loaded transformers dual encoder and its export-friendly towers (no pre/post-processing).

    logits: ``{"kind", "scale", "bias"}`` (LogitsConfig fields).
    """

    model_type: str
    family: str
    model: nn.Module
    image_tower: nn.Module
    text_tower: nn.Module
    text_inputs: tuple[str, ...]
    embed_dim: int
    max_positions: int
    logits: dict[str, Any]
    architecture: dict[str, Any] = field(default_factory=dict)
    spec: dict[str, Any] = field(default_factory=dict)
    # the registry key of the family that built the towers
    spec_name: str = ""


def build_towers(model: nn.Module, *, name: str = "") -> HFTowers:
    """Wrap an already loaded transformers dual encoder (eval, float32) into export towers: the
    family of its ``config.model_type`` (``clipfast.export.families``) builds them.

    name: the hub id or directory, for families told apart by name (MetaCLIP v1 from CLIP).
    """
    config = model.config
    model_type = config.model_type
    spec = families.for_transformers(model_type, config, name)
    parts = spec.build_towers(model, name)
    parts.image_tower.eval()
    parts.text_tower.eval()
    return HFTowers(
        model_type=model_type,
        family=spec.label_for(name, ""),
        model=model,
        image_tower=parts.image_tower,
        text_tower=parts.text_tower,
        text_inputs=parts.text_inputs,
        embed_dim=parts.embed_dim,
        max_positions=int(config.text_config.max_position_embeddings),
        logits=parts.logits,
        architecture={"model_type": model_type, **parts.architecture},
        spec_name=spec.name,
    )


def _resolve(id_or_dir: str) -> tuple[str, bool]:
    """-> (path or hub id, is_local). Anything that looks like a path must exist as a directory."""
    if not id_or_dir or not isinstance(id_or_dir, str):
        raise ExportError(
            f"transformers source: expected 'ORG/NAME' or a directory, got {id_or_dir!r}"
        )
    expanded = os.path.expanduser(id_or_dir)
    if os.path.isdir(expanded):
        path = Path(expanded).resolve()
        if not (path / "config.json").is_file():
            raise ExportError(
                f"transformers:{id_or_dir}: directory has no config.json; expected a directory "
                "written by save_pretrained (config.json, weights, processor and tokenizer files)"
            )
        return str(path), True
    if not _HUB_ID_RE.match(id_or_dir):
        raise ExportError(
            f"transformers:{id_or_dir}: no such directory (give an existing directory written by "
            "save_pretrained, or a hub id 'ORG/NAME')"
        )
    return id_or_dir, False


def load_transformers_towers(
    id_or_dir: str, *, device: str | torch.device = "cpu", revision: str | None = None
) -> HFTowers:
    """Load ``ORG/NAME`` (hub or local cache) or a local directory and build its towers.

    The model is float32, eval mode, eager attention; towers are on ``device``.
    """
    from transformers import AutoConfig, AutoModel

    source, local = _resolve(id_or_dir)
    commit: str | None = None
    if not local:
        from transformers.utils.hub import resolve_revision

        resolved = resolve_revision(source, revision)
        commit = getattr(resolved, "resolved", None) or (
            str(resolved) if resolved and _COMMIT_RE.match(str(resolved)) else None
        )
        revision = commit or revision
    # hub / cache failures come as OSError, huggingface_hub errors or ValueError: wrap them all,
    # keeping the cause chained
    try:
        config = AutoConfig.from_pretrained(source, revision=revision)
    except Exception as exc:
        raise ExportError(
            f"transformers:{id_or_dir}: cannot load config ({type(exc).__name__}: {exc}); give "
            "a directory written by save_pretrained or a hub id present in the local cache"
        ) from exc
    model_type = getattr(config, "model_type", None)
    supported = families.supported_model_types()
    if model_type not in supported:
        raise ExportError(
            f"transformers:{id_or_dir}: model_type {model_type!r} is not supported; supported "
            f"model types: {', '.join(supported)}"
        )
    try:
        model = AutoModel.from_pretrained(
            source, revision=revision, dtype=torch.float32, attn_implementation="eager"
        )
    except Exception as exc:
        raise ExportError(
            f"transformers:{id_or_dir}: cannot load model weights ({type(exc).__name__}: {exc})"
        ) from exc
    model = model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    towers = build_towers(model, name=id_or_dir)
    towers.spec = {
        "loader": "transformers",
        "model": "transformers:" + source,
        "revision": commit,
    }
    return towers


def _context_length(tokenizer: Any, towers: HFTowers) -> int:
    declared = getattr(tokenizer, "model_max_length", None)
    # tokenizers without a limit report a huge sentinel (int(1e30))
    if not isinstance(declared, int) or declared <= 0 or declared > 100_000:
        declared = families.get(towers.spec_name).default_context
    return min(declared, towers.max_positions)


def load_transformers_source(
    id_or_dir: str, *, device: str | torch.device = "cpu", revision: str | None = None
) -> SourceModel:
    """``transformers:ORG/NAME`` or ``transformers:DIR`` -> SourceModel.

    Image processor and tokenizer come from the same id / directory (and revision) as the model.
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    from clipfast.artifact.spec import LogitsConfig
    from clipfast.export.source import SourceModel

    towers = load_transformers_towers(id_or_dir, device=device, revision=revision)
    source = towers.spec["model"].removeprefix("transformers:")
    rev = towers.spec["revision"] or revision
    try:
        image_processor = AutoImageProcessor.from_pretrained(source, revision=rev)
        tokenizer = AutoTokenizer.from_pretrained(source, revision=rev)
    except Exception as exc:
        raise ExportError(
            f"transformers:{id_or_dir}: cannot load image processor / tokenizer "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    family = families.get(towers.spec_name)
    preprocess, reference_transform = family.preprocess(image_processor)
    context_length = _context_length(tokenizer, towers)
    tok_config, tok_json, reference_tokenize = family.tokenizer(
        tokenizer, context_length, towers.text_inputs
    )
    architecture = dict(towers.architecture, context_length=context_length)
    return SourceModel(
        loader="transformers",
        family=towers.family,
        spec=towers.spec,
        image_tower=towers.image_tower,
        text_tower=towers.text_tower,
        text_inputs=towers.text_inputs,
        embed_dim=towers.embed_dim,
        preprocess=preprocess,
        reference_transform=reference_transform,
        tokenizer=tok_config,
        tokenizer_json=tok_json,
        reference_tokenize=reference_tokenize,
        logits=LogitsConfig(**towers.logits),
        architecture=architecture,
    )
