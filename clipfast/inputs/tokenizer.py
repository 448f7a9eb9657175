"""Torch-free text tokenizers that reproduce the source models' token ids exactly.

Two kinds, both driven by a ``tokenizer.json`` (HuggingFace ``tokenizers`` format) plus a
:class:`TokenizerConfig` stored in the artifact's manifest:

- ``open_clip_bpe``: open_clip's ``SimpleTokenizer`` (OpenAI CLIP BPE). Text cleaning (ftfy, HTML
  unescaping, whitespace / case / punctuation handling) and the pre-tokenization regex run in Python
  exactly as open_clip runs them; the byte-level BPE, the start/end tokens, truncation and padding
  run in ``tokenizers``.
- ``hf``: a transformers fast tokenizer saved as its backend ``tokenizer.json``, called the way
  the model's processor calls it (``padding="max_length"``, ``truncation=True``,
  ``max_length=context_length``), optionally behind open_clip's Python cleaning (open_clip's
  ``HFTokenizer`` / ``SigLipTokenizer``).

Outputs are int64 arrays ``(batch, context_length)``.
"""

from __future__ import annotations

import html
import logging
import os
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import ftfy
import numpy as np
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import pre_tokenizers, processors

from clipfast.errors import ArtifactError, ClipfastError, TextInputError

log = logging.getLogger("clipfast")

__all__ = [
    "CLEAN_MODES",
    "KINDS",
    "OUTPUT_NAMES",
    "Tokenizer",
    "TokenizerConfig",
    "clean_text",
    "library_versions",
]

