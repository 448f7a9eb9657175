"""Export side of tokenization: turn a source model's tokenizer into (config, JSON, reference).

Each function returns ``(TokenizerConfig, tokenizer_json_text, reference)`` where ``reference``
is the source library's own tokenizer as ``list[str] -> {name: int64 (N, L)}``, kept for
verification. :func:`check_parity` runs the runtime tokenizer against that reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from clipfast.errors import ExportError
from clipfast.inputs.tokenizer import Tokenizer, TokenizerConfig, library_versions

__all__ = ["PARITY_TEXTS", "check_parity", "hf_tokenizer", "open_clip_tokenizer"]

Reference = Callable[[list[str]], dict[str, np.ndarray]]

# Short awkward corpus for the export gate; tests/test_tokenizer.py covers far more.
PARITY_TEXTS: tuple[str, ...] = (
    "",
    " ",
    "a photo of a cat.",
    "A PHOTO of Two DOGS, isn't it? they're 100% sure; it's 3.14",
    "caf\u00e9 cafe\u0301 na\u00efve \u00c5ngstr\u00f6m",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \u4e2d\u6587 \ud55c\uad6d\uc5b4",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "emoji \U0001f408\u200d\u2b1b \U0001f469\U0001f3fd\u200d\U0001f4bb \U0001f1fa\U0001f1f8",
    "&amp;lt;b&amp;gt; fish &amp; chips &lt;i&gt;",
    "\u00e2\u20ac\u0153mojibake\u00e2\u20ac\x9d",
    "tab\tnew\nline\r\x00nul \x1b[31mred\u3000ideographic\xa0nbsp",
    "<start_of_text> <end_of_text> <|startoftext|> <|endoftext|> (<end_of_text>) [CLS] [SEP]",
    "word " * 200,
)


def open_clip_tokenizer(
    model_name: str, tokenizer: Any = None
) -> tuple[TokenizerConfig, str, Reference]:
    """(config, tokenizer.json text, reference) for open_clip model ``model_name``.

    ``tokenizer`` overrides ``open_clip.get_tokenizer(model_name)`` (an already built one).
    A SimpleTokenizer becomes kind "open_clip_bpe" built from its own encoder and bpe_ranks;
    an HFTokenizer or SigLipTokenizer becomes kind "hf" behind open_clip's cleaning.
    """
    from open_clip import tokenizer as oct

    tok = tokenizer if tokenizer is not None else _get_open_clip_tokenizer(model_name)
    if isinstance(tok, oct.SimpleTokenizer):
        return _simple_tokenizer(model_name, tok)
    if isinstance(tok, oct.HFTokenizer):
        if tok.tokenizer_mode:
            raise ExportError(
                f"{model_name}: open_clip HFTokenizer mode {tok.tokenizer_mode!r} is not "
                "supported (only the standard mode is)"
            )
        clean = _clean_mode(model_name, tok.clean_fn)
        strip = tok.tokenizer.sep_token_id if tok.strip_sep_token else None
        return _open_clip_hf(tok, tok.tokenizer, tok.context_length, clean, strip)
    if isinstance(tok, oct.SigLipTokenizer):
        # SigLipTokenizer.__call__ always runs canonicalize_text(basic_clean(text)).
        return _open_clip_hf(tok, tok.tokenizer, tok.context_length, "canonicalize", None)
    raise ExportError(
        f"{model_name}: unsupported open_clip tokenizer {type(tok).__name__}; expected "
        "SimpleTokenizer, HFTokenizer or SigLipTokenizer"
    )


def _get_open_clip_tokenizer(model_name: str) -> Any:
    """open_clip.get_tokenizer, with failures reported as ExportError."""
    import open_clip

    try:
        return open_clip.get_tokenizer(model_name)
    except Exception as e:
        raise ExportError(f"{model_name}: open_clip.get_tokenizer failed: {e}") from e


def _clean_mode(model_name: str, fn: Callable[[str], str]) -> str:
    from open_clip import tokenizer as oct

    modes = {
        oct._clean_lower: "lower",
        oct._clean_whitespace: "whitespace",
        oct._clean_canonicalize: "canonicalize",
    }
    if fn not in modes:
        raise ExportError(f"{model_name}: unknown open_clip clean function {fn!r}")
    return modes[fn]


def _simple_tokenizer(model_name: str, tok: Any) -> tuple[TokenizerConfig, str, Reference]:
    import regex
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTok

    if tok.reduction_fn is not None:
        raise ExportError(
            f"{model_name}: open_clip reduction_mask tokenization is random or needs nltk; "
            "only plain truncation can be exported"
        )
    if not tok.context_length:
        raise ExportError(f"{model_name}: the open_clip tokenizer has no context_length")
    pat = tok.pat
    if pat.flags & ~(regex.IGNORECASE | regex.UNICODE | regex.V0) or not (
        pat.flags & regex.IGNORECASE
    ):
        raise ExportError(f"{model_name}: unexpected open_clip regex flags {pat.flags:#x}")
    specials = [tok.decoder[i] for i in tok.all_special_ids]
    for s in specials:
        # open_clip joins special tokens into its regex unescaped and recognises them through a
        # cache keyed by the byte-encoded word: only plain printable ASCII behaves as a token.
        if not all(33 <= ord(c) <= 126 for c in s) or any(c in s for c in "\\.^$*+?{}[]|()"):
            raise ExportError(
                f"{model_name}: special token {s!r} must be printable ASCII without regex "
                "metacharacters to keep open_clip's behaviour exportable"
            )

    merges = [pair for pair, _ in sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])]
    backend = HFTok(
        models.BPE(
            vocab=dict(tok.encoder), merges=merges, end_of_word_suffix="</w>", fuse_unk=False
        )
    )
    # No normalizer: open_clip's cleaning (ftfy, html) runs in Python before this tokenizer.
    # The Split regex is open_clip's; the runtime pre-tokenizes with Python `regex` instead
    # (see clipfast.inputs.tokenizer), this copy keeps the JSON usable on its own.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("(?i)" + pat.pattern), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    sot, eot = tok.sot_token_id, tok.eot_token_id
    backend.post_processor = processors.TemplateProcessing(
        single=f"{tok.decoder[sot]} $A {tok.decoder[eot]}",
        special_tokens=[(tok.decoder[sot], sot), (tok.decoder[eot], eot)],
    )
    L = int(tok.context_length)
    backend.enable_truncation(max_length=L)
    backend.enable_padding(pad_id=0, pad_token=tok.decoder[0], length=L)
    clean = _clean_mode(model_name, tok.clean_fn)
    config = TokenizerConfig(
        kind="open_clip_bpe",
        context_length=L,
        outputs=("input_ids",),
        clean=clean,
        pad_id=0,
        sot_id=sot,
        eot_id=eot,
        pattern=pat.pattern,
        versions=library_versions("open_clip_bpe", clean),
    )

    def reference(texts: list[str]) -> dict[str, np.ndarray]:
        return {"input_ids": tok(list(texts), context_length=L).numpy().astype(np.int64)}

    return config, backend.to_str(), reference


def _open_clip_hf(
    oc_tok: Any, hf_tok: Any, context_length: int, clean: str, strip_sep_id: int | None
) -> tuple[TokenizerConfig, str, Reference]:
    config, json_text, _ = hf_tokenizer(hf_tok, context_length, ("input_ids",))
    config = replace(
        config, clean=clean, strip_sep_id=strip_sep_id, versions=library_versions("hf", clean)
    )
    L = context_length

    def reference(texts: list[str]) -> dict[str, np.ndarray]:
        if not texts:
            return {"input_ids": np.zeros((0, L), dtype=np.int64)}
        return {"input_ids": oc_tok(list(texts), context_length=L).numpy().astype(np.int64)}

    return config, json_text, reference


def hf_tokenizer(
    tok: Any, context_length: int, outputs: tuple[str, ...] = ("input_ids", "attention_mask")
) -> tuple[TokenizerConfig, str, Reference]:
    """(config, tokenizer.json text, reference) for a transformers tokenizer ``tok``.

    The config reproduces ``tok(texts, padding="max_length", truncation=True,
    max_length=context_length)``, the call of the model cards' processors; ``outputs`` names
    the arrays to return.
    """
    from tokenizers import Tokenizer as HFTok

    name = type(tok).__name__
    backend = getattr(tok, "backend_tokenizer", None)
    if not isinstance(backend, HFTok):
        raise ExportError(
            f"{name} is not backed by the tokenizers library (a Python or sentencepiece "
            "tokenizer); load the model's fast tokenizer (tokenizer.json) instead"
        )
    if tok.pad_token is None or tok.pad_token_id is None:
        raise ExportError(f"{name} has no pad token; padding='max_length' needs one")
    config = TokenizerConfig(
        kind="hf",
        context_length=int(context_length),
        outputs=tuple(outputs),
        clean="none",
        padding="max_length",
        padding_side=tok.padding_side,
        truncation=True,
        truncation_side=tok.truncation_side,
        pad_id=int(tok.pad_token_id),
        pad_type_id=int(tok.pad_token_type_id),
        split_special_tokens=bool(getattr(tok, "split_special_tokens", False)),
        versions=library_versions("hf", "none"),
    )
    # Copy the backend so the saved JSON carries the config's padding/truncation rather than
    # whatever the last call on `tok` left behind.
    copy = HFTok.from_str(backend.to_str())
    copy.enable_truncation(
        max_length=config.context_length, direction=config.truncation_side
    )
    copy.enable_padding(
        direction=config.padding_side,
        pad_id=config.pad_id,
        pad_type_id=config.pad_type_id,
        pad_token=tok.pad_token,
        length=config.context_length,
    )
    L = config.context_length

    def reference(texts: list[str]) -> dict[str, np.ndarray]:
        if not texts:
            return {o: np.zeros((0, L), dtype=np.int64) for o in outputs}
        enc = tok(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=L,
            return_attention_mask="attention_mask" in outputs,
            return_token_type_ids="token_type_ids" in outputs,
            return_tensors="np",
        )
        return {o: np.asarray(enc[o], dtype=np.int64) for o in outputs}

    return config, copy.to_str(), reference


def check_parity(
    config: TokenizerConfig,
    tokenizer_json: str,
    reference: Reference,
    texts: Sequence[str] = PARITY_TEXTS,
) -> None:
    """Raise ExportError unless clipfast's Tokenizer gives the reference's ids on ``texts``."""
    ours = Tokenizer.from_str(config, tokenizer_json)(list(texts))
    ref = reference(list(texts))
    for name in config.outputs:
        a, b = ours[name], np.asarray(ref[name], dtype=np.int64)
        if a.shape != b.shape:
            raise ExportError(f"tokenizer parity: {name} shape {a.shape} != reference {b.shape}")
        bad = np.flatnonzero((a != b).any(axis=1))
        if bad.size:
            i = int(bad[0])
            raise ExportError(
                f"tokenizer parity: {name} differs from the reference on {bad.size} of "
                f"{len(texts)} texts, first text {i} {texts[i][:60]!r}: "
                f"ours {a[i][:12].tolist()}... reference {b[i][:12].tolist()}..."
            )
