"""Text batches padded only as far as their longest text, grouped by length.

A text tower on the dynamic sequence path (manifest ``text.sequence == "dynamic"``) gives the
same embedding for a text whatever the trailing padding, so a batch need only be as long as its
longest text. Throughput then depends on how texts are grouped: one 77-token text in a batch of
short captions would pad all of them to 77. ``plan_text_batches`` sorts the texts by length and
splits the sorted list into batches that minimise the tokens run plus a per-batch overhead;
the caller runs each batch and puts the rows back in input order.

Backends that need fixed shapes (TensorRT optimization profiles, CUDA graphs) state the lengths
they accept (``text_lengths``); each batch is then padded up to the nearest one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["BATCH_OVERHEAD_TOKENS", "SEQUENCE_OPT", "TextBatch", "length_buckets",
           "plan_text_batches", "row_lengths", "run_planned", "sequence_profile"]

# The fixed cost charged per tower call, in token-rows of work: what splitting a sorted batch
# in two must save to be worth it (a call's session overhead, thread wake-ups and the poorer
# efficiency of smaller GEMMs). A set value, not measured per host: 96 is about 1.2 rows of 77
# tokens, so a batch is split only where that saves more than one full-length row of work.
BATCH_OVERHEAD_TOKENS = 96
# Above this many texts the sorted order is simply cut into full batches: neighbours in a long
# sorted list have nearly equal lengths, and the exact partition costs O(texts x batch).
_EXACT_PLAN_LIMIT = 2048


@dataclass(frozen=True)
class TextBatch:
    """Rows ``rows`` (positions in the input) run together, padded to ``length`` tokens."""

    rows: np.ndarray
    length: int


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


def _padded(length: int, allowed: Sequence[int] | None, context: int) -> int:
    if not allowed:
        return length
    for a in allowed:
        if a >= length:
            return int(a)
    return context


def plan_text_batches(lengths: np.ndarray, max_batch: int, *, context: int,
                      allowed: Sequence[int] | None = None,
                      overhead: int = BATCH_OVERHEAD_TOKENS) -> list[TextBatch]:
    """Batches covering every row once, each of at most ``max_batch`` rows.

    Rows are sorted by length (stably); the sorted list is cut where that minimises
    ``sum(rows x padded length + overhead)`` over the batches (exactly, by dynamic programming,
    up to ``_EXACT_PLAN_LIMIT`` rows; beyond, in full batches). ``allowed``: the lengths the
    backend accepts, ascending (None: any); a batch is padded up to the first one that holds
    its longest row, or to ``context``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if max_batch < 1:
        raise ValueError(f"max_batch={max_batch}: must be >= 1")
    if n == 0:
        return []
    order = np.argsort(lengths, kind="stable")
    padded = np.array([_padded(int(min(v, context)), allowed, context)
                       for v in lengths[order]], dtype=np.int64)
    if n > _EXACT_PLAN_LIMIT:
        cuts = list(range(0, n, max_batch)) + [n]
    else:
        # best[j]: least cost of the first j sorted rows; a batch ending at row j-1 is padded to
        # padded[j-1] (the longest of a sorted run is its last).
        best = np.zeros(n + 1, dtype=np.float64)
        start = np.zeros(n + 1, dtype=np.int64)
        for j in range(1, n + 1):
            i = np.arange(max(0, j - max_batch), j)
            cost = best[i] + (j - i) * padded[j - 1] + overhead
            # ties go to the latest start: batches fill in order and the remainder comes last,
            # as plain chunking would cut texts of one length
            k = len(cost) - 1 - int(np.argmin(cost[::-1]))
            best[j], start[j] = cost[k], i[k]
        cuts = [n]
        while cuts[-1] > 0:
            cuts.append(int(start[cuts[-1]]))
        cuts.reverse()
    return [TextBatch(order[a:b], int(padded[b - 1])) for a, b in zip(cuts, cuts[1:])
            if b > a]


def run_planned(run, inputs: dict[str, np.ndarray], plan: list[TextBatch], dim: int
                ) -> np.ndarray:
    """Run ``plan``'s batches through ``run`` (``list of {name: (rows, length)} -> list of
    (rows, D)``) and return float32 ``(N, dim)`` in input order."""
    n = len(next(iter(inputs.values())))
    chunks = [{k: np.ascontiguousarray(v[b.rows, :b.length]) for k, v in inputs.items()}
              for b in plan]
    outs = run(chunks)
    result = np.empty((n, dim), dtype=np.float32)
    for b, out in zip(plan, outs, strict=True):
        result[b.rows] = out
    return result


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
