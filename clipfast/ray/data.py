"""Ray Data: embed a Dataset's images or texts with ``map_batches``, one Engine per actor.

>>> import ray, clipfast.ray                                   # doctest: +SKIP
>>> ds = ray.data.read_parquet("s3://bucket/images/")           # doctest: +SKIP
>>> ds = ds.map_batches(clipfast.ray.EmbedBatch,                # doctest: +SKIP
...                     fn_constructor_kwargs={"artifact": "/models/vit-b-32", "column": "image"},
...                     concurrency=4, batch_size=64, num_gpus=0)

``clipfast embed --ray`` runs the same class under the job's resumable shard writer
(``run_ray_batches``): the driver enumerates the inputs, Ray actors decode and embed them, and
the driver commits the shards, so the output folder is the local job's, row for row.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import ray

from clipfast.embed.decode import ImagePolicy, prepare_images, prepare_texts
from clipfast.embed.sources import Item
from clipfast.errors import ClipfastError
from clipfast.fidelity import l2_normalize

KINDS = ("auto", "image_bytes", "image_path", "text")


class EmbedBatch:
    """Callable class for ``Dataset.map_batches``: adds ``output_column`` (float32 ``(n, D)``,
    L2-normalised) and ``error_column`` (None, or why that row could not be embedded; its
    embedding row is NaN) to each batch.

    column: the input column. kind: "image_bytes" (encoded images), "image_path" (paths every
        actor can read), "text", or "auto" (bytes -> image bytes, str -> image path).
    The Engine is loaded once per actor (Ray keeps the instance); engine_kwargs go to
    ``clipfast.Engine`` (backend, device, threads, ...). fast_decode: see ``clipfast embed``.
    """

    def __init__(self, artifact: str, column: str = "image", *, kind: str = "auto",
                 output_column: str = "embedding", error_column: str = "error",
                 batch_size: int = 32, fast_decode: bool = False, dtype: str = "float32",
                 **engine_kwargs: Any):
        import clipfast

        if kind not in KINDS:
            raise ClipfastError(f"EmbedBatch: kind={kind!r}: expected one of {KINDS}")
        if fast_decode and kind == "text":
            raise ClipfastError("EmbedBatch: fast_decode applies to images, not texts")
        self.engine = clipfast.Engine(artifact, batch_size=batch_size, **engine_kwargs)
        self.column, self.kind = column, kind
        self.output_column, self.error_column = output_column, error_column
        self.dtype = np.dtype(dtype)
        self.policy = ImagePolicy.of(self.engine, fast=fast_decode)

    def _items(self, values) -> list[Item]:
        items = []
        for i, v in enumerate(values):
            if isinstance(v, np.ndarray) and v.dtype == np.uint8:
                v = v.tobytes()
            kind = self.kind
            if kind == "auto":
                kind = ("bytes" if isinstance(v, (bytes, bytearray)) else
                        "path" if isinstance(v, str) else "error")
            elif kind == "image_bytes":
                kind = "bytes" if isinstance(v, (bytes, bytearray)) else "error"
            elif kind == "image_path":
                kind = "path" if isinstance(v, str) else "error"
            else:
                kind = "text" if isinstance(v, str) else "error"
            value = v if kind != "error" else (
                f"column {self.column!r} holds {type(v).__name__}, not what kind="
                f"{self.kind!r} expects")
            items.append(Item(i, str(i), kind, value))
        return items

    def embed_items(self, items: list[Item]):
        """(good items, float32 (M, D) normalised, [(item, reason)]) for one batch."""
        if self.kind == "text":
            p = prepare_texts(items, self.engine.tokenizer)
            emb = self.engine.run_text_tower(p.inputs) if p.good else None
        else:
            p = prepare_images(items, self.policy)
            emb = self.engine.run_image_tower(p.inputs) if p.good else None
        return p.good, (l2_normalize(emb) if emb is not None else None), p.failures

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.column not in batch:
            raise ClipfastError(f"EmbedBatch: the batch has no column {self.column!r} (its "
                                f"columns: {sorted(batch)})")
        values = list(batch[self.column])
        good, emb, failures = self.embed_items(self._items(values))
        out = np.full((len(values), self.engine.embed_dim), np.nan, dtype=self.dtype)
        errors = np.full(len(values), None, dtype=object)
        if emb is not None:
            out[[it.ordinal for it in good]] = emb.astype(self.dtype, copy=False)
        for it, why in failures:
            errors[it.ordinal] = why
        return {**batch, self.output_column: out, self.error_column: errors}


def _window(batches: Iterator[list[Item]], items: int) -> list[list[Item]]:
    out: list[list[Item]] = []
    n = 0
    for b in batches:
        out.append(b)
        n += len(b)
        if n >= items:
            break
    return out


def run_ray_batches(opts, batches: Iterator[list[Item]], batch_size: int
                    ) -> Iterator[tuple[int, list[Item], np.ndarray | None, list]]:
    """``clipfast embed --ray``: the local job's per-batch results, computed by EmbedBatch
    actors. Inputs go to Ray a window at a time (a bounded number of inputs held by the driver:
    one shard, at least ``8 * batch_size * concurrency``), results come back in input order."""
    if not ray.is_initialized():
        ray.init(address=opts.ray_address, ignore_reinit_error=True,
                 log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    column = "text" if opts.kind == "text" else "image"
    kind = "text" if opts.kind == "text" else "auto"
    window_items = max(opts.shard_size, 8 * batch_size * max(1, opts.ray_concurrency))
    engine_kwargs = {"backend": opts.backend, "device": opts.device, "threads": opts.threads}
    while True:
        window = _window(batches, window_items)
        if not window:
            return
        flat = [it for b in window for it in b]
        sent = [it for it in flat if it.kind != "error"]
        by_ordinal: dict[int, tuple[np.ndarray | None, str | None]] = {}
        if sent:
            ds = ray.data.from_items([{"ordinal": it.ordinal, column: it.value} for it in sent])
            ds = ds.map_batches(
                EmbedBatch, fn_constructor_kwargs={
                    "artifact": opts.artifact, "column": column, "kind": kind,
                    "batch_size": batch_size, "fast_decode": opts.fast_decode,
                    **engine_kwargs},
                compute=ray.data.ActorPoolStrategy(size=opts.ray_concurrency),
                batch_size=batch_size,
                num_gpus=1 if opts.device.startswith("cuda") else 0, batch_format="numpy")
            for row in ds.select_columns(["ordinal", "embedding", "error"]).iter_rows():
                by_ordinal[int(row["ordinal"])] = (row["embedding"], row["error"])
        for b in window:
            good, rows, failures = [], [], []
            for it in b:
                if it.kind == "error":
                    failures.append((it, str(it.value)))
                    continue
                emb, err = by_ordinal.get(it.ordinal, (None, "lost by Ray (no result row)"))
                if err is not None:
                    failures.append((it, str(err)))
                else:
                    good.append(it)
                    rows.append(np.asarray(emb, dtype=np.float32))
            yield b[0].ordinal, good, (np.stack(rows) if rows else None), failures


__all__ = ["EmbedBatch", "run_ray_batches"]
