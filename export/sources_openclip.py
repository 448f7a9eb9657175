"""open_clip model source: OpenCLIP and MetaCLIP v1 checkpoints (and open_clip-format hub repos)."""

from __future__ import annotations

import difflib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from clipfast.artifact.spec import LogitsConfig
from clipfast.errors import ExportError
from clipfast.export.source import SourceModel

log = logging.getLogger("clipfast.export")

RANDOM_WEIGHTS_WARNING = (
    "\n" + "!" * 78 + "\n"
    "!! --pretrained none: building {model} with RANDOM weights (seed {seed}).\n"
    "!! Its embeddings mean nothing; use it for demos and tests only.\n" + "!" * 78
)


class OpenClipImageTower(torch.nn.Module):
    """``pixel_values (batch, 3, H, W) float32 -> (batch, D)``, not normalised.

    family: the registry name of the model's family (``clipfast.export.families``), which
    decides how the tower is fused; None for the default open_clip family.
    """

    def __init__(self, model: torch.nn.Module, family: str | None = None):
        super().__init__()
        self.model = model
        self.family = family

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


class OpenClipTextTower(torch.nn.Module):
    """``input_ids (batch, L) int32 -> (batch, D)``, not normalised; ``L <= context_length``
    for the built-in CLIP text tower (any padding length), ``L = context_length`` otherwise.

    For open_clip's built-in CLIP text tower this re-states ``encode_text`` so that the EOT
    position is an ArgMax over the int32 ids (TensorRT has no int64 ArgMax); other text towers
    (CustomTextCLIP) are called as they are.
    """

    def __init__(self, model: torch.nn.Module, family: str | None = None):
        super().__init__()
        self.model = model
        self.family = family
        import open_clip

        self._builtin = isinstance(model, open_clip.CLIP) and model.text_pool_type == "argmax"

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        m = self.model
        ids = input_ids.long()
        if not self._builtin:
            return m.encode_text(ids)
        cast_dtype = m.transformer.get_cast_dtype()
        # Sliced to the batch's length L <= context_length (traced as Shape -> Slice, so the
        # exported graph takes any L): with the causal mask and EOT pooling, rows padded to L
        # give what they give padded to the full context.
        length = ids.shape[1]
        x = m.token_embedding(ids).to(cast_dtype)
        x = x + m.positional_embedding[:length].to(cast_dtype)
        mask = m.attn_mask[:length, :length] if m.attn_mask is not None else None
        x = m.transformer(x, attn_mask=mask)
        x = m.ln_final(x)
        eot = input_ids.argmax(dim=-1)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        if m.text_projection is not None:
            if isinstance(m.text_projection, torch.nn.Linear):
                x = m.text_projection(x)
            else:
                x = x @ m.text_projection
        return x


def _config_of(model_name: str) -> dict[str, Any] | None:
    """open_clip config of a registry name or an ``hf-hub:`` / ``local-dir:`` repo already
    loaded (None when it cannot be read without a download)."""
    import open_clip

    if model_name.startswith("local-dir:"):
        path = Path(model_name[len("local-dir:"):]) / "open_clip_config.json"
        try:
            return json.loads(path.read_text()).get("model_cfg")
        except (OSError, ValueError):
            return None
    if model_name.startswith("hf-hub:"):
        return None
    return open_clip.get_model_config(model_name)


def resolve_open_clip_name(name: str, known: list[str]) -> str:
    """The registry spelling of ``name``: itself when known, the one known name equal to it
    ignoring case, else ExportError suggesting the closest names (difflib)."""
    if name in known:
        return name
    folded = [k for k in known if k.lower() == name.lower()]
    if len(folded) == 1:
        return folded[0]
    lower = {k.lower(): k for k in known}
    close = folded or [lower[c] for c in difflib.get_close_matches(name.lower(), list(lower), n=3)]
    hint = (f"did you mean {' or '.join(close)}?" if close
            else f"known names include: {', '.join(known[:40])}, ...")
    raise ExportError(
        f"unknown open_clip model {name!r}; {hint} (`clipfast models` lists all {len(known)}), "
        "or use hf-hub:ORG/NAME or transformers:ID"
    )


