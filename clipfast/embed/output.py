"""The output folder of ``clipfast embed``: parquet shards, a commit journal, the manifest.

Layout of ``--out DIR``::

    manifest.json            what the job is (artifact digest, sources, options, fidelity of
                             --fast-decode); at the end also every shard and the counts
    journal.jsonl            one line per committed shard: the commit point
    shards/part-000000.parquet   key (string), ordinal (int64), embedding (fixed-size list)
    failures/part-000000.parquet key, ordinal, reason (only for shards with failures)
    failures.parquet         every failure of the job, written when the job completes

A shard is committed in three steps: its parquet files are written under a temporary name,
fsynced and renamed into place (``os.replace``), then one JSON line naming them and the input
ordinals they cover is appended to the journal and fsynced. A kill at any point leaves either a
journal line (the shard counts) or none (the shard's files, if any, are orphans: deleted and
redone on resume). A torn last journal line (a kill inside the append) is cut off on resume.
The journal is append-only so a long job never rewrites a growing file per shard.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from clipfast.errors import ClipfastError

FORMAT = "clipfast-embeddings"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
JOURNAL = "journal.jsonl"
SHARDS = "shards"
FAILURES = "failures"
FAILURES_TABLE = "failures.parquet"
_OURS = (MANIFEST, JOURNAL, SHARDS, FAILURES, FAILURES_TABLE)


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ClipfastError("clipfast embed needs pyarrow: pip install 'clipfast[embed]'"
                            ) from e
    return pa, pq


def _fsync_dir(path: Path) -> None:
    # The rename itself must reach the disk for a committed shard to survive a power cut.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync, rename it to ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with open(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    atomic_write_bytes(path, lambda f: f.write((json.dumps(doc, indent=2) + "\n").encode()))


def embedding_table(keys: list[str], ordinals: list[int], emb: np.ndarray):
    """A pyarrow table: key, ordinal, embedding as a fixed-size list of the array's dtype."""
    pa, _ = _pyarrow()
    dim = emb.shape[1] if emb.ndim == 2 else 0
    flat = pa.array(np.ascontiguousarray(emb).reshape(-1))
    return pa.table({
        "key": pa.array(keys, type=pa.string()),
        "ordinal": pa.array(ordinals, type=pa.int64()),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
    })


def failures_table(rows: list[dict[str, Any]]):
    pa, _ = _pyarrow()
    return pa.table({
        "key": pa.array([r["key"] for r in rows], type=pa.string()),
        "ordinal": pa.array([r["ordinal"] for r in rows], type=pa.int64()),
        "reason": pa.array([r["reason"] for r in rows], type=pa.string()),
    })


def _write_parquet(path: Path, table) -> None:
    _, pq = _pyarrow()
    atomic_write_bytes(path, lambda f: pq.write_table(table, f))


@dataclass
class ShardRecord:
    """One committed shard: the input ordinals ``[start, end)`` it covers, its files and
    counts."""

    index: int
    start: int
    end: int
    rows: int
    failed: int
    file: str
    failures_file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "start": self.start, "end": self.end, "rows": self.rows,
                "failed": self.failed, "file": self.file, "failures_file": self.failures_file}


