"""``clipfast embed``: stream a source through an Engine into resumable parquet shards.

Work is cut by input ordinal: batch ``b`` holds ordinals ``[b * B, (b + 1) * B)`` and shard
``s`` ordinals ``[s * S, (s + 1) * S)`` with S a multiple of B. Failures leave holes in a batch
instead of pulling later inputs in, so a resumed job (which starts at a shard boundary) forms
exactly the batches an uninterrupted one would, and its rows are bitwise the same.

Overlap: the Engine's image pipeline (``engine.images``: its decode pool, and its GPU path on a
CUDA engine) prepares the next batches while the calling thread runs the tower (ONNX Runtime
releases the GIL; so do Pillow's decode and resize). At most ``prefetch`` batches are in
flight, so memory is bounded by ``prefetch * batch_size`` inputs whatever the dataset's size.

Safety: the job holds an exclusive lock on ``--out`` from start to end; refuses, before
touching anything, an ``--out`` that is neither empty nor a clipfast output, or that overlaps
a source (whatever ``--overwrite`` says); and on resume compares every committed input's
fingerprint with the source's content now, so a changed input is refused (or, with
``reembed_changed``, embedded again), never mixed with rows of its old content.
"""

from __future__ import annotations

import bisect
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipfast.artifact.fidelity import l2_normalize
from clipfast.embed import output as out_mod
from clipfast.embed.decode import (
    ImagePolicy,
    item_results,
    measure_fast_decode,
    prepare_texts,
    sample_values,
    split_images,
)
from clipfast.embed.sources import Item, Plan, iter_items, plan, resolve_sources
from clipfast.errors import ClipfastError

DTYPES = ("float32", "float16")


@dataclass
class EmbedOptions:
    """Everything ``clipfast embed`` takes (CLI flags map one to one)."""

    artifact: str
    sources: list[str]
    out: str
    text_column: str | None = None
    image_column: str | None = None
    key_column: str | None = None
    dtype: str = "float32"
    batch_size: int = 32
    shard_size: int = 4096
    workers: int | None = None
    threads: int | None = None
    prefetch: int | None = None
    backend: str = "auto"
    device: str = "cpu"
    fast_decode: bool = False
    fidelity_sample: int = 16
    overwrite: bool = False
    reembed_changed: bool = False
    progress: bool = True
    ray: bool = False
    ray_address: str | None = None
    ray_concurrency: int = 1
    # Test hook: stop (as if killed) after this many shards are committed in this run.
    stop_after_shards: int | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        return "text" if self.text_column else "image"


@dataclass
class EmbedSummary:
    """What a job did: counts of its inputs, and whether the output is complete."""

    out: str
    items: int
    embedded: int
    failed: int
    shards: int
    resumed_from: int
    seconds: float
    complete: bool


def _identity(opts: EmbedOptions, engine, specs, the_plan: Plan) -> dict[str, Any]:
    """The parts of the manifest that must match for a resume to continue this job."""
    from clipfast.artifact.manifest import artifact_digest

    return {
        "artifact": {"digest": artifact_digest(engine.manifest),
                     "path": str(Path(opts.artifact).resolve()),
                     "family": engine.manifest.spec.family,
                     "precision": engine.manifest.spec.precision},
        "source": {"specs": [s.to_dict() for s in specs], "items": the_plan.items,
                   "keys_sha256": the_plan.keys_sha256},
        "output": {"kind": opts.kind, "dtype": opts.dtype, "fast_decode": opts.fast_decode},
    }


