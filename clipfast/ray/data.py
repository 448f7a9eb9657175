"""Ray Data: embed a Dataset's images or texts with ``map_batches``, one Engine per actor.

>>> import ray, clipfast.ray                                   # doctest: +SKIP
>>> ds = ray.data.read_parquet("s3://bucket/images/")           # doctest: +SKIP
>>> actors = max(1, int(ray.cluster_resources()["CPU"]) - 1)    # doctest: +SKIP
>>> ds = ds.map_batches(clipfast.ray.EmbedBatch,                # doctest: +SKIP
...                     fn_constructor_kwargs={"artifact": "/models/vit-b-32", "column": "image"},
...                     compute=ray.data.ActorPoolStrategy(size=actors), batch_size=64)

(Each actor takes one CPU by default: leave one for the read tasks, or the pipeline waits
forever for a CPU.)

``clipfast embed --ray`` runs the same class under the job's resumable shard writer
(``run_ray_batches``): the driver enumerates the inputs, Ray actors decode and embed them, and
the driver commits the shards, so the output folder is the local job's, row for row. Inputs
whose results do not come back (a node lost mid-job) are sent again; each input's row is
committed once, by the driver.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray

from clipfast.artifact.fidelity import l2_normalize
from clipfast.embed.decode import item_results, prepare_texts, split_images
from clipfast.embed.sources import Item
from clipfast.errors import ClipfastError

KINDS = ("auto", "image_bytes", "image_path", "text")
# Rounds of resending a window's inputs whose results did not come back (a node lost).
ATTEMPTS = 4
log = logging.getLogger(__name__)


def connect(address: str | None) -> None:
    """Join the Ray cluster at ``address`` (None: start a local one), with an error that says
    what to do when none answers (Ray itself retries a dead address for minutes, or raises a
    bare ConnectionError)."""
    if ray.is_initialized():
        return
    hint = ("start one (`ray start --head` on the head node), check --address, or leave "
            "--address out to run on a local Ray")
    if address and address not in ("auto", "local"):
        host, _, port = address.split("://", 1)[-1].rpartition(":")
        if host and port.isdigit():
            try:
                socket.create_connection((host, int(port)), timeout=10).close()
            except OSError as e:
                raise ClipfastError(f"embed --ray: no Ray cluster answers at --address "
                                    f"{address} ({e.strerror or e}); {hint}") from e
    try:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    except ConnectionError as e:
        raise ClipfastError(f"embed --ray: no Ray cluster answers at --address {address} "
                            f"({e}); {hint}") from e


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
        self.fast_decode = fast_decode

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
            emb = l2_normalize(self.engine.run_text_tower(p.inputs)) if p.good else None
            return p.good, emb, p.failures
        # the Engine's image pipeline: its loading policy, decode path (the GPU's on a CUDA
        # engine) and pool, as for every other front door
        ok, failures = split_images(items)
        prepared = self.engine.images.prepare([it.value for it in ok], fast=self.fast_decode)
        good, failures = item_results(ok, prepared, failures)
        emb = self.engine.embed_prepared([prepared]).embeddings if good else None
        return good, emb, failures

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


def _actor_cpus(concurrency: int) -> float:
    """CPUs each actor asks for: one, or an equal share when the cluster has fewer CPUs than
    actors (asking for more than exists leaves the pool waiting forever)."""
    total = float(ray.cluster_resources().get("CPU", 1.0))
    return min(1.0, total / max(1, concurrency))


def _embed_window(opts, items: list[Item], batch_size: int, column: str, kind: str,
                  num_cpus: float) -> dict[int, tuple[Any, Any]]:
    """ordinal -> (embedding, error) for the inputs of one window whose results came back."""
    got: dict[int, tuple[Any, Any]] = {}
    engine_kwargs = {"backend": opts.backend, "device": opts.device, "threads": opts.threads}
    pending = items
    for attempt in range(ATTEMPTS):
        ds = ray.data.from_items([{"ordinal": it.ordinal, column: it.value} for it in pending])
        ds = ds.map_batches(
            EmbedBatch, fn_constructor_kwargs={
                "artifact": opts.artifact, "column": column, "kind": kind,
                "batch_size": batch_size, "fast_decode": opts.fast_decode, **engine_kwargs},
            compute=ray.data.ActorPoolStrategy(size=opts.ray_concurrency),
            batch_size=batch_size, num_cpus=num_cpus,
            num_gpus=1 if opts.device.startswith("cuda") else 0, batch_format="numpy")
        try:
            for row in ds.select_columns(["ordinal", "embedding", "error"]).iter_rows():
                got.setdefault(int(row["ordinal"]), (row["embedding"], row["error"]))
        except (ray.exceptions.RayError, ConnectionError) as e:
            # a node or actor lost past Ray's own retries: the rows that came back are kept
            # (keyed by ordinal, so none twice), the others are sent again
            log.warning("embed --ray: attempt %d of %d lost inputs (%s); resending them",
                        attempt + 1, ATTEMPTS, e)
        pending = [it for it in pending if it.ordinal not in got]
        if not pending:
            break
    return got


def run_ray_batches(opts, batches: Iterator[list[Item]], batch_size: int
                    ) -> Iterator[tuple[int, list[Item], np.ndarray | None, list]]:
    """``clipfast embed --ray``: the local job's per-batch results, computed by EmbedBatch
    actors. Inputs go to Ray a window at a time (a bounded number of inputs held by the driver:
    one shard, at least ``8 * batch_size * concurrency``), results come back in input order."""
    connect(opts.ray_address)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    column = "text" if opts.kind == "text" else "image"
    kind = "text" if opts.kind == "text" else "auto"
    window_items = max(opts.shard_size, 8 * batch_size * max(1, opts.ray_concurrency))
    num_cpus = _actor_cpus(opts.ray_concurrency)
    while True:
        window = _window(batches, window_items)
        if not window:
            return
        flat = [it for b in window for it in b]
        sent = [it for it in flat if it.kind != "error"]
        by_ordinal = (_embed_window(opts, sent, batch_size, column, kind, num_cpus)
                      if sent else {})
        for b in window:
            good, rows, failures = [], [], []
            for it in b:
                if it.kind == "error":
                    failures.append((it, str(it.value)))
                    continue
                emb, err = by_ordinal.get(it.ordinal, (
                    None, f"no result from Ray after {ATTEMPTS} attempts (nodes lost)"))
                if err is not None:
                    failures.append((it, str(err)))
                else:
                    good.append(it)
                    rows.append(np.asarray(emb, dtype=np.float32))
            yield b[0].ordinal, good, (np.stack(rows) if rows else None), failures


__all__ = ["EmbedBatch", "connect", "run_ray_batches"]
