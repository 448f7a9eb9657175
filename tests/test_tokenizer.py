"""clipfast.inputs.tokenizer must give the SAME ids as the source tokenizers, on awkward text.

References (all offline): open_clip's SimpleTokenizer (ViT-B-32, context 77, and its other clean
modes); transformers' CLIPTokenizer built from open_clip's bundled BPE the way
openai/clip-vit-base-patch32 ships it; BERT uncased WordPiece (transformers' fast BertTokenizer
and the slow BertTokenizerLegacy) on a vocab trained here, with ALIGN's settings; open_clip's
HFTokenizer wrapping that BERT. The clipfast side is always loaded from a saved tokenizer.json
plus a config that went through JSON, as an artifact would be.
"""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from clipfast.errors import ArtifactError, ExportError, TextInputError
from clipfast.inputs.tokenizer import Tokenizer, TokenizerConfig

# fmt: off
CORPUS: list[str] = [
    # empty and blank
    "", " ", "   \t\n  ", "\u3000", "\xa0",
    # plain, uppercase, apostrophes (open_clip's regex has 's 't 're 've 'm 'll 'd, IGNORECASE)
    "a photo of a cat", "A PHOTO OF A CAT", "a Photo Of A cAt.",
    "it's they're we've I'm you'll he'd don't", "IT'S THEY'RE WE'VE I'M YOU'LL HE'D",
    "rock 'n' roll ''s 's 'S", "it\u2019s curly \u2018quotes\u2019 \u201cdouble\u201d",
    "'\u017f long s", "x's'd'll",
    # digits and numbers
    "1234567890", "3.14159 10,000 1e-5 0x1F", "\u0661\u0662\u0663 Arabic-Indic digits",
    "\xbd \xb2 \u2167 \u2460 \U0001d7d9 fractions, superscripts, roman, circled",
    # emoji, modifiers, ZWJ sequences, flags, keycaps, variation selectors
    "\U0001f408 \U0001f44d\U0001f3fd", "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466",
    "\U0001f3f3\ufe0f\u200d\U0001f308 \U0001f1ef\U0001f1f5 1\ufe0f\u20e3",
    "\U0001f408\u200d\u2b1b black cat \u2764\ufe0f",
    # CJK, Hangul, Arabic, Hebrew, Devanagari, Thai, Greek, Cyrillic
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "\u4e2d\u6587\u6587\u672c\uff0c\u6807\u70b9\u3002",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8", "\u6771\u4eac Tokyo 2020",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd", "\u0928\u092e\u0938\u094d\u0924\u0947",
    "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35", "\u039a\u03b1\u03bb\u03b7\u03bc\u03ad\u03c1\u03b1",
    "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440",
    # combining accents: NFC vs NFD, stacked marks, odd case mappings, ligatures, fullwidth
    "caf\xe9 na\xefve r\xe9sum\xe9", "cafe\u0301 nai\u0308ve re\u0301sume\u0301",
    "\xc5ngstr\xf6m A\u030angstro\u0308m \u212bngstr\xf6m", "\xf1 n\u0303 \xd1 N\u0303",
    "z\u0337\u0322a\u0336l\u0338g\u0335o\u0334", "\u0345 \u03b9\u0345 \u1fb3 \u1fbc",
    "\ufb01 \ufb02 \uff21\uff22\uff23 \uff41\uff42\uff43", "\u0130stanbul \xdf \u1e9e \u017f",
    # HTML entities, double-escaped too
    "fish &amp; chips", "&amp;lt;b&amp;gt;bold&amp;lt;/b&amp;gt;", "&lt;i&gt;x&lt;/i&gt;",
    "&amp;amp;amp;", "&#39;s &#x27;re &quot;q&quot; &nbsp;&copy;&eacute;", "&bogus; & ;amp",
    # mojibake that ftfy repairs
    "\xe2\u20ac\u0153quoted\xe2\u20ac\x9d", "\xc3\xa9t\xc3\xa9",
    "\xe3\u0192\xa1\xe3\u201a\xa4\xe3\u0192\xb3",
    "The Mona Lisa doesn\xc3\u0192\xc2\xa2\xc3\xa2\xe2\u20ac\u0161\xc2\xac\xc3\xa2\xe2\u20ac\u017e"
    "\xc2\xa2t have eyebrows.",
    # control characters and exotic whitespace
    "\x00", "a\x00b", "\x1b[31mred\x1b[0m", "tab\tsep", "line\nbreak", "cr\rlf\r\n",
    "\x0b\x0c", "a\x1cb\x1dc\x1ed\x1fe", "\x7f\x80\x85\x9f", "zero\u200bwidth \u200c\u200d",
    "\u2028line\u2029para", "\ufeffBOM", "\ufffd", "a\xadb soft hyphen",
    "a\u3000b\u3000\u3000c", "a\xa0\xa0b", "\u2003em\u2009thin\u202fnarrow\u205fmath",
    # special tokens written literally in the text
    "<start_of_text>", "<end_of_text>", "a <start_of_text> b <end_of_text> c",
    "(<end_of_text>)", "x<start_of_text>y", "<START_OF_TEXT>", "<Start_Of_Text>",
    "<|startoftext|>", "<|endoftext|>", "x<|endoftext|>y", "(<|endoftext|>)",
    "[CLS] [SEP] [PAD] [MASK] [UNK]", "[cls] x[SEP]y", "</w> hello</w>world",
    # punctuation, URLs, symbols
    "Hello, World! How are you? I'm fine... #hashtag @user",
    "http://example.com/path?q=1&b=2 email@x.org", "C++ / C# / F# -- ---- __init__",
    "$100.00 \u20ac50 \xa51000 100\xb0C e=mc\xb2", "\U0001d573\U0001d58a\U0001d587 math bold",
    # code points that Oniguruma (inside tokenizers) classifies unlike Python's `regex`
    "\u088f\u0c5c\u0cdc\ua7ce\ua7cf", "\U00010940\U00010941x", "\U00011de0\U00011de1 5",
    # long texts (truncation)
    "word " * 2000, "a" * 10000, "\u65e5" * 3000, "cat, " * 100,
]
# fmt: on

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _random_texts(n: int, seed: int = 0) -> list[str]:
    """Seeded mix of corpus pieces, words and code points from many scripts."""
    rng = random.Random(seed)
    words = "a photo of the cat dog on beach red big with two people it's don't 42 &amp;".split()
    ranges = [(0x20, 0x7F), (0xA0, 0x250), (0x370, 0x530), (0x600, 0x700), (0x900, 0x980),
              (0x3040, 0x3100), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF),
              (0x2000, 0x2070), (0x0300, 0x0370)]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 25)):
            r = rng.random()
            if r < 0.5:
                parts.append(rng.choice(words))
            elif r < 0.6:
                parts.append(rng.choice(CORPUS)[:50])
            else:
                lo, hi = rng.choice(ranges)
                parts.append("".join(chr(rng.randrange(lo, hi)) for _ in range(rng.randint(1, 6))))
        out.append(rng.choice(["", " ", "\n", "\t"]).join(parts) if parts else "")
    return out


