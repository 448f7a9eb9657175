"""Build open_clip architectures offline: local configs for hub-hosted text towers, stand-in
tokenizers, and a structure-preserving depth cap.

open_clip configs name hub repositories in two places that a machine without internet cannot
resolve: ``text_cfg.hf_model_name`` (xlm-roberta, mt5, nllb, roberta text towers: open_clip reads
their ``config.json`` from the hub even for random weights) and ``text_cfg.hf_tokenizer_name``
(SigLIP, SigLIP 2, CLIPA, MetaCLIP 2 worldwide, ...). ``offline_config`` rewrites a config so both
point at local directories:

- text tower configs are built from transformers' own config classes with the released base
  models' sizes written out (``HF_TEXT_CONFIGS``; transformers' class defaults are BERT-sized,
  e.g. ``XLMRobertaConfig().vocab_size == 30522``, so they are not relied on);
- tokenizers are small ``tokenizers`` Unigram models with the released special-token ids and
  template (``STANDIN_TOKENIZERS``). They are NOT the released vocabularies: the token ids of an
  artifact built this way differ from the real model's. Exports of real checkpoints (hub cache or
  a local ``--pretrained`` file) use the real tokenizer; this is for random-weight builds only.

``layers`` caps depth without changing anything else: transformer blocks per tower (ViT, text,
timm ViT/EVA/ViTamin/PE ``depth``, HF text ``num_hidden_layers``), blocks per stage for
convolutional towers (ModifiedResNet ``layers``, ConvNeXt/Swin ``depths``, FastViT ``layers``).
Widths, heads, image size, patch size, pooling, activations and the operators are unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["HF_TEXT_CONFIGS", "STANDIN_TOKENIZERS", "OfflineConfig", "count_parameters",
           "offline_config", "register_offline_config", "standin_tokenizer_dir", "timm_depth",
           "timm_kwargs"]

# Released base-model sizes (their config.json), written out because transformers' config
# class defaults are not those of these checkpoints.
HF_TEXT_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "xlm-roberta-base": ("XLMRobertaConfig", dict(
        vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
        layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)),
    "xlm-roberta-large": ("XLMRobertaConfig", dict(
        vocab_size=250002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
        intermediate_size=4096, max_position_embeddings=514, type_vocab_size=1,
        layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)),
    "roberta-base": ("RobertaConfig", dict(
        vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
        layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)),
    "google/mt5-base": ("MT5Config", dict(
        vocab_size=250112, d_model=768, d_kv=64, d_ff=2048, num_layers=12,
        num_decoder_layers=12, num_heads=12, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)),
    "google/mt5-xl": ("MT5Config", dict(
        vocab_size=250112, d_model=2048, d_kv=64, d_ff=5120, num_layers=24,
        num_decoder_layers=24, num_heads=32, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)),
    "facebook/nllb-200-distilled-600M": ("M2M100Config", dict(
        vocab_size=256206, d_model=1024, encoder_layers=12, decoder_layers=12,
        encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=4096,
        decoder_ffn_dim=4096, max_position_embeddings=1024, scale_embedding=True,
        activation_function="relu", pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2)),
    "facebook/nllb-200-distilled-1.3B": ("M2M100Config", dict(
        vocab_size=256206, d_model=1024, encoder_layers=24, decoder_layers=24,
        encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=8192,
        decoder_ffn_dim=8192, max_position_embeddings=1024, scale_embedding=True,
        activation_function="relu", pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2)),
}
# the config key that holds each text model type's depth
_HF_DEPTH_KEY = {"XLMRobertaConfig": "num_hidden_layers", "RobertaConfig": "num_hidden_layers",
                 "MT5Config": "num_layers", "M2M100Config": "encoder_layers"}


@dataclass(frozen=True)
class TokenizerStyle:
    """The released tokenizer's special tokens (token, id), pad / eos / unk tokens and
    ``tokenizers`` template for one sequence; ``lowercase`` as the released normaliser does."""

    specials: tuple[tuple[str, int], ...]
    pad: str
    eos: str | None
    unk: str
    template: str
    lowercase: bool = False


_XLMR = TokenizerStyle((("<s>", 0), ("<pad>", 1), ("</s>", 2), ("<unk>", 3)),
                       "<pad>", "</s>", "<unk>", "<s> $A </s>")
_T5 = TokenizerStyle((("<pad>", 0), ("</s>", 1), ("<unk>", 2)), "<pad>", "</s>", "<unk>",
                     "$A </s>")
# SigLIP's T5-style SentencePiece pads with "</s>"
_SIGLIP = TokenizerStyle((("<pad>", 0), ("</s>", 1), ("<unk>", 2)), "</s>", "</s>", "<unk>",
                         "$A </s>", lowercase=True)
_GEMMA = TokenizerStyle((("<pad>", 0), ("<eos>", 1), ("<bos>", 2), ("<unk>", 3)), "<pad>",
                        "<eos>", "<unk>", "$A <eos>")
_BERT = TokenizerStyle((("[PAD]", 0), ("[UNK]", 100), ("[CLS]", 101), ("[SEP]", 102),
                        ("[MASK]", 103)), "[PAD]", "[SEP]", "[UNK]", "[CLS] $A [SEP]",
                       lowercase=True)

STANDIN_TOKENIZERS: dict[str, TokenizerStyle] = {
    "xlm-roberta-base": _XLMR, "xlm-roberta-large": _XLMR, "roberta-base": _XLMR,
    "facebook/xlm-v-base": _XLMR,
    "facebook/nllb-200-distilled-600M": _XLMR, "facebook/nllb-200-distilled-1.3B": _XLMR,
    "google/mt5-base": _T5, "google/mt5-xl": _T5,
    "bert-base-uncased": _BERT,
}


def _style(tokenizer_name: str) -> TokenizerStyle:
    if tokenizer_name in STANDIN_TOKENIZERS:
        return STANDIN_TOKENIZERS[tokenizer_name]
    if tokenizer_name.startswith("timm/") and "siglip2" in tokenizer_name.lower():
        return _GEMMA
    if tokenizer_name.startswith("timm/") and "siglip" in tokenizer_name.lower():
        return _SIGLIP
    raise KeyError(f"no stand-in tokenizer style for {tokenizer_name!r}")


def _words(n: int) -> list[str]:
    """Common lower-case words from open_clip's bundled BPE vocab (whole-word entries)."""
    import gzip

    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    out: list[str] = []
    seen: set[str] = set()
    for line in gzip.open(path).read().decode("utf-8").split("\n")[1:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].endswith("</w>"):
            continue
        w = parts[0] + parts[1][:-4]
        if w.isascii() and w.isalpha() and w not in seen:
            seen.add(w)
            out.append(w)
            if len(out) >= n:
                break
    return out