def _mismatch(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    if old.get("artifact", {}).get("digest") != new["artifact"]["digest"]:
        return (f"it was made with artifact {old.get('artifact', {}).get('path')} (digest "
                f"{old.get('artifact', {}).get('digest')}), this run uses "
                f"{new['artifact']['path']} (digest {new['artifact']['digest']})")
    os_, ns = old.get("source", {}), new["source"]
    if os_.get("specs") != ns["specs"]:
        return (f"it was made from {[s['path'] for s in os_.get('specs', [])]}, this run reads "
                f"{[s['path'] for s in ns['specs']]}")
    if (os_.get("items"), os_.get("keys_sha256")) != (ns["items"], ns["keys_sha256"]):
        return (f"the source changed since the job started ({os_.get('items')} inputs then, "
                f"{ns['items']} now, or different names)")
    if old.get("output") != new["output"]:
        return f"it was made with {old.get('output')}, this run asks for {new['output']}"
    return None


class EmbedInterrupted(KeyboardInterrupt):
    """Ctrl-C during a job: ``saved`` of ``total`` inputs are committed (rerun to resume)."""

    def __init__(self, saved: int, total: int):
        super().__init__(f"interrupted: {saved} of {total} saved; rerun the same command to "
                         "resume")
        self.saved, self.total = saved, total


def _check_out(out: Path, specs) -> None:
    """Refuse an --out that overlaps a source: the output inside a source folder (its files
    would become inputs) or a source inside the output (resume or --overwrite would touch it)."""
    o = out.resolve()
    for spec in specs:
        src = Path(spec.path)
        inside = o == src or o.is_relative_to(src) if spec.kind == "folder" else False
        if inside or src.is_relative_to(o):
            raise ClipfastError(
                f"embed: --out {out} overlaps the source {spec.path} (one is inside the other); "
                "choose an --out outside every source (nothing was written)")


def _refuse_foreign(outdir: out_mod.OutputDir, out: str) -> dict[str, Any] | None:
    """The folder's manifest, if it is a clipfast embed output; None if it is empty or new;
    refuses anything else."""
    if outdir.root.exists() and not outdir.root.is_dir():
        raise ClipfastError(f"embed: --out {out} exists and is not a folder")
    if outdir.is_empty():
        return None
    existing = outdir.manifest()
    if existing is None:
        entries = sorted(p.name for p in outdir.root.iterdir())
        raise ClipfastError(
            f"embed: --out {out} is not empty and is not a clipfast embed output (it holds "
            f"{', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}); clipfast never "
            "deletes files it did not write, --overwrite included: choose an empty or new "
            "folder")
    return existing


def _verify(specs, outdir: out_mod.OutputDir, records, stop_at_first: bool
            ) -> list[tuple[int, str, str]]:
    """(ordinal, key, shard index) of every committed input whose content differs from what
    was embedded (its fingerprint), in order; the first only with ``stop_at_first``."""
    if not records:
        return []
    end = records[-1].end
    changed: list[tuple[int, str, str]] = []
    r, stored = 0, outdir.fingerprints(records[0])
    for item in iter_items(specs, want=lambda o: o < end):
        if item.ordinal >= end:
            break
        while item.ordinal >= records[r].end:
            r += 1
            stored = outdir.fingerprints(records[r])
        key, fp = stored.get(item.ordinal, (None, None))
        if fp != item.fingerprint or key != out_mod.escape_text(item.key):
            changed.append((item.ordinal, item.key, records[r].index))
            if stop_at_first:
                break
    return changed


def _covered(records) -> tuple[list[int], list[int]]:
    spans = sorted((r.start, r.end) for r in records)
    return [a for a, _ in spans], [b for _, b in spans]


def _is_covered(starts: list[int], ends: list[int], o: int) -> bool:
    i = bisect.bisect_right(starts, o) - 1
    return i >= 0 and o < ends[i]


def _batches(items: Iterator[Item], batch_size: int) -> Iterator[list[Item]]:
    """Pending items grouped by their ordinal's batch window."""
    batch: list[Item] = []
    window = -1
    for item in items:
        w = item.ordinal // batch_size
        if batch and w != window:
            yield batch
            batch = []
        window = w
        batch.append(item)
    if batch:
        yield batch


class _ShardWriter:
    """Collects finished batches and commits a shard when its ordinal window is done."""

    def __init__(self, outdir: out_mod.OutputDir, records: list, shard_size: int, total: int,
                 dtype: str, dim: int):
        self.outdir, self.records = outdir, records
        self.shard_size, self.total, self.dtype, self.dim = shard_size, total, dtype, dim
        self.window: int | None = None
        self._reset()
        self.committed_now = 0
        self.on_commit = None  # called with the number of inputs a commit saved

    def _reset(self) -> None:
        self.keys: list[str] = []
        self.ordinals: list[int] = []
        self.fingerprints: list[str | None] = []
        self.parts: list[np.ndarray] = []
        self.failures: list[dict[str, Any]] = []
        self.seen = 0

    def add(self, first_ordinal: int, good: list[Item], emb: np.ndarray | None,
            failures: list[tuple[Item, str]]) -> None:
        w = first_ordinal // self.shard_size
        if self.window is not None and w != self.window:
            self.flush()
        self.window = w
        self.keys.extend(it.key for it in good)
        self.ordinals.extend(it.ordinal for it in good)
        self.fingerprints.extend(it.fingerprint for it in good)
        if emb is not None and len(emb):
            self.parts.append(emb)
        self.failures.extend({"key": it.key, "ordinal": it.ordinal, "reason": why,
                              "fingerprint": it.fingerprint} for it, why in failures)
        self.failures.sort(key=lambda r: r["ordinal"])
        self.seen += len(good) + len(failures)
        start = w * self.shard_size
        if self.seen == min(start + self.shard_size, self.total) - start:
            self.flush()  # the window is whole: commit now, not when the next batch arrives

    def flush(self) -> None:
        if self.window is None:
            return
        start = self.window * self.shard_size
        end = min(start + self.shard_size, self.total)
        emb = (np.concatenate(self.parts) if self.parts
               else np.zeros((0, self.dim), dtype=self.dtype))
        if self.seen != end - start:
            raise ClipfastError(f"embed: the source changed while the job ran (inputs "
                                f"[{start}, {end}) gave {self.seen}); rerun the same command")
        rec = self.outdir.commit(len(self.records), start, end, self.keys, self.ordinals,
                                 emb.astype(self.dtype, copy=False), self.failures,
                                 self.fingerprints)
        self.records.append(rec)
        self.committed_now += 1
        self.window = None
        self._reset()
        if self.on_commit is not None:
            self.on_commit(rec)


class _Stop(Exception):
    """The stop_after_shards test hook fired."""


def _engine(opts: EmbedOptions):
    import clipfast

    return clipfast.Engine(opts.artifact, backend=opts.backend, device=opts.device,
                           batch_size=opts.batch_size, threads=opts.threads,
                           decode_workers=opts.workers or default_workers())


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


def run_embed(opts: EmbedOptions, engine=None) -> EmbedSummary:
    """Run (or resume) one embed job; returns its summary. ClipfastError on a refused output
    folder, bad options or sources. ``engine``: an Engine already loaded for
    ``opts.artifact`` (its batch size, threads and decode pool then apply), else one is
    loaded."""
    t0 = time.perf_counter()
    out_mod.pyarrow_modules()  # fail now, with the extra's name, not after the first shard
    if opts.dtype not in DTYPES:
        raise ClipfastError(f"embed: --dtype {opts.dtype!r}: expected one of {DTYPES}")
    if opts.batch_size < 1 or opts.shard_size < 1:
        raise ClipfastError("embed: --batch-size and --shard-size must be at least 1")
    if opts.fast_decode and opts.kind == "text":
        raise ClipfastError("embed: --fast-decode applies to images, not --text-column")
    shard_size = -(-opts.shard_size // opts.batch_size) * opts.batch_size
    specs = resolve_sources(opts.sources, text_column=opts.text_column,
                            image_column=opts.image_column, key_column=opts.key_column)
    outdir = out_mod.OutputDir(opts.out)
    # Everything that can refuse the job runs before anything in --out is touched.
    _check_out(outdir.root, specs)
    _refuse_foreign(outdir, opts.out)
    if opts.ray:
        from clipfast.ray.data import connect

        connect(opts.ray_address)
    outdir.root.mkdir(parents=True, exist_ok=True)
    with out_mod.JobLock(outdir.root):
        existing = _refuse_foreign(outdir, opts.out)  # again: another job may have started
        return _locked(opts, engine, specs, outdir, existing, shard_size, t0)


def _locked(opts: EmbedOptions, engine, specs, outdir: out_mod.OutputDir,
            existing: dict[str, Any] | None, shard_size: int, t0: float) -> EmbedSummary:
    """The job proper, with the lock on --out held."""
    engine = _Handle(opts, engine)
    the_plan = plan(specs)
    ident = _identity(opts, engine, specs, the_plan)
    if existing is not None and opts.overwrite:
        outdir.clear()
        existing = None
    if existing is not None:
        if existing.get("format_version") != out_mod.FORMAT_VERSION:
            raise ClipfastError(f"embed: --out {opts.out} was written by another clipfast "
                                f"version (format {existing.get('format_version')}, this one "
                                f"writes {out_mod.FORMAT_VERSION}); pass --overwrite to start "
                                "over, or choose another --out")
        why = _mismatch(existing, ident)
        if why is not None:
            raise ClipfastError(f"embed: --out {opts.out} already holds another job's output: "
                                f"{why}. Pass --overwrite to replace it, or choose another --out")
        batch_size = int(existing["options"]["batch_size"])
        shard_size = int(existing["options"]["shard_size"])
        manifest = existing
    else:
        batch_size = opts.batch_size
        manifest = {
            "format": out_mod.FORMAT, "format_version": out_mod.FORMAT_VERSION,
            "status": "running", **ident, "embed_dim": engine.embed_dim,
            "options": {"dtype": opts.dtype, "batch_size": batch_size, "shard_size": shard_size,
                        "fast_decode": opts.fast_decode, "text_column": opts.text_column,
                        "image_column": opts.image_column, "key_column": opts.key_column},
            "fast_decode_fidelity": None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        # The manifest first: from then on the folder is recognisably clipfast's.
        outdir.write_manifest(manifest)
    records = outdir.recover()
    changed = _verify(specs, outdir, records, stop_at_first=opts.reembed_changed)
    if changed and not opts.reembed_changed:
        names = ", ".join(f"{out_mod.escape_text(k)} (input {o})" for o, k, _ in changed[:5])
        raise ClipfastError(
            f"embed: {len(changed)} input(s) changed since they were embedded into --out "
            f"{opts.out}: {names}{', ...' if len(changed) > 5 else ''}. Nothing was mixed: pass "
            "--reembed-changed to embed them again, or --overwrite to start over")
    if changed:
        first_shard = changed[0][2]
        outdir.truncate(first_shard)
        records = outdir.recover()
        if manifest.get("status") == "complete":
            manifest["status"] = "running"
            outdir.write_manifest(manifest)
    done_before = sum(r.end - r.start for r in records)
    if manifest.get("status") == "complete" and done_before == the_plan.items:
        return _summary(opts, manifest, records, done_before, t0, complete=True)
    if opts.fast_decode and manifest.get("fast_decode_fidelity") is None:
        policy = ImagePolicy.of(engine.loaded(opts), fast=True)
        manifest["fast_decode_fidelity"] = measure_fast_decode(
            engine.loaded(opts), sample_values(iter_items(specs), opts.fidelity_sample), policy)
        outdir.write_manifest(manifest)

    starts, ends = _covered(records)
    writer = _ShardWriter(outdir, records, shard_size, the_plan.items, opts.dtype,
                          engine.embed_dim)
    stream = (it for it in iter_items(specs, want=lambda o: not _is_covered(starts, ends, o))
              if not _is_covered(starts, ends, it.ordinal))
    bar = None
    if opts.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=the_plan.items, initial=done_before, unit="item", desc="embed",
                   dynamic_ncols=True, smoothing=0.1, file=sys.stderr)
        bar.set_postfix(failed=sum(r.failed for r in records), refresh=False)
        failed_total = [sum(r.failed for r in records)]

        def saved(rec) -> None:  # the bar counts what is committed, not what is computed
            failed_total[0] += rec.failed
            bar.update(rec.end - rec.start)
            bar.set_postfix(failed=failed_total[0], refresh=False)

        writer.on_commit = saved
    try:
        if opts.ray:
            from clipfast.ray.data import run_ray_batches

            results = run_ray_batches(opts, _batches(stream, batch_size), batch_size)
        else:
            results = _run_local(opts, engine.loaded(opts), _batches(stream, batch_size))
        for first, good, emb, failures in results:
            writer.add(first, good, emb, failures)
            if opts.stop_after_shards is not None and (
                    writer.committed_now >= opts.stop_after_shards):
                raise _Stop
        writer.flush()
    except _Stop:
        return _summary(opts, manifest, records, done_before, t0, complete=False)
    except KeyboardInterrupt:
        # Counted from the journal, the commit point: Ctrl-C may land between a shard's
        # journal line and its bookkeeping here.
        try:
            done = outdir.committed()
        except (OSError, ClipfastError):
            done = records
        raise EmbedInterrupted(sum(r.end - r.start for r in done), the_plan.items) from None
    finally:
        if bar is not None:
            bar.close()
    covered = sum(r.end - r.start for r in records)
    if covered != the_plan.items:
        raise ClipfastError(f"embed: the source changed while the job ran ({the_plan.items} "
                            f"inputs planned, {covered} seen); run the command again")
    failed = outdir.write_failures_table(records)
    manifest.update({
        "status": "complete",
        "completed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "counts": {"items": the_plan.items, "embedded": sum(r.rows for r in records),
                   "failed": failed, "shards": len(records)},
        "shards": [r.to_dict() for r in records],
        "engine": engine.facts(opts),
    })
    outdir.write_manifest(manifest)
    return _summary(opts, manifest, records, done_before, t0, complete=True)


def _summary(opts, manifest, records, done_before, t0, complete) -> EmbedSummary:
    return EmbedSummary(out=opts.out, items=int(manifest["source"]["items"]),
                        embedded=sum(r.rows for r in records),
                        failed=sum(r.failed for r in records), shards=len(records),
                        resumed_from=done_before, seconds=time.perf_counter() - t0,
                        complete=complete)


class _Handle:
    """The artifact's facts, and the Engine: loaded at once for a local job; on demand only
    (to measure --fast-decode) on a Ray driver, whose actors load their own."""

    def __init__(self, opts: EmbedOptions, engine=None):
        from clipfast.artifact.manifest import load_manifest

        self._engine = engine if engine is not None or opts.ray else _engine(opts)
        self.manifest = (self._engine.manifest if self._engine is not None
                         else load_manifest(opts.artifact))
        self.embed_dim = self.manifest.spec.embed_dim

    def loaded(self, opts: EmbedOptions):
        if self._engine is None:
            self._engine = _engine(opts)
        return self._engine

    def facts(self, opts: EmbedOptions) -> dict[str, Any]:
        if opts.ray:
            return {"ray": True, "address": opts.ray_address,
                    "concurrency": opts.ray_concurrency, "batch_size": opts.batch_size}
        d = self._engine.describe()
        workers = self._engine.images.workers
        return {"backend": d.get("backend"), "device": self._engine.backend_device,
                "intra_op_threads": (d.get("session") or {}).get("intra_op_threads"),
                "decode_workers": workers, "prefetch_batches": _prefetch(opts, workers),
                "batch_size": opts.batch_size}


def _prefetch(opts: EmbedOptions, workers: int) -> int:
    return max(1, opts.prefetch or workers + 1)


def _run_local(opts: EmbedOptions, engine, batches: Iterator[list[Item]]
               ) -> Iterator[tuple[int, list[Item], np.ndarray | None, list]]:
    """(first ordinal, good items, embeddings, failures) per batch, in order; the engine's
    pipeline prepares at most ``prefetch`` batches (the one in the tower included)."""
    pipeline = engine.images
    ahead = _prefetch(opts, pipeline.workers) - 1
    if opts.kind == "text":
        tok = engine.tokenizer

        def prepare(items):
            return items, prepare_texts(items, tok)

        for batch, p in pipeline.prefetched(prepare, batches, ahead):
            emb = l2_normalize(engine.run_text_tower(p.inputs)) if p.good else None
            yield batch[0].ordinal, p.good, emb, p.failures
        return
    pulled: deque = deque()

    def values():
        """Each batch's decodable payloads; the batch is kept for its results."""
        for batch in batches:
            ok, failures = split_images(batch)
            pulled.append((batch, ok, failures))
            yield [it.value for it in ok]

    stream = pipeline.stream(values(), prefetch=ahead, fast=opts.fast_decode)
    try:
        for p in stream:
            batch, ok, failures = pulled.popleft()
            good, failures = item_results(ok, p, failures)
            emb = engine.embed_prepared([p]).embeddings if good else None
            yield batch[0].ordinal, good, emb, failures
    finally:
        stream.close()  # on an error or Ctrl-C, the batches being prefetched are cancelled


__all__ = ["DTYPES", "EmbedInterrupted", "EmbedOptions", "EmbedSummary", "run_embed"]