def _bmp_texts(step: int = 16) -> list[str]:
    """Every BMP code point (surrogates excluded), ``step`` consecutive ones per text."""
    cps = [c for c in range(0x20, 0x10000) if not 0xD800 <= c <= 0xDFFF]
    return ["".join(map(chr, cps[i : i + step])) for i in range(0, len(cps), step)]


def _save(tmp: Path, config: TokenizerConfig, tokenizer_json: str) -> Tokenizer:
    """Write tokenizer.json + a JSON config as an artifact would, and load them back."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / config.file).write_text(tokenizer_json, encoding="utf-8")
    (tmp / "manifest.json").write_text(json.dumps({"tokenizer": config.to_dict()}))
    loaded = TokenizerConfig.from_dict(json.loads((tmp / "manifest.json").read_text())["tokenizer"])
    assert loaded == config
    return Tokenizer.from_dir(tmp, loaded)


def _assert_same(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], texts: list[str]):
    for name, want in ref.items():
        got = ours[name]
        assert got.dtype == np.int64 and got.shape == want.shape, (name, got.shape, want.shape)
        bad = np.flatnonzero((got != want).any(axis=1))
        assert bad.size == 0, (
            f"{name}: {bad.size} texts differ, first {texts[bad[0]][:60]!r}: "
            f"ours {got[bad[0]][:16]} reference {want[bad[0]][:16]}"
        )


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openclip_b32(tmp_path_factory):
    """(clipfast Tokenizer, open_clip's own tokenizer) for ViT-B-32."""
    import open_clip

    from clipfast.export.tokenization import open_clip_tokenizer

    config, tokenizer_json, _ = open_clip_tokenizer("ViT-B-32")
    ours = _save(tmp_path_factory.mktemp("oc"), config, tokenizer_json)
    return ours, open_clip.get_tokenizer("ViT-B-32")


def _openclip_ref(tok, texts: list[str]) -> dict[str, np.ndarray]:
    return {"input_ids": tok(texts).numpy().astype(np.int64)}


@pytest.fixture(scope="module")
def clip_hf_dir(tmp_path_factory) -> Path:
    """openai/clip-vit-base-patch32's tokenizer files, written from open_clip's bundled BPE."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    d = tmp_path_factory.mktemp("clip_hf")
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "errors": "replace", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }))
    return d


def _bert_vocab(path: Path, size: int = 30522) -> Path:
    """bert-base-uncased-shaped vocab trained offline with tokenizers' WordPieceTrainer.

    Text: the first ~4 MB of the stdlib's own sources plus one line of characters from several
    scripts (so CJK, Arabic, ... map to real ids, not [UNK]). Layout as bert-base-uncased:
    [PAD]=0, [unused0..98]=1..99, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103, then the trained
    tokens, then [unused99...] up to ``size`` entries.
    """
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    texts, n = [], 0
    for p in sorted(STDLIB.glob("*.py")):
        texts.append(p.read_text(encoding="utf-8", errors="replace"))
        n += len(texts[-1])
        if n > 4_000_000:
            break
    scripts = [(0x4E00, 0x5200), (0x3040, 0x3100), (0xAC00, 0xAD00), (0x600, 0x700),
               (0x370, 0x400), (0x400, 0x500), (0xC0, 0x250), (0x900, 0x980), (0xE00, 0xE80),
               (0x5D0, 0x5EB)]
    texts.append(" ".join(chr(c) for lo, hi in scripts for c in range(lo, hi)))
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = HFTok(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=size - 99, special_tokens=specials, show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    trained = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    words = [w for w, _ in trained if w not in specials]
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += words[: size - len(vocab)]
    vocab += [f"[unused{i}]" for i in range(99, 99 + size - len(vocab))]
    assert len(vocab) == size and len(set(vocab)) == size
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bert_vocab(tmp_path_factory) -> Path:
    return _bert_vocab(tmp_path_factory.mktemp("bert") / "vocab.txt")


ALIGN_KW = dict(padding="max_length", truncation=True, max_length=64, return_tensors="np",
                return_attention_mask=True, return_token_type_ids=True)

# -- config ------------------------------------------------------------------------------------


def test_config_round_trip_and_validation():
    cfg = TokenizerConfig(kind="hf", context_length=64, outputs=("input_ids", "attention_mask"))
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["outputs"] == ["input_ids", "attention_mask"]
    assert TokenizerConfig.from_dict(d) == cfg
    with pytest.raises(ArtifactError, match="unknown kind 'sentencepiece'"):
        TokenizerConfig.from_dict({**d, "kind": "sentencepiece"})
    with pytest.raises(ArtifactError, match=r"unknown keys \['lowercase_maybe'\]"):
        TokenizerConfig.from_dict({**d, "lowercase_maybe": True})
    with pytest.raises(ArtifactError, match="outputs"):
        TokenizerConfig.from_dict({**d, "outputs": ["pixel_values"]})
    with pytest.raises(ValueError, match="open_clip_bpe needs sot_id"):
        TokenizerConfig(kind="open_clip_bpe", context_length=77)


def test_runtime_does_not_import_torch():
    code = (
        "import sys, clipfast.inputs.tokenizer; "
        "bad = [m for m in ('torch', 'transformers', 'open_clip') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- open_clip SimpleTokenizer -----------------------------------------------------------------


def test_openclip_vitb32_matches_simple_tokenizer(openclip_b32):
    ours, ref = openclip_b32
    assert ours.config.context_length == 77 and ours.config.clean == "lower"
    _assert_same(ours(CORPUS), _openclip_ref(ref, CORPUS), CORPUS)


def test_openclip_every_bmp_code_point(openclip_b32):
    ours, ref = openclip_b32
    texts = _bmp_texts()
    _assert_same(ours(texts), _openclip_ref(ref, texts), texts)


def test_openclip_batch_of_1000(openclip_b32):
    ours, ref = openclip_b32
    texts = _random_texts(1000)
    _assert_same(ours(texts), _openclip_ref(ref, texts), texts)


@pytest.mark.parametrize("clean", ["whitespace", "canonicalize"])
def test_openclip_other_clean_modes(clean, tmp_path):
    from open_clip.tokenizer import SimpleTokenizer

    from clipfast.export.tokenization import open_clip_tokenizer

    ref = SimpleTokenizer(context_length=32, clean=clean)
    config, tokenizer_json, _ = open_clip_tokenizer("custom", tokenizer=ref)
    assert config.clean == clean and config.context_length == 32
    ours = _save(tmp_path, config, tokenizer_json)
    texts = CORPUS + _random_texts(200, seed=1)
    _assert_same(ours(texts), _openclip_ref(ref, texts), texts)


def test_openclip_truncation_keeps_eot_last(openclip_b32):
    ours, _ = openclip_b32
    ids = ours(["word " * 500, "a cat"])["input_ids"]
    assert ids[0, 0] == 49406 and ids[0, -1] == 49407 and (ids[0, 1:-1] != 49407).all()
    assert list(ids[1, :4]) == [49406, 320, 2368, 49407] and not ids[1, 4:].any()


def test_openclip_special_tokens_in_text(openclip_b32):
    ours, ref = openclip_b32
    ids = ours(["a <start_of_text> b", "(<end_of_text>)"])["input_ids"]
    # open_clip's regex takes a special token only at a word boundary: after "(" the
    # punctuation run swallows "<", so the second text has no special token inside.
    assert ids[0, 2] == 49406
    assert (ids[1] == 49407).sum() == 1 and ids[1, 2] != 49407
    texts = ["a <start_of_text> b", "(<end_of_text>)"]
    _assert_same(ours(texts), _openclip_ref(ref, texts), texts)


def test_openclip_lone_surrogate_is_repaired_like_open_clip(openclip_b32):
    ours, ref = openclip_b32
    texts = ["a\ud800b", "\ud83d\ude00 smile"]
    _assert_same(ours(texts), _openclip_ref(ref, texts), texts)


# -- transformers CLIPTokenizer (openai/clip-vit-base-patch32 layout) ------------------------


def test_hf_clip_matches_transformers(clip_hf_dir, tmp_path):
    from transformers import CLIPTokenizer

    from clipfast.export.tokenization import hf_tokenizer

    tok = CLIPTokenizer.from_pretrained(clip_hf_dir)
    assert tok.pad_token_id == 49407 == tok.eos_token_id
    config, tokenizer_json, _ = hf_tokenizer(tok, 77, ("input_ids", "attention_mask"))
    assert (config.kind, config.pad_id, config.clean) == ("hf", 49407, "none")
    ours = _save(tmp_path, config, tokenizer_json)
    texts = CORPUS + _random_texts(1000, seed=2) + _bmp_texts(64)
    ref = tok(texts, padding="max_length", truncation=True, max_length=77, return_tensors="np")
    _assert_same(ours(texts), {k: ref[k] for k in config.outputs}, texts)


# -- BERT uncased WordPiece with ALIGN's settings -------------------------------------------


def test_bert_wordpiece_matches_fast_and_slow(bert_vocab, tmp_path):
    from transformers import BertTokenizer
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    from clipfast.export.tokenization import hf_tokenizer

    fast = BertTokenizer(vocab=str(bert_vocab), do_lower_case=True, model_max_length=64)
    slow = BertTokenizerLegacy(vocab_file=str(bert_vocab), do_lower_case=True, model_max_length=64)
    outputs = ("input_ids", "attention_mask", "token_type_ids")
    config, tokenizer_json, _ = hf_tokenizer(fast, 64, outputs)
    assert (config.pad_id, config.context_length, config.truncation) == (0, 64, True)
    ours = _save(tmp_path, config, tokenizer_json)
    texts = CORPUS + _random_texts(1000, seed=3)
    got = ours(texts)
    _assert_same(got, {k: fast(texts, **ALIGN_KW)[k] for k in outputs}, texts)
    assert (got["input_ids"][:, 0] == 101).all()
    long = ours(["word " * 100])
    assert long["input_ids"][0, -1] == 102 and long["attention_mask"].all()

    # The slow Python tokenizer judges characters with Python 3.11's unicodedata (Unicode 14),
    # the fast one with the Rust tables: code points assigned since Unicode 15 are "Cn" to
    # Python, dropped as control characters by the slow one and [UNK] to the fast one (which is
    # what AutoTokenizer loads). Texts holding such a code point are exempt; nothing else may
    # differ.
    def disagree(c: str) -> bool:
        return fast.tokenize(f"a{c}b") != slow.tokenize(f"a{c}b")

    ref_slow = slow(texts, **ALIGN_KW)
    differ = np.flatnonzero((got["input_ids"] != ref_slow["input_ids"]).any(axis=1))
    unexplained = [texts[i] for i in differ if not any(disagree(c) for c in set(texts[i]))]
    assert not unexplained, unexplained[:3]
    assert set(differ) >= {CORPUS.index("\u088f\u0c5c\u0cdc\ua7ce\ua7cf")}
    keep = np.setdiff1d(np.arange(len(texts)), differ)
    _assert_same({k: v[keep] for k, v in got.items()},
                 {k: ref_slow[k][keep] for k in outputs}, [texts[i] for i in keep])
    assert len(differ) < 0.1 * len(texts)
    bmp = _bmp_texts(64)
    _assert_same(ours(bmp), {k: fast(bmp, **ALIGN_KW)[k] for k in outputs}, bmp)


def test_openclip_hf_tokenizer_with_strip_sep(bert_vocab, tmp_path):
    """open_clip's HFTokenizer (as CLIPA configs use BERT): Python cleaning + sep -> 0."""
    from open_clip.tokenizer import HFTokenizer
    from transformers import BertTokenizer

    from clipfast.export.tokenization import open_clip_tokenizer

    d = tmp_path / "hf"
    BertTokenizer(vocab=str(bert_vocab), model_max_length=64).save_pretrained(d)
    ref = HFTokenizer(str(d), context_length=33, strip_sep_token=True)
    config, tokenizer_json, _ = open_clip_tokenizer("local", tokenizer=ref)
    assert (config.clean, config.strip_sep_id) == ("whitespace", 102)
    assert config.outputs == ("input_ids",)
    ours = _save(tmp_path / "art", config, tokenizer_json)
    texts = CORPUS + _random_texts(300, seed=4)
    _assert_same(ours(texts), _openclip_ref(ref, texts), texts)
    assert not (ours(texts)["input_ids"] == 102).any()


# -- errors and shapes -------------------------------------------------------------------------


def test_non_string_raises_naming_index(openclip_b32):
    ours, _ = openclip_b32
    for bad in (None, b"bytes", 3, ["list"]):
        with pytest.raises(TextInputError, match=f"text 2 is a {type(bad).__name__}") as e:
            ours(["a", "b", bad, "d"])
        assert e.value.index == 2


def test_empty_batch_and_single_string(openclip_b32, bert_vocab, tmp_path):
    from transformers import BertTokenizer

    from clipfast.export.tokenization import hf_tokenizer

    ours, _ = openclip_b32
    out = ours([])
    assert list(out) == ["input_ids"] and out["input_ids"].shape == (0, 77)
    assert out["input_ids"].dtype == np.int64
    assert np.array_equal(ours("a cat")["input_ids"], ours(["a cat"])["input_ids"])
    config, js, _ = hf_tokenizer(BertTokenizer(vocab=str(bert_vocab)), 64)
    out = _save(tmp_path, config, js)(())
    assert {k: v.shape for k, v in out.items()} == {"input_ids": (0, 64), "attention_mask": (0, 64)}


def test_hf_lone_surrogate_raises_naming_index(bert_vocab, tmp_path):
    from transformers import BertTokenizer

    from clipfast.export.tokenization import hf_tokenizer

    config, js, _ = hf_tokenizer(BertTokenizer(vocab=str(bert_vocab)), 64)
    ours = _save(tmp_path, config, js)
    with pytest.raises(TextInputError, match="text 1 is not valid Unicode") as e:
        ours(["ok", "bad \ud800 surrogate"])
    assert e.value.index == 1


def test_check_parity_gate_catches_a_wrong_config(openclip_b32):
    from dataclasses import replace

    from clipfast.export.tokenization import check_parity

    ours, ref = openclip_b32
    js = Path(ours.source).read_text(encoding="utf-8")
    check_parity(ours.config, js, lambda texts: _openclip_ref(ref, texts))
    with pytest.raises(ExportError, match="differs from the reference"):
        check_parity(replace(ours.config, clean="whitespace"), js,
                     lambda texts: _openclip_ref(ref, texts))


def test_version_mismatch_is_logged(openclip_b32, caplog):
    from dataclasses import replace

    ours, _ = openclip_b32
    config = replace(ours.config, versions={**ours.config.versions, "ftfy": "0.0.1"})
    assert set(ours.config.versions) == {"ftfy", "regex", "tokenizers"}
    with caplog.at_level("WARNING", logger="clipfast"):
        Tokenizer(config, ours.source)
    assert "exported with ftfy 0.0.1" in caplog.text


def test_openclip_siglip_tokenizer_canonicalize_pad_64(openclip_b32, tmp_path):
    """open_clip's SigLipTokenizer path: canonicalize cleaning, "</s>" appended, pad id 1, L=64.

    The real one wraps T5TokenizerFast around a downloaded SentencePiece model; a small Unigram
    model of the same shape (Metaspace, lower-case) stands in, wired as SigLipTokenizer wires it.
    """
    from open_clip.tokenizer import SigLipTokenizer
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from clipfast.export.tokenization import open_clip_tokenizer

    encoder = openclip_b32[1].encoder
    words = [w[:-4] for w in encoder if w.endswith("</w>") and w[:-4].isalpha()][:3000]
    chars = sorted({c for t in CORPUS[:60] for c in t.lower() if c.isprintable()} - {" "})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + w, -2.0 - i / 1e4) for i, w in enumerate(dict.fromkeys(words))]
    vocab += [(c, -8.0) for c in chars]
    backend = HFTok(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    ref = SigLipTokenizer.__new__(SigLipTokenizer)  # skip the SentencePiece download
    ref.tokenizer, ref.context_length = hf, 64
    ref.tokenizer.pad_token_id = 1  # as SigLipTokenizer.__init__ does for the c4-en vocab
    config, tokenizer_json, _ = open_clip_tokenizer("ViT-B-16-SigLIP", tokenizer=ref)
    assert (config.clean, config.pad_id, config.context_length) == ("canonicalize", 1, 64)
    ours = _save(tmp_path, config, tokenizer_json)
    texts = CORPUS + _random_texts(300, seed=5)
    got = ours(texts)
    _assert_same(got, _openclip_ref(ref, texts), texts)
    assert (got["input_ids"][CORPUS.index("a photo of a cat")][6:] == 1).all()
