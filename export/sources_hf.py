"""`transformers:` model sources: CLIP (OpenAI, MetaCLIP v1 repos), MetaCLIP 2, ALIGN, SigLIP.

``load_transformers_source("ORG/NAME" | DIR)`` loads the checkpoint with the transformers Auto
classes, dispatches on ``config.model_type`` (never on the name) and wraps the two towers in small
export-friendly modules that reproduce ``get_image_features`` / ``get_text_features``:

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

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("align", "clip", "metaclip_2", "siglip")

# Used when the tokenizer does not state a usable model_max_length (released values).
_DEFAULT_CONTEXT = {"clip": 77, "metaclip_2": 77, "align": 64, "siglip": 64}
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# "ORG/NAME" or "NAME"; anything else (absolute, relative with more parts, ~) is a directory
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _neg_inf(dtype: torch.dtype) -> float:
    # finfo.min, not -inf: a fully masked row then gives a uniform softmax instead of NaN
    return torch.finfo(dtype).min


def _causal_mask(ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive causal mask ``(N, 1, L, L)`` for ids (N, L): 0 on and below the diagonal,
    finfo.min above. HF uses a ready 4D mask as-is.

    Written as Where(Less) -> Unsqueeze x2 -> Expand: the causal pattern ONNX Runtime's CLIP
    attention fusion recognises (it then fuses to Attention with unidirectional=1).
    """
    length = ids.shape[1]
    pos = torch.arange(length, device=ids.device)
    future = pos[:, None] < pos[None, :]  # (L, L): key position after query position
    zero = torch.zeros((), dtype=dtype, device=ids.device)
    mask = torch.where(future, _neg_inf(dtype), zero)[None][None]
    return mask.expand(ids.shape[0], 1, length, length)


def _gather_rows(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``hidden[b, index[b]]`` for each row: (N, L, W), (N,) -> (N, W), as one GatherElements."""
    idx = index.to(torch.int64).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
    return hidden.gather(1, idx).squeeze(1)


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
        mask = _causal_mask(ids, self.text_projection.weight.dtype)
        out = self.text_model(input_ids=ids, attention_mask=mask)
        hidden = out.last_hidden_state  # (N, L, W), final LayerNorm applied
        if self.argmax_ids:  # config value, fixed at construction: not data-dependent
            index = ids32.argmax(dim=-1)
        else:
            index = (ids32 == self.eos_token_id).to(torch.int32).argmax(dim=-1)
        return self.text_projection(_gather_rows(hidden, index))


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


class SiglipImageTower(nn.Module):
    """SigLIP image tower: pixel_values (N, 3, H, W) -> (N, D) attention-pooled head output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vision_model = model.vision_model
        if not getattr(self.vision_model, "use_head", True):
            raise ExportError("SigLIP vision config has vision_use_head=False: no image embedding")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values=pixel_values).pooler_output