def standin_tokenizer_dir(tokenizer_name: str, root: str | Path, *, vocab_limit: int,
                          model_max_length: int = 512) -> Path:
    """Write a stand-in fast tokenizer for hub tokenizer ``tokenizer_name`` under ``root`` and
    return its directory (``AutoTokenizer.from_pretrained`` reads it offline).

    A Unigram over ~1500 common words and single characters, with the released special-token
    ids and template; every id is below ``vocab_limit`` (the text tower's embedding rows).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    style = _style(tokenizer_name)
    directory = Path(root) / ("tokenizer-" + tokenizer_name.replace("/", "--"))
    if (directory / "tokenizer.json").is_file():
        return directory
    special_ids = dict(style.specials)
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-:;()&/"
    pieces = [("▁" + w, -2.0 - i / 1000.0) for i, w in enumerate(_words(1500))]
    pieces += [("▁", -3.0)] + [(c, -8.0) for c in chars] + [("▁" + c, -7.0) for c in chars]
    size = min(vocab_limit, max(special_ids.values()) + 1 + len(pieces))
    vocab: list[tuple[str, float]] = []
    it = iter(pieces)
    by_id = {i: t for t, i in special_ids.items()}
    filler = 0
    for i in range(size):
        if i in by_id:
            vocab.append((by_id[i], 0.0))
        elif i < max(special_ids.values()):  # ids between specials (BERT's [unused*])
            vocab.append((f"[unused{filler}]", -100.0))
            filler += 1
        else:
            vocab.append(next(it, (f"[unused{filler}]", -100.0)))
    tok = Tokenizer(models.Unigram(vocab, unk_id=special_ids[style.unk], byte_fallback=False))
    norms = [normalizers.NFKC()] + ([normalizers.Lowercase()] if style.lowercase else [])
    tok.normalizer = normalizers.Sequence(norms)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    used = [t for t, _ in style.specials if t in style.template.split()]
    tok.post_processor = processors.TemplateProcessing(
        single=style.template, special_tokens=[(t, special_ids[t]) for t in used])
    kwargs: dict[str, Any] = {"pad_token": style.pad, "unk_token": style.unk}
    if style.eos:
        kwargs["eos_token"] = style.eos
    if "[SEP]" in special_ids:
        kwargs.update(sep_token="[SEP]", cls_token="[CLS]")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length,
                                   **kwargs)
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)
    return directory


def hf_text_config_dir(model_name: str, root: str | Path, layers: int | None = None,
                       overrides: dict[str, Any] | None = None) -> Path:
    """Write ``config.json`` for hub text model ``model_name`` (depth capped at ``layers``,
    ``overrides`` applied last: tests shrink widths with it)."""
    import transformers

    cls_name, kwargs = HF_TEXT_CONFIGS[model_name]
    kwargs = dict(kwargs)
    key = _HF_DEPTH_KEY[cls_name]
    if layers:
        kwargs[key] = min(kwargs[key], layers)
        if "num_decoder_layers" in kwargs:
            kwargs["num_decoder_layers"] = min(kwargs["num_decoder_layers"], layers)
        if "decoder_layers" in kwargs:
            kwargs["decoder_layers"] = min(kwargs["decoder_layers"], layers)
    kwargs.update(overrides or {})
    suffix = (f"-L{layers}" if layers else "") + ("-custom" if overrides else "")
    directory = Path(root) / ("config-" + model_name.replace("/", "--") + suffix)
    directory.mkdir(parents=True, exist_ok=True)
    getattr(transformers, cls_name)(**kwargs).save_pretrained(directory)
    return directory


def _cap(value: Any, layers: int) -> Any:
    if isinstance(value, (list, tuple)):
        return [min(int(v), layers) for v in value]
    return min(int(value), layers)


@dataclass
class OfflineConfig:
    """An open_clip config rewritten to build offline: ``name`` to register it under, the config
    dict, and the assumptions made (recorded with every result built from it)."""

    name: str
    config: dict[str, Any]
    assumptions: list[str]


def offline_config(model_name: str, root: str | Path, layers: int | None = None, *,
                   edit: Callable[[dict[str, Any]], None] | None = None,
                   hf_overrides: dict[str, Any] | None = None, suffix: str | None = None
                   ) -> OfflineConfig:
    """open_clip config ``model_name`` rewritten so it builds without the hub, depth capped at
    ``layers`` (None: full depth). Registered under ``model_name`` + ``@L<layers>`` / ``@offline``
    (the original name kept as the prefix, so name-based rules still read it).

    edit: called on the config dict before the rewrite (tests shrink widths with it);
    hf_overrides: config values for a hub text tower; suffix: replaces the name suffix.
    """
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise KeyError(f"unknown open_clip model {model_name!r}")
    cfg = copy.deepcopy(cfg)
    if edit is not None:
        edit(cfg)
    root = Path(root)
    notes: list[str] = []
    vc, tc = cfg["vision_cfg"], cfg.setdefault("text_cfg", {})
    if layers:
        if "layers" in vc and not vc.get("timm_model_name"):
            vc["layers"] = _cap(vc["layers"], layers)
        if "layers" in tc:
            tc["layers"] = _cap(tc["layers"], layers)
        if "multimodal_cfg" in cfg and "layers" in cfg["multimodal_cfg"]:
            cfg["multimodal_cfg"]["layers"] = _cap(cfg["multimodal_cfg"]["layers"], layers)
        if vc.get("timm_model_name"):
            notes.append(f"timm tower {vc['timm_model_name']} built with depth capped at {layers}")
    hub_model = tc.get("hf_model_name")
    if hub_model:
        tc["hf_model_name"] = str(hf_text_config_dir(hub_model, root, layers, hf_overrides))
        tc["hf_model_pretrained"] = False
        notes.append(f"text tower config {hub_model}: transformers "
                     f"{HF_TEXT_CONFIGS[hub_model][0]} with the released base sizes "
                     "(tests/offline_families.py HF_TEXT_CONFIGS)")
    hub_tok = tc.get("hf_tokenizer_name")
    if not hub_tok and "siglip" in model_name.lower():
        # open_clip picks a hub SentencePiece (SigLipTokenizer) from the name
        hub_tok = "timm/ViT-B-16-SigLIP2" if "siglip2" in model_name.lower() else \
            "timm/ViT-B-16-SigLIP"
    if hub_tok:
        vocab = (int({**HF_TEXT_CONFIGS[hub_model][1], **(hf_overrides or {})}["vocab_size"])
                 if hub_model else int(tc.get("vocab_size", 49408)))
        tc["hf_tokenizer_name"] = str(standin_tokenizer_dir(hub_tok, root, vocab_limit=vocab))
        notes.append(f"tokenizer {hub_tok}: offline stand-in with its special-token ids, not the "
                     "released vocabulary (token ids differ from the real model's)")
    if suffix is None:
        suffix = f"@L{layers}" if layers else "@offline"
    return OfflineConfig(model_name + suffix, cfg, notes)


def register_offline_config(model_name: str, root: str | Path, layers: int | None = None,
                            **kwargs: Any) -> OfflineConfig:
    """``offline_config`` written as ``<root>/<name>.json`` and added to open_clip's registry
    (this process only); ``kwargs`` go to ``offline_config``."""
    import open_clip

    Path(root).mkdir(parents=True, exist_ok=True)
    oc = offline_config(model_name, root, layers, **kwargs)
    path = Path(root) / f"{oc.name}.json"
    path.write_text(json.dumps(oc.config, indent=1))
    open_clip.add_model_config(path)
    return oc


def _timm_depth_kwargs(model_name: str, layers: int) -> dict[str, Any]:
    if model_name.startswith(("convnext", "swin")):
        return {"depths": (layers,) * 4}
    if model_name.startswith("fastvit"):
        return {}  # stage count varies (4 or 5): capped in _fastvit_stages
    return {"depth": layers}


@contextlib.contextmanager
def _fastvit_stages(layers: int) -> Iterator[None]:
    """FastViT variants have 4 (mci0-2) or 5 (mci3/4) stages, known only inside each variant's
    entrypoint: cap the ``layers`` tuple where the entrypoint hands it to the model builder."""
    from timm.models import fastvit

    original = fastvit._create_fastvit

    def create(variant: str, pretrained: bool = False, **kwargs: Any):
        if "layers" in kwargs:
            kwargs["layers"] = tuple(min(n, layers) for n in kwargs["layers"])
        return original(variant, pretrained=pretrained, **kwargs)

    fastvit._create_fastvit = create
    try:
        yield
    finally:
        fastvit._create_fastvit = original


@contextlib.contextmanager
def timm_kwargs(extra: Callable[[str], dict[str, Any]] | None) -> Iterator[None]:
    """While active, ``timm.create_model(name, ...)`` also gets ``extra(name)`` as keyword
    arguments (the caller's own win); no-op for None."""
    if extra is None:
        yield
        return
    import timm

    original = timm.create_model

    def create_model(model_name: str, *args: Any, **kwargs: Any):
        return original(model_name, *args, **{**extra(model_name), **kwargs})

    timm.create_model = create_model
    try:
        yield
    finally:
        timm.create_model = original


def timm_depth(layers: int | None) -> contextlib.AbstractContextManager[None]:
    """While active, ``timm.create_model`` builds every model with depth capped at ``layers``
    (blocks per stage for staged networks); no-op for None."""
    if not layers:
        return timm_kwargs(None)
    stack = contextlib.ExitStack()
    stack.enter_context(timm_kwargs(lambda name: _timm_depth_kwargs(name, layers)))
    stack.enter_context(_fastvit_stages(layers))
    return stack


def count_parameters(model_name: str) -> int:
    """Parameters of a registered open_clip config, counted on the meta device (no memory)."""
    import open_clip
    import torch

    with torch.device("meta"):
        model = open_clip.create_model(model_name, pretrained=None, pretrained_text=False,
                                       device="meta")
    return int(sum(p.numel() for p in model.parameters()))