def load_open_clip_source(
    model_name: str, pretrained: str = "none", *, seed: int = 0, device: str = "cpu"
) -> SourceModel:
    """Load an open_clip model: ``pretrained`` is a registry tag, a local checkpoint file, or
    ``none`` (random weights, seeded so `clipfast verify` and the torch backend rebuild the same
    weights). ``model_name`` may be ``hf-hub:ORG/NAME`` (then ``pretrained`` is ignored).
    """
    import open_clip

    from clipfast.export import families

    pretrained = pretrained or "none"
    is_hub = model_name.startswith(("hf-hub:", "local-dir:"))
    if not is_hub:
        model_name = resolve_open_clip_name(model_name, open_clip.list_models())
    random_weights = (not is_hub) and pretrained.lower() == "none"
    if model_name.startswith("local-dir:"):
        model_name = "local-dir:" + str(Path(model_name[len("local-dir:"):]).expanduser().resolve())
    spec: dict[str, Any] = {"loader": "open_clip", "model": model_name}
    kwargs: dict[str, Any] = {"device": device}
    if is_hub:
        kwargs["pretrained"] = None
    elif random_weights:
        log.warning(RANDOM_WEIGHTS_WARNING.format(model=model_name, seed=seed))
        torch.manual_seed(seed)
        kwargs["pretrained"] = None
        # random weights everywhere: no base text weights (HF text towers) fetched from the hub
        kwargs["pretrained_text"] = False
        spec["pretrained"] = "none"
        spec["seed"] = seed
    elif os.path.exists(pretrained) or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        path = Path(pretrained).expanduser().resolve()
        if not path.is_file():
            raise ExportError(f"--pretrained {pretrained!r}: checkpoint file not found")
        kwargs["pretrained"] = str(path)
        spec["pretrained"] = str(path)
    else:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise ExportError(
                f"--pretrained {pretrained!r} is not a known tag for {model_name}; known tags: "
                f"{', '.join(tags) or '(none)'}; or pass a checkpoint file, or 'none'"
            )
        kwargs["pretrained"] = pretrained
        spec["pretrained"] = pretrained
    try:
        model = open_clip.create_model(model_name, **kwargs)
    except Exception as e:  # open_clip raises bare RuntimeError/FileNotFoundError/HTTP errors
        what = model_name if is_hub else f"{model_name} with pretrained {pretrained!r}"
        raise ExportError(f"open_clip could not load {what}: {e}") from e
    model.eval().float()
    # nn.MultiheadAttention's fused fast path does not export; the plain path is the reference.
    torch.backends.mha.set_fastpath_enabled(False)

    family = families.for_open_clip(model_name, _config_of(model_name))
    preprocess, reference_transform = family.preprocess(model)
    random_init = family.random_init(model, reference_transform) if random_weights else []
    tok_cfg, tok_json, reference_tokenize = family.tokenizer(model_name)
    logit_bias = getattr(model, "logit_bias", None)
    logits = LogitsConfig(
        kind="sigmoid" if logit_bias is not None else "softmax",
        scale=float(model.logit_scale.detach().exp()),
        bias=float(logit_bias.detach()) if logit_bias is not None else None,
    )
    image_tower = OpenClipImageTower(model, family=family.name).eval()
    text_tower = OpenClipTextTower(model, family=family.name).eval()
    with torch.no_grad():
        embed_dim = int(
            image_tower(torch.zeros(1, 3, *preprocess.image_size, device=device)).shape[-1]
        )
    visual = model.visual
    architecture = {
        "name": model_name,
        "class": type(model).__name__,
        "vision": type(visual).__name__,
        "image_size": list(preprocess.image_size),
        "context_length": int(getattr(model, "context_length", tok_cfg.context_length)),
        "quick_gelu": "quickgelu" in model_name.lower(),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "family_spec": family.name,
    }
    if random_init:
        architecture["random_init"] = random_init
    return SourceModel(
        loader="open_clip",
        family=family.label_for(model_name, "hub" if is_hub else pretrained),
        spec=spec,
        image_tower=image_tower,
        text_tower=text_tower,
        text_inputs=("input_ids",),
        embed_dim=embed_dim,
        preprocess=preprocess,
        reference_transform=reference_transform,
        tokenizer=tok_cfg,
        tokenizer_json=tok_json,
        reference_tokenize=reference_tokenize,
        logits=logits,
        architecture=architecture,
        random_weights=random_weights,
    )
