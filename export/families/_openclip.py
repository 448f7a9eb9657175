"""Shared by the open_clip families: which towers are theirs, the open_clip attribute probing
that finds rewritable attention, the manifest label from the pretrained tag, open_clip's
preprocessing and tokenizer readers, and ``open_clip_family`` / ``timm_family``, which declare
and register a family from its attributes and the rule that claims its configs."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from clipfast.export.families import register
from clipfast.export.families.base import AttentionSpec, FamilySpec

__all__ = ["TIMM_LAYER_NAMES", "OpenClipFamily", "open_clip_family", "open_clip_fusion_plan",
           "timm_family", "timm_name"]

# block names of open_clip towers whose image trunk is a timm model ("blocks.N",
# "stages.N.blocks.M") beside open_clip's own text transformer ("resblocks.N")
TIMM_LAYER_NAMES = ("resblocks", "blocks")

# --pretrained none: LayerScale gammas below 1e-2 are set to this (see random_init)
LAYER_SCALE_RANDOM = 1.0


def _is_causal_mask(mask: torch.Tensor | None) -> bool:
    """True when ``mask`` is an additive (L, L) mask: 0 on/below the diagonal, -inf (or a huge
    negative number) above it - what open_clip's ``build_causal_mask`` makes."""
    if mask is None or mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        return False
    above = torch.ones_like(mask, dtype=torch.bool).triu(1)
    m = mask.detach().float()
    return bool((m[~above] == 0).all() and (m[above] <= -1e4).all())


def resblocks(transformer: nn.Module) -> list[nn.Module]:
    return list(getattr(transformer, "resblocks", []))


def open_clip_fusion_plan(tower: nn.Module, which: str
                          ) -> tuple[nn.Module | None, bool, str | None]:
    """Find the transformer to rewrite in an open_clip tower wrapper.

    which: "image" or "text". Returns ``(transformer, causal, reason)``: ``transformer`` is None
    and ``reason`` says why when the tower has no rewritable attention (timm or HF towers inside
    open_clip, cross-attention blocks, a non-causal text mask, LayerScale between attention and
    the residual add, ...).
    """
    from clipfast.export.fusion import unsupported_mha

    model = getattr(tower, "model", None)
    if model is None:
        return None, False, "not an open_clip tower wrapper"
    if which == "image":
        transformer = getattr(getattr(model, "visual", None), "transformer", None)
        causal = False
    else:
        if not getattr(tower, "_builtin", False):
            return None, False, "text tower is not open_clip's built-in CLIP text transformer"
        transformer = getattr(model, "transformer", None)
        causal = True
        if not _is_causal_mask(getattr(model, "attn_mask", None)):
            return None, False, "text attention mask is not a plain causal mask"
    blocks = resblocks(transformer) if transformer is not None else []
    if not blocks:
        return None, False, f"{which} tower has no open_clip transformer blocks (resblocks)"
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention):
            return None, False, f"block {i} attention is {type(attn).__name__}, not MHA"
        if hasattr(block, "ln_1_kv"):
            return None, False, f"block {i} is cross-attention"
        if not isinstance(getattr(block, "ls_1", nn.Identity()), nn.Identity):
            return None, False, (f"block {i} has LayerScale after attention (no ORT pattern "
                                 "matches it)")
        reason = unsupported_mha(attn)
        if reason:
            return None, False, f"block {i}: {reason}"
    return transformer, causal, None