class SiglipTextTower(nn.Module):
    """SigLIP text tower: input_ids int32 (N, L) -> (N, D) head of the last token.

    SigLIP is trained on ids padded to max length with no attention mask (bidirectional attention
    over the padding), so none is taken here either.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.text_model = model.text_model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_model(input_ids=input_ids.to(torch.int64)).pooler_output


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


def _sizes(cfg: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in keys if getattr(cfg, k, None) is not None}


_VIT_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "patch_size", "image_size", "hidden_act")
_TEXT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size", "max_position_embeddings", "hidden_act")


def _family(model_type: str, config: Any, name: str) -> str:
    if model_type == "clip":
        # MetaCLIP v1 repos are plain CLIP configs: only the repo / directory name tells them apart
        hints = (name, str(getattr(config, "_name_or_path", "") or ""))
        return "metaclip" if any("metaclip" in h.lower() for h in hints) else "clip"
    return {"metaclip_2": "metaclip2", "align": "align", "siglip": "siglip"}[model_type]


def build_towers(model: nn.Module, *, name: str = "") -> HFTowers:
    """Wrap an already loaded transformers dual encoder (eval, float32) into export towers.

    name: the hub id or directory, only used to tell MetaCLIP v1 from OpenAI CLIP.
    """
    config = model.config
    model_type = config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ExportError(
            f"transformers model_type {model_type!r} is not supported; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    tc, vc = config.text_config, config.vision_config
    arch: dict[str, Any] = {"model_type": model_type}
    if model_type in ("clip", "metaclip_2"):
        eos = tc.eos_token_id
        if not isinstance(eos, int):
            raise ExportError(
                f"{model_type} text config eos_token_id must be one integer (text pooling finds "
                f"it in the ids), got {eos!r}"
            )
        # CLIP keeps the pre-#24773 behaviour for eos_token_id == 2; MetaCLIP 2 never does
        argmax_ids = model_type == "clip" and eos == 2
        image_tower: nn.Module = CLIPImageTower(model)
        text_tower: nn.Module = CLIPTextTower(model, eos_token_id=eos, argmax_ids=argmax_ids)
        text_inputs: tuple[str, ...] = ("input_ids",)
        embed_dim = int(config.projection_dim)
        logits = {"kind": "softmax", "scale": float(model.logit_scale.detach().exp()), "bias": None}
        arch.update(vision=_sizes(vc, _VIT_KEYS), text=_sizes(tc, _TEXT_KEYS),
                    projection_dim=embed_dim,
                    text_pooling="argmax_ids" if argmax_ids else f"first_eos({eos})")
    elif model_type == "align":
        image_tower = AlignImageTower(model)
        text_tower = AlignTextTower(model)
        text_inputs = ("input_ids", "attention_mask")
        embed_dim = int(config.projection_dim)
        vision_dim = image_tower.encoder.blocks[-1].projection.project_conv.out_channels
        if vision_dim != embed_dim:
            raise ExportError(
                f"ALIGN image features have {vision_dim} channels but text projection_dim is "
                f"{embed_dim}: the towers do not share an embedding space"
            )
        logits = {"kind": "softmax", "scale": float(1.0 / model.temperature.detach()), "bias": None}
        arch.update(
            vision=_sizes(vc, ("image_size", "width_coefficient", "depth_coefficient",
                               "hidden_dim", "hidden_act", "num_hidden_layers")),
            text=_sizes(tc, _TEXT_KEYS), projection_dim=embed_dim, text_pooling="cls",
        )
    elif model_type == "siglip":
        image_tower = SiglipImageTower(model)
        text_tower = SiglipTextTower(model)
        text_inputs = ("input_ids",)
        embed_dim = int(vc.hidden_size)
        text_dim = int(getattr(tc, "projection_size", None) or tc.hidden_size)
        if text_dim != embed_dim:
            raise ExportError(
                f"SigLIP text projection_size {text_dim} != vision hidden_size {embed_dim}"
            )
        logits = {
            "kind": "sigmoid",
            "scale": float(model.logit_scale.detach().exp()),
            "bias": float(model.logit_bias.detach()),
        }
        arch.update(vision=_sizes(vc, _VIT_KEYS), text=_sizes(tc, _TEXT_KEYS),
                    text_pooling="last_token")
    else:  # pragma: no cover - SUPPORTED_MODEL_TYPES and the branches above must agree
        raise AssertionError(model_type)
    image_tower.eval()
    text_tower.eval()
    return HFTowers(
        model_type=model_type,
        family=_family(model_type, config, name),
        model=model,
        image_tower=image_tower,
        text_tower=text_tower,
        text_inputs=text_inputs,
        embed_dim=embed_dim,
        max_positions=int(tc.max_position_embeddings),
        logits=logits,
        architecture=arch,
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
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ExportError(
            f"transformers:{id_or_dir}: model_type {model_type!r} is not supported; supported "
            f"model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
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
        declared = _DEFAULT_CONTEXT[towers.model_type]
    return min(declared, towers.max_positions)


def load_transformers_source(
    id_or_dir: str, *, device: str | torch.device = "cpu", revision: str | None = None
) -> SourceModel:
    """``transformers:ORG/NAME`` or ``transformers:DIR`` -> SourceModel.

    Image processor and tokenizer come from the same id / directory (and revision) as the model.
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    from clipfast.artifact import LogitsConfig
    from clipfast.export.preprocessing import hf_preprocess
    from clipfast.export.source import SourceModel
    from clipfast.export.tokenization import hf_tokenizer

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
    preprocess, reference_transform = hf_preprocess(image_processor)
    context_length = _context_length(tokenizer, towers)
    tok_config, tok_json, reference_tokenize = hf_tokenizer(
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
