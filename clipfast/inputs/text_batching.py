"""Text batches padded only as far as their longest text, grouped by length.

A text tower on the dynamic sequence path (manifest ``text.sequence == "dynamic"``) gives the
same embedding for a text whatever the trailing padding, so a batch need only be as long as its
longest text. Throughput then depends on how texts are grouped: one 77-token text in a batch of
short captions would pad all of them to 77. The batch planner
(``clipfast.backends.batching``: ``plan_text_batches``, ``run_planned``) sorts the texts by
length, splits the sorted list into batches that minimise the tokens run plus a per-batch
overhead, runs each batch and puts the rows back in input order. This module holds the facts of
the texts themselves: their lengths read from the padding, the length buckets, the sequence
profile a fixed-shape builder covers.

Backends that need fixed shapes (TensorRT optimization profiles, CUDA graphs) state the lengths
they accept (``text_lengths``); each batch is then padded up to the nearest one.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SEQUENCE_OPT", "length_buckets", "row_lengths", "sequence_profile"]


def row_lengths(inputs: dict[str, np.ndarray], *, pad_id: int, padding_side: str = "right",
                pad_may_end: bool = False) -> np.ndarray:
    """int64 ``(N,)``: the leading positions of each row that are not padding.

    From ``attention_mask`` when ``inputs`` has one; else up to the last id that is not
    ``pad_id``, plus one when ``pad_may_end`` (a pad token that is also the end token, as in
    OpenAI CLIP's transformers tokenizer). Overcounting only costs time on the dynamic path.
    Left padding gives the full width for every row (trimming would move the text).
    """
    first = np.asarray(next(iter(inputs.values())))
    n, width = (first.shape[0], first.shape[1]) if first.ndim == 2 else (len(first), 0)
    if padding_side != "right" or n == 0:
        return np.full(n, width, dtype=np.int64)
    mask = inputs.get("attention_mask")
    real = np.asarray(mask) != 0 if mask is not None else np.asarray(inputs["input_ids"]) != pad_id
    last = np.where(real.any(axis=1), width - np.argmax(real[:, ::-1], axis=1), 0)
    if mask is None and pad_may_end:
        last = last + 1
    return np.clip(last, 1, max(width, 1)).astype(np.int64)


def length_buckets(max_length: int, step: int = 16) -> tuple[int, ...]:
    """Lengths a fixed-shape backend builds for: 8, 16, then every ``step`` up to
    ``max_length`` (always included). ``(8, 16, 32, 48, 64, 77)`` for CLIP's 77."""
    if max_length < 1:
        raise ValueError(f"max_length={max_length}: must be >= 1")
    out = [b for b in (8, 16) if b < max_length]
    b = 16 + step
    while b < max_length:
        out.append(b)
        b += step
    return (*out, max_length)


# The sequence length TensorRT optimises text engines for: captions are mostly 8-20 tokens.
SEQUENCE_OPT = 16


def sequence_profile(manifest) -> tuple[int, int, int] | None:
    """``(min, opt, max)`` sequence lengths a fixed-shape builder (TensorRT, its ONNX Runtime
    execution provider) covers for the text tower: ``(1, 16, context_length)`` on the dynamic
    path, None for a fixed-length tower (built at ``context_length`` only)."""
    if not manifest.spec.text.dynamic:
        return None
    context = int(manifest.spec.tokenizer.context_length)
    return 1, min(SEQUENCE_OPT, context), context
