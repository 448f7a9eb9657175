"""Property-based checks: whatever bytes, files, arrays or text come in, only the documented
errors come out (InputError subclasses from image loading; valid ids from the tokenizer)."""

from __future__ import annotations

import dataclasses
import functools
import io
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

import clipfast.inputs.tokenizer as tokmod
from clipfast.errors import InputError
from clipfast.inputs.preprocess import PreprocessConfig, load_image, preprocess_image

# Small budgets: the whole file runs in well under 20 s; no example database is written.
FUZZ = settings(max_examples=250, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CFG = PreprocessConfig(image_size=16, resize_size=16)
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "ICO")


@functools.cache
def _encoded(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (23, 31, 3), dtype=np.uint8))
    if fmt == "GIF":
        img = img.convert("P")
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _load_or_input_error(item, *, preprocess: bool = True) -> None:
    try:
        img = load_image(item, index=0)
    except InputError:
        return
    assert img.mode == "RGB" and img.size[0] >= 1 and img.size[1] >= 1
    if preprocess:
        try:
            out = preprocess_image(item, CFG)
        except InputError:
            return
        assert out.shape == (3, 16, 16) and out.dtype == np.float32


@FUZZ
@given(st.binary(max_size=4096))
def test_load_image_random_bytes(data):
    _load_or_input_error(data)
    _load_or_input_error(io.BytesIO(data), preprocess=False)


@FUZZ
@given(fmt=st.sampled_from(FORMATS), cut=st.floats(0.0, 1.0),
       flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=4))
def test_load_image_truncated_and_corrupted_files(fmt, cut, flips):
    data = bytearray(_encoded(fmt))
    for where, value in flips:
        data[min(int(where * len(data)), len(data) - 1)] = value
    _load_or_input_error(bytes(data[: int(cut * len(data))]))


_DTYPES = st.sampled_from([np.uint8, np.int8, np.uint16, np.int32, np.int64, np.float16,
                           np.float32, np.float64, np.bool_, np.complex64, ">u2", "<f8"])


@FUZZ
@given(hnp.arrays(dtype=_DTYPES,
                  shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)))
def test_load_image_random_arrays(array):
    _load_or_input_error(array)


@FUZZ
@given(hnp.arrays(dtype=np.uint8, shape=st.tuples(st.integers(0, 40), st.integers(0, 40),
                                                  st.sampled_from([1, 2, 3, 4, 5]))),
       st.booleans())
def test_load_image_random_uint8_images(array, strided):
    _load_or_input_error(array[:, ::-1] if strided else array)


@pytest.fixture(scope="module")
def tokenizers():
    from clipfast.export.tokenization import open_clip_tokenizer

    config, tokenizer_json, _ = open_clip_tokenizer("ViT-B-32")
    return {clean: tokmod.Tokenizer.from_str(dataclasses.replace(config, clean=clean),
                                             tokenizer_json)
            for clean in ("lower", "canonicalize")}


_PIECES = st.sampled_from(["\n", "\r\n", " ", "  ", "<", ">", "&amp;", "&lt;", "&#10;", "!!",
                           "_", "\u00c3\u00a9", "\u03a3", "\u2028", "\x85", "\ufeff",
                           "<end_of_text>", "it's", "cat", "\u65e5\u672c", "\U0001f408"])
_TEXTS = st.one_of(
    st.text(max_size=300),
    st.lists(st.one_of(_PIECES, st.text(max_size=8)), max_size=200).map("".join),
)


@FUZZ
@given(text=_TEXTS, clean=st.sampled_from(["lower", "canonicalize"]))
def test_tokenizer_random_text(tokenizers, text, clean):
    tok = tokenizers[clean]
    config = tok.config
    with mock.patch.object(tokmod, "_PIECE_CHARS_PER_TOKEN", 1):  # long-text path at 77 chars
        ids = tok([text])["input_ids"]
    assert ids.shape == (1, config.context_length) and ids.dtype == np.int64
    assert ids[0, 0] == config.sot_id and config.eot_id in ids[0]
    assert ((ids >= 0) & (ids < tok._backend.get_vocab_size())).all()
    # The same ids as cleaning the whole text first.
    cleaned = tokmod.clean_text(text, clean)
    enc = tok._backend.encode_batch([tok._pattern.findall(cleaned)], is_pretokenized=True)
    assert ids[0].tolist() == enc[0].ids