KINDS = ("open_clip_bpe", "hf")
CLEAN_MODES = ("lower", "whitespace", "canonicalize", "none")
OUTPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class TokenizerConfig:
    """Everything the runtime needs to tokenize like the source model; stored in manifest.json.

    kind: "open_clip_bpe" (open_clip SimpleTokenizer) or "hf" (transformers fast tokenizer).
    file: the tokenizers JSON file, relative to the artifact directory.
    context_length: L, the fixed length of every output row.
    outputs: names of the returned arrays, in the text tower's input order.
    clean: open_clip's Python text cleaning applied before tokenizing ("lower", "whitespace",
        "canonicalize") or "none" (a plain transformers tokenizer normalizes inside its JSON).
    padding: only "max_length" (every row padded to context_length).
    padding_side / truncation_side: "right" or "left", as the source tokenizer was set.
    truncation: cut sequences longer than context_length (special tokens kept, e.g. open_clip's
        end-of-text stays last); without it an over-long text raises TextInputError.
    pad_id / pad_type_id: the id and token type written into padded positions.
    sot_id / eot_id: open_clip start/end-of-text ids framing every sequence (open_clip_bpe only).
    pattern: open_clip's pre-tokenization regex, compiled with IGNORECASE (open_clip_bpe only).
    split_special_tokens: hf only; True makes special-token text in the input ordinary text.
    strip_sep_id: hf only; an id replaced by 0 in input_ids after tokenizing (open_clip's
        ``HFTokenizer(strip_sep_token=True)``), or None.
    versions: versions of the libraries the ids depend on at export time (ftfy, regex,
        tokenizers); a runtime with other versions logs a warning, since Unicode tables and
        ftfy's heuristics change between releases and with them the ids of rare text.
    """

    kind: str
    context_length: int
    file: str = "tokenizer.json"
    outputs: tuple[str, ...] = ("input_ids",)
    clean: str = "none"
    padding: str = "max_length"
    padding_side: str = "right"
    truncation: bool = True
    truncation_side: str = "right"
    pad_id: int = 0
    pad_type_id: int = 0
    sot_id: int | None = None
    eot_id: int | None = None
    pattern: str | None = None
    split_special_tokens: bool = False
    strip_sep_id: int | None = None
    versions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # frozen dataclass: normalise list -> tuple (JSON round trip gives lists)
        object.__setattr__(self, "outputs", tuple(self.outputs))
        problems = []
        if self.kind not in KINDS:
            problems.append(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.context_length, int) or self.context_length < 2:
            problems.append(f"context_length must be an int >= 2, got {self.context_length!r}")
        if not self.outputs or any(o not in OUTPUT_NAMES for o in self.outputs):
            problems.append(f"outputs must be a non-empty subset of {OUTPUT_NAMES}, "
                            f"got {self.outputs!r}")
        if self.clean not in CLEAN_MODES:
            problems.append(f"clean must be one of {CLEAN_MODES}, got {self.clean!r}")
        if self.padding != "max_length":
            problems.append(f"padding must be 'max_length', got {self.padding!r}")
        for name in ("padding_side", "truncation_side"):
            if getattr(self, name) not in ("right", "left"):
                problems.append(f"{name} must be 'right' or 'left', got {getattr(self, name)!r}")
        if self.kind == "open_clip_bpe":
            if self.sot_id is None or self.eot_id is None or not self.pattern:
                problems.append("open_clip_bpe needs sot_id, eot_id and pattern")
            sides = (self.truncation_side, self.padding_side)
            if not self.truncation or sides != ("right", "right"):
                problems.append("open_clip_bpe always truncates and pads on the right")
        if problems:
            raise ValueError("invalid TokenizerConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        d["outputs"] = list(self.outputs)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenizerConfig:
        """Inverse of :meth:`to_dict`; raises ArtifactError on unknown kinds or keys."""
        if not isinstance(d, dict):
            raise ArtifactError(f"manifest 'tokenizer' section must be an object, got {type(d)}")
        kind = d.get("kind")
        if kind not in KINDS:
            raise ArtifactError(
                f"manifest 'tokenizer' section has unknown kind {kind!r}; this clipfast knows "
                f"{KINDS}. Re-export the model or upgrade clipfast."
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ArtifactError(
                f"manifest 'tokenizer' section has unknown keys {unknown}; known keys: "
                f"{sorted(known)}. It was written by another clipfast version."
            )
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise ArtifactError(f"manifest 'tokenizer' section is invalid: {e}") from e


# --- open_clip's text cleaning --------------------------------------------------------------
# Hand-written on purpose: `tokenizers` normalizers cannot express ftfy.fix_text or
# html.unescape, and open_clip lives with torch. Each function mirrors open_clip/tokenizer.py
# (basic_clean, whitespace_clean, canonicalize_text, get_clean_fn) operation for operation.

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _basic_clean(text: str, unescape_html: str | bool = "auto") -> str:
    text = ftfy.fix_text(text) if unescape_html == "auto" else ftfy.fix_text(
        text, unescape_html=unescape_html)
    text = html.unescape(html.unescape(text))
    return text.strip()


def _whitespace_clean(text: str) -> str:
    # str.split() also splits on \x1c-\x1f and \x85, exactly like open_clip's.
    return " ".join(text.split()).strip()


def _canonicalize(text: str) -> str:
    text = text.replace("_", " ")
    text = text.translate(_PUNCTUATION)
    text = text.lower()
    text = " ".join(text.split())
    return text.strip()


def clean_text(text: str, mode: str, *, unescape_html: str | bool = "auto") -> str:
    """Apply open_clip's clean function ``mode`` ("lower", "whitespace", "canonicalize", "none").

    unescape_html: ftfy's setting ("auto": unescape unless the text contains "<"); only for
    cleaning a text piece by piece (``Tokenizer``), as ftfy carries it from line to line.
    """
    if mode == "lower":
        return _whitespace_clean(_basic_clean(text, unescape_html)).lower()
    if mode == "whitespace":
        return _whitespace_clean(_basic_clean(text, unescape_html))
    if mode == "canonicalize":
        return _canonicalize(_basic_clean(text, unescape_html))
    if mode == "none":
        return text
    raise ValueError(f"unknown clean mode {mode!r}; expected one of {CLEAN_MODES}")


# Long texts are cleaned and split into words piece by piece, a piece being at least this many
# characters per context token (then up to the end of its line), until enough words are found.
_PIECE_CHARS_PER_TOKEN = 16


def _line_pieces(text: str, size: int):
    """Consecutive pieces of ``text``, each at least ``size`` characters and ending just after a
    newline (the last one at the end of the text)."""
    pos = 0
    while pos < len(text):
        nl = text.find("\n", pos + size - 1)
        end = len(text) if nl < 0 else nl + 1
        yield text[pos:end]
        pos = end


def library_versions(config_kind: str, clean: str) -> dict[str, str]:
    """Installed versions of the libraries whose behaviour decides the ids for this kind."""
    import tokenizers

    names = {"tokenizers": tokenizers.__version__}
    if config_kind == "open_clip_bpe":
        names["regex"] = _regex().__version__
    if clean != "none":
        names["ftfy"] = ftfy.__version__
    return names


_warned_versions: set[tuple[str, str, str]] = set()


def _check_versions(config: TokenizerConfig) -> None:
    here = library_versions(config.kind, config.clean)
    for lib, exported in sorted(config.versions.items()):
        mine = here.get(lib)
        if mine is not None and mine != exported and (lib, exported, mine) not in _warned_versions:
            _warned_versions.add((lib, exported, mine))
            log.warning(
                "clipfast: tokenizer exported with %s %s but %s %s is installed; token ids of "
                "rare text (new Unicode characters, mojibake) may differ from the source model",
                lib, exported, lib, mine,
            )


class Tokenizer:
    """Tokenize batches of strings into fixed-length int64 arrays, without torch.

    ``Tokenizer(config, path)`` loads ``path`` (a tokenizers JSON); ``Tokenizer.from_dir(dir,
    config)`` loads ``dir / config.file``. Calling it returns ``{name: int64 (N, L)}`` for each
    name in ``config.outputs``.
    """

    def __init__(self, config: TokenizerConfig, path: str | os.PathLike[str]):
        path = Path(path)
        try:
            backend = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise ArtifactError(f"cannot load tokenizer file {path}: {e}") from e
        self._setup(config, backend, str(path))

    @classmethod
    def from_dir(cls, directory: str | os.PathLike[str], config: TokenizerConfig) -> Tokenizer:
        """Load ``directory / config.file``."""
        return cls(config, Path(directory) / config.file)

    @classmethod
    def from_str(cls, config: TokenizerConfig, json_text: str) -> Tokenizer:
        """Build from the tokenizer JSON text itself (export side, before files exist)."""
        self = cls.__new__(cls)
        try:
            backend = _HFTokenizer.from_str(json_text)
        except Exception as e:
            raise ArtifactError(f"invalid tokenizer JSON: {e}") from e
        self._setup(config, backend, "<string>")
        return self

    def _setup(self, config: TokenizerConfig, backend: _HFTokenizer, source: str) -> None:
        self.config = config
        self.source = source  # the tokenizer file, for messages
        self._backend = backend
        _check_versions(config)
        L = config.context_length
        self._pattern = None
        if config.kind == "open_clip_bpe":
            # Pre-tokenization runs in Python with open_clip's own regex (same `regex` module and
            # flags) instead of the JSON's Split: the Oniguruma engine inside `tokenizers` has
            # older Unicode tables (4,657 code points, e.g. Unicode 16 letters and digits, class
            # differently) and folds U+0345 into \p{L} under (?i); and tokenizers would extract
            # "<end_of_text>" after punctuation, where open_clip's regex never starts a special
            # token ("(<end_of_text>)"). It was timed no slower than the JSON's Split. The
            # words then go through ByteLevel + BPE in tokenizers, which maps the words equal to
            # a special token to its id, as open_clip's cache does.
            regex = _regex()
            self._pattern = regex.compile(config.pattern, regex.IGNORECASE)
            backend.normalizer = None
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(
                add_prefix_space=False, use_regex=False
            )
            sot, eot = backend.id_to_token(config.sot_id), backend.id_to_token(config.eot_id)
            if sot is None or eot is None:
                raise ArtifactError(
                    f"tokenizer {source} has no token for sot_id={config.sot_id} or "
                    f"eot_id={config.eot_id} of the manifest"
                )
            backend.post_processor = processors.TemplateProcessing(
                single=f"{sot} $A {eot}",
                special_tokens=[(sot, config.sot_id), (eot, config.eot_id)],
            )
        else:
            backend.encode_special_tokens = config.split_special_tokens
        if config.truncation:
            # "longest_first" is what transformers passes for truncation=True; for one sequence
            # it keeps the first L - (number of special tokens) content tokens.
            backend.enable_truncation(
                max_length=L, stride=0, strategy="longest_first", direction=config.truncation_side
            )
        else:
            backend.no_truncation()
        pad_token = backend.id_to_token(config.pad_id)
        if pad_token is None:
            raise ArtifactError(f"tokenizer {source} has no token for pad_id={config.pad_id}")
        backend.enable_padding(
            direction=config.padding_side,
            pad_id=config.pad_id,
            pad_type_id=config.pad_type_id,
            pad_token=pad_token,
            length=L,
        )

    @property
    def context_length(self) -> int:
        return self.config.context_length

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.config.outputs

    def __call__(self, texts: Sequence[str] | str) -> dict[str, np.ndarray]:
        """Tokenize ``texts`` (a sequence of str; a lone str is a batch of one).

        Returns ``{name: int64 (N, context_length)}`` for each name in ``config.outputs``.
        """
        return self.encode(texts)[0]

    def lengths(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """int64 ``(N,)``: how many leading positions of each row are not padding, from
        tokenized ``inputs`` alone (``encode`` gives the exact figure for texts).

        From ``attention_mask`` when it is there; else from the ids: up to the last id that is
        not ``pad_id``, plus one position for an ``hf`` tokenizer, whose pad token may be the
        end token itself (OpenAI CLIP's). Overcounting only costs time: a tower on the dynamic
        path gives the same result for any padding. Right padding only (the dynamic path's
        condition): a left-padded tokenizer gets ``context_length`` for every row.
        """
        from clipfast.inputs.text_batching import row_lengths

        return row_lengths(inputs, pad_id=self.config.pad_id,
                           padding_side=self.config.padding_side,
                           pad_may_end=self.config.kind == "hf")

    def encode(self, texts: Sequence[str] | str) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """``(self(texts), lengths)``: the same arrays, and int64 ``(N,)`` the number of tokens
        of each text before padding (special tokens included)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TextInputError(
                    f"text {i} is a {type(t).__name__}, expected str", index=i,
                    item=type(t).__name__,
                )
        L = self.config.context_length
        if not texts:
            return ({name: np.zeros((0, L), dtype=np.int64) for name in self.config.outputs},
                    np.zeros(0, dtype=np.int64))
        if self._pattern is not None:
            words = [self._words(t) for t in texts]
            shown = [" ".join(w) for w in words]
        else:
            shown = [clean_text(t, self.config.clean) for t in texts]
        try:
            if self._pattern is not None:
                encodings = self._backend.encode_batch(words, is_pretokenized=True)
            else:
                encodings = self._backend.encode_batch(shown)
        except Exception as e:
            raise self._explain_failure(shown, e) from e
        if not self.config.truncation:
            for i, enc in enumerate(encodings):
                if len(enc.ids) > L:
                    raise TextInputError(
                        f"text {i} has {len(enc.ids)} tokens, more than context_length {L}, "
                        "and this tokenizer does not truncate; shorten the text",
                        index=i, item=_short(texts[i]),
                    )
        out: dict[str, np.ndarray] = {}
        for name in self.config.outputs:
            if name == "input_ids":
                arr = np.array([e.ids for e in encodings], dtype=np.int64)
                if self.config.strip_sep_id is not None:
                    arr[arr == self.config.strip_sep_id] = 0
            elif name == "attention_mask":
                arr = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            else:
                arr = np.array([e.type_ids for e in encodings], dtype=np.int64)
            out[name] = arr.reshape(len(texts), L)
        lengths = np.array([sum(e.attention_mask) for e in encodings], dtype=np.int64)
        return out, lengths

    def _words(self, text: str) -> list[str]:
        """open_clip's words of ``clean_text(text)`` (open_clip_bpe), stopping at the first
        ``context_length`` of them; long texts are cleaned only as far as that needs.

        The ids equal those of cleaning and splitting the whole text:

        - Every word is at least one BPE token and truncation keeps ``context_length - 2``
          tokens, so words past the first ``context_length`` never reach the model.
        - The text is cleaned in pieces that end just after a newline, and the words of the
          pieces, in order, are the words of the whole text, because every step treats a
          newline as a boundary: ftfy fixes each line on its own (``fix_text`` works per line,
          "segment"; a line longer than its 1M-character limit is split by ftfy itself, the
          same way in a piece, since a piece starts at a line start) and keeps the newline; its
          one setting carried across lines, not unescaping HTML from the first line with a "<"
          on, is carried here too; no HTML entity contains a newline; the whitespace steps turn
          the newline into a word break; the other steps are per character (str.lower's final
          sigma looks no further than the next non-letter); and open_clip's regex matches
          never contain whitespace.
        - So there is no character budget to get wrong: cleaning can shrink a text without
          bound (runs of spaces, punctuation under "canonicalize", control characters, HTML
          entities) or lengthen it (an entity or ligature becomes several characters, a mojibake
          fix changes lengths), and neither matters, since the words are counted after cleaning
          and the pieces go on until there are enough of them or the text ends.

        The cost is that of cleaning the first piece (``16 * context_length`` characters, up to
        the next newline) and BPE-encoding the kept words. Two cases stay linear in the input:
        a piece always ends at a newline, so a very long first line is cleaned whole (ftfy's
        mojibake decision looks at the whole line), and a word is never cut (BPE merges at a
        word's start can depend on its end), so a single enormous word is encoded whole.
        """
        keep = self.config.context_length
        size = _PIECE_CHARS_PER_TOKEN * keep
        if len(text) <= size:
            return self._pattern.findall(clean_text(text, self.config.clean))[:keep]
        words: list[str] = []
        unescape_html: str | bool = "auto"
        for piece in _line_pieces(text, size):
            cleaned = clean_text(piece, self.config.clean, unescape_html=unescape_html)
            for match in self._pattern.finditer(cleaned):
                words.append(match.group())
                if len(words) >= keep:
                    return words
            if unescape_html == "auto" and "<" in piece:
                unescape_html = False
        return words

    def _explain_failure(self, cleaned: list[str], error: Exception) -> Exception:
        # tokenizers rejects strings that are not valid Unicode (lone surrogates) without saying
        # which one; find it so the message names the index.
        for i, t in enumerate(cleaned):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:
                return TextInputError(
                    f"text {i} is not valid Unicode ({e.reason} at position {e.start}); "
                    "fix or drop the lone surrogate", index=i, item=_short(t),
                )
        return TextInputError(f"tokenizing the batch failed: {error}")

    def __repr__(self) -> str:
        c = self.config
        return f"Tokenizer(kind={c.kind!r}, context_length={c.context_length}, outputs={c.outputs})"


def _regex() -> Any:
    # open_clip's pattern needs \p{L} / \p{N}, which the stdlib `re` lacks.
    try:
        import regex
    except ImportError as e:
        raise ClipfastError(
            "open_clip tokenizers need the 'regex' package: pip install regex"
        ) from e
    return regex


def _short(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")