class OpenClipFamily(FamilySpec):
    """An open_clip family. Towers are ``sources_openclip``'s wrappers around open_clip's own
    ``encode_image`` / ``encode_text``; the loader tags them with the family name.

    A subclass claims configs (``claims_open_clip``) and states its towers' pooling and fusion;
    the attention rule is open_clip's: rewritable ``resblocks`` of ``nn.MultiheadAttention``.
    """

    loader = "open_clip"
    label = "openclip"
    # open_clip transformers: "resblocks.N"; timm trunks: "blocks.N" / "stages.N.blocks.M"
    layer_names = ("resblocks",)
    # default text tower: open_clip's causal CLIP text transformer
    text_pooling = "EOT token (argmax of ids), ln_final, text_projection"

    def text_padding_free(self, tower: nn.Module) -> tuple[bool, str]:
        """open_clip's built-in CLIP text transformer with a causal mask and EOT (argmax)
        pooling: no position attends past itself, so padding after EOT never reaches the pooled
        token. Other text towers (HF encoders inside open_clip, SigLIP's last-token pooling,
        MobileCLIP's non-causal tower) keep their fixed length."""
        model = getattr(tower, "model", None)
        if not getattr(tower, "_builtin", False) or model is None:
            return False, ("text tower is not open_clip's built-in causal CLIP text transformer "
                           "with EOT (argmax) pooling")
        if not _is_causal_mask(getattr(model, "attn_mask", None)):
            return False, "text attention mask is not causal: padding reaches every token"
        return True, "causal attention mask and EOT (argmax) pooling"

    def owns_tower(self, tower: Any) -> bool:
        from clipfast.export.sources_openclip import OpenClipImageTower, OpenClipTextTower

        if not isinstance(tower, (OpenClipImageTower, OpenClipTextTower)):
            return False
        tagged = getattr(tower, "family", None)
        return tagged == self.name if tagged else self.priority == 0

    def label_for(self, model_name: str, pretrained: str) -> str:
        tag = pretrained.lower()
        if tag.startswith("metaclip") or "metaclip" in model_name.lower():
            return "metaclip"
        if tag == "openai":
            return "clip"
        if "siglip" in model_name.lower():
            return "siglip"
        return self.label or "openclip"

    def random_init(self, model: nn.Module, transform: Any) -> list[str]:
        """Random weights that do not map every image to nearly one embedding (where the
        centred error is ill-conditioned: fp16 rounding alone failed the gate at cosine
        0.9999999).

        - LayerScale gammas (open_clip ``ls_init_value``, timm ``init_values`` /
          ``layer_scale_init_value``, 1e-4 to 1e-6) below 1e-2 are set to LAYER_SCALE_RANDOM:
          at ~0 every residual branch vanishes and the tower outputs its class token or stem.
          With 0.1 the ViT-M-16-alt image embeddings still spread so little that fp16 gave
          centred error 0.047 at depth 1.
        - BatchNorm layers of the image tower (ResNet, FastViT / MobileCLIP) get running
          statistics measured on the built-in varied images, as a trained network has, instead
          of mean 0 / var 1 (``_prepare_batchnorm`` lets a family adjust them first).
        """
        notes = []
        small = [p for name, p in model.named_parameters()
                 if name.rsplit(".", 1)[-1].startswith("gamma") and p.numel() > 1
                 and float(p.detach().abs().max()) < 1e-2]
        with torch.no_grad():
            for p in small:
                p.fill_(LAYER_SCALE_RANDOM)
        if small:
            notes.append(f"{len(small)} LayerScale gammas set to {LAYER_SCALE_RANDOM}")
        visual = getattr(model, "visual", None)
        bns = [(n, m) for n, m in (visual.named_modules() if visual is not None else [])
               if isinstance(m, nn.BatchNorm2d)]
        if bns:
            notes.append(self._calibrate_batchnorm(visual, bns, transform))
        return notes

    def _prepare_batchnorm(self, bns: list[tuple[str, nn.Module]]) -> str:
        """Adjust BatchNorm weights before calibration; returns a note (default: none)."""
        return ""

    def _calibrate_batchnorm(self, visual: nn.Module, bns: list[tuple[str, nn.Module]],
                             transform: Any) -> str:
        import numpy as np
        from PIL import Image

        from clipfast.artifact.samples import sample_images

        momenta = [m.momentum for _, m in bns]
        for _, m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batch
        extra = self._prepare_batchnorm(bns)
        batch = np.stack([np.asarray(transform(Image.fromarray(a).convert("RGB")),
                                     dtype=np.float32) for a in sample_images(8)])
        visual.train()
        with torch.no_grad():
            visual(torch.from_numpy(batch))
        visual.eval()
        for (_, m), momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
            # rounded to fp16 precision: a rebuild on another host (other thread count, other
            # summation order) gets the same bytes, so the weights fingerprint still matches
            m.running_mean.copy_(m.running_mean.half().float())
            m.running_var.copy_(m.running_var.half().float())
        return f"{len(bns)} BatchNorm layers calibrated on 8 built-in images{extra}"

    def fusion_plan(self, tower: nn.Module, which: str
                    ) -> tuple[nn.Module | None, bool, str | None]:
        return open_clip_fusion_plan(tower, which)

    def attention(self, tower: nn.Module, which: str) -> tuple[AttentionSpec | None, str | None]:
        transformer, _, reason = self.fusion_plan(tower, which)
        if transformer is None:
            return None, reason
        blocks = resblocks(transformer)
        attn = blocks[0].attn
        return AttentionSpec("clip", len(blocks), int(attn.num_heads), int(attn.embed_dim)), None

    def preprocess(self, model: Any) -> tuple[Any, Any]:
        from clipfast.export.preprocessing import open_clip_preprocess

        return open_clip_preprocess(model)

    def tokenizer(self, model_name: str, context_length: int | None = None,
                  text_inputs: tuple[str, ...] = ("input_ids",)) -> tuple[Any, str, Any]:
        from clipfast.export.tokenization import open_clip_tokenizer

        return open_clip_tokenizer(model_name)