class OutputDir:
    """Writer side of an output folder (one job at a time)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # -- state -------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any] | None:
        path = self.root / MANIFEST
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ClipfastError(f"embed: {path} is unreadable ({e}); pass --overwrite to start "
                                "again") from e
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ClipfastError(f"embed: {path} is not a clipfast embed manifest; choose another "
                                "--out or pass --overwrite")
        return doc

    def write_manifest(self, doc: dict[str, Any]) -> None:
        write_json(self.root / MANIFEST, doc)

    def foreign_entries(self) -> list[str]:
        """Entries of the folder that clipfast embed did not make."""
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.name not in _OURS
                      and not p.name.startswith(f".{MANIFEST}."))

    def clear(self) -> None:
        """Remove what clipfast embed wrote (and nothing else)."""
        for name in _OURS:
            p = self.root / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        for p in self.root.glob(f".{MANIFEST}.*"):
            p.unlink()

    def recover(self) -> list[ShardRecord]:
        """Committed shards from the journal. A torn last line (killed mid-append) is cut off;
        shard files and temporaries no journal line names are deleted."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / SHARDS).mkdir(exist_ok=True)
        (self.root / FAILURES).mkdir(exist_ok=True)
        path = self.root / JOURNAL
        records: list[ShardRecord] = []
        if path.exists():
            data = path.read_bytes()
            good = 0
            pos = 0
            while True:
                nl = data.find(b"\n", pos)
                if nl < 0:
                    break
                try:
                    rec = ShardRecord(**json.loads(data[pos:nl]))
                except (ValueError, TypeError):
                    break
                if rec.index != len(records):
                    break
                records.append(rec)
                pos = good = nl + 1
            if good != len(data):
                with open(path, "r+b") as f:
                    f.truncate(good)
                    f.flush()
                    os.fsync(f.fileno())
        for p in self.root.glob(f".{MANIFEST}.*.tmp"):  # a manifest write cut short
            p.unlink()
        named = {r.file for r in records} | {r.failures_file for r in records if r.failures_file}
        for folder in (SHARDS, FAILURES):
            for p in (self.root / folder).iterdir():
                if f"{folder}/{p.name}" not in named:
                    p.unlink()
        return records

    def commit(self, index: int, start: int, end: int, keys: list[str], ordinals: list[int],
               emb: np.ndarray, failures: list[dict[str, Any]]) -> ShardRecord:
        """Write one shard covering ordinals ``[start, end)`` and append it to the journal."""
        name = f"part-{index:06d}.parquet"
        rec = ShardRecord(index, start, end, len(keys), len(failures), f"{SHARDS}/{name}")
        _write_parquet(self.root / rec.file, embedding_table(keys, ordinals, emb))
        if failures:
            rec.failures_file = f"{FAILURES}/{name}"
            _write_parquet(self.root / rec.failures_file, failures_table(failures))
        line = (json.dumps(rec.to_dict()) + "\n").encode()
        fd = os.open(self.root / JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        return rec

    def write_failures_table(self, records: list[ShardRecord]) -> int:
        """Gather every shard's failures into failures.parquet; returns how many."""
        pa, pq = _pyarrow()
        tables = [pq.read_table(self.root / r.failures_file) for r in records if r.failures_file]
        table = pa.concat_tables(tables) if tables else failures_table([])
        _write_parquet(self.root / FAILURES_TABLE, table)
        return table.num_rows


# --------------------------------------------------------------------------- reading


class Embeddings(NamedTuple):
    """What ``read_embeddings`` returns: ``keys`` (N,) and ``embeddings`` float32 / float16
    ``(N, D)``, rows in input order."""

    keys: list[str]
    embeddings: np.ndarray


def _committed(root: Path) -> tuple[dict[str, Any], list[ShardRecord]]:
    mpath = root / MANIFEST
    if not mpath.exists():
        raise ClipfastError(f"{root} has no {MANIFEST}: not a clipfast embed output folder")
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ClipfastError(f"{mpath} is not a clipfast embed manifest")
    records: list[ShardRecord] = []
    jpath = root / JOURNAL
    if jpath.exists():
        for line in jpath.read_bytes().split(b"\n"):
            try:
                records.append(ShardRecord(**json.loads(line)))
            except (ValueError, TypeError):
                break  # a torn last line: that shard was not committed
    return manifest, records


def read_embeddings(directory: str | os.PathLike, *, require_complete: bool = True
                    ) -> Embeddings:
    """Keys and one embedding matrix from a ``clipfast embed --out`` folder.

    Only committed shards are read (the journal's), in input order. ``require_complete``
    (default): refuse a job that has not finished (resume it first); False reads what is
    committed so far.
    """
    _, pq = _pyarrow()
    root = Path(directory)
    manifest, records = _committed(root)
    if require_complete and manifest.get("status") != "complete":
        raise ClipfastError(f"{root}: the embed job has not completed ({len(records)} shards "
                            "committed so far); run the same clipfast embed command again to "
                            "finish it, or pass require_complete=False")
    keys: list[str] = []
    parts: list[np.ndarray] = []
    dim = int(manifest.get("embed_dim") or 0)
    dtype = np.dtype(manifest.get("options", {}).get("dtype", "float32"))
    for r in sorted(records, key=lambda r: r.start):
        table = pq.read_table(root / r.file, columns=["key", "embedding"])
        keys.extend(table.column("key").to_pylist())
        col = table.column("embedding").combine_chunks()
        flat = col.values.to_numpy(zero_copy_only=False) if len(col) else np.zeros(0, dtype)
        parts.append(np.asarray(flat, dtype=dtype).reshape(len(col), dim))
    emb = np.concatenate(parts) if parts else np.zeros((0, dim), dtype=dtype)
    return Embeddings(keys, emb)


def read_failures(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """Every failure committed so far: dicts with key, ordinal and reason, in input order."""
    _, pq = _pyarrow()
    root = Path(directory)
    _, records = _committed(root)
    rows: list[dict[str, Any]] = []
    for r in sorted(records, key=lambda r: r.start):
        if r.failures_file:
            rows.extend(pq.read_table(root / r.failures_file).to_pylist())
    return rows