def timm_name(cfg: dict[str, Any]) -> str:
    """The timm model of an open_clip config's image tower ("" when it is not a timm trunk)."""
    return str((cfg.get("vision_cfg") or {}).get("timm_model_name") or "")


def _caller_module(depth: int = 2) -> str:
    """``__name__`` of the module that called the caller (as ``collections.namedtuple`` finds
    it): a declared family class reports its family module as its own."""
    return sys._getframe(depth).f_globals.get("__name__", __name__)


def open_clip_family(name: str, *, priority: int, summary: str, image_pooling: str,
                     claims: Callable[[str, dict[str, Any]], bool], label: str = "openclip",
                     text_pooling: str = OpenClipFamily.text_pooling,
                     layer_names: tuple[str, ...] = OpenClipFamily.layer_names,
                     module: str | None = None) -> type[OpenClipFamily]:
    """Declare and register an open_clip family that differs from ``OpenClipFamily`` only in
    its attributes and in which configs it claims: ``claims(model_name, cfg)`` is its
    ``claims_open_clip``. Returns the registered class, named after ``name``, in ``module``
    (default: the calling module, so the registry's messages name the module that declares
    the family)."""

    def claims_open_clip(self: OpenClipFamily, model_name: str, cfg: dict[str, Any]) -> bool:
        return claims(model_name, cfg)

    cls_name = "".join(part.capitalize() for part in name.split("-")) + "Family"
    attrs = dict(name=name, label=label, priority=priority, summary=summary,
                 image_pooling=image_pooling, text_pooling=text_pooling,
                 layer_names=layer_names, claims_open_clip=claims_open_clip,
                 __module__=module or _caller_module(), __doc__=summary)
    return register(type(cls_name, (OpenClipFamily,), attrs))


def timm_family(name: str, *, timm_prefix: str, priority: int, summary: str,
                image_pooling: str) -> type[OpenClipFamily]:
    """``open_clip_family`` for a timm image trunk claimed by the prefix of its timm model name
    (``vision_cfg.timm_model_name``), beside open_clip's CLIP text transformer."""

    def claims(model_name: str, cfg: dict[str, Any]) -> bool:
        return timm_name(cfg).startswith(timm_prefix)

    return open_clip_family(name, priority=priority, summary=summary, image_pooling=image_pooling,
                            claims=claims, layer_names=TIMM_LAYER_NAMES, module=_caller_module())
