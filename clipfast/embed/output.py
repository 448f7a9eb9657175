"""The output folder of ``clipfast embed``: parquet shards, a commit journal, the manifest.

Layout of ``--out DIR``::

    manifest.json            what the job is (artifact digest, sources, options, fidelity of
                             --fast-decode); at the end also every shard and the counts
    journal.jsonl            one line per committed shard: the commit point
    .clipfast-embed.lock     the job's exclusive lock (flock), naming its holder
    shards/part-000000.parquet   key (string), ordinal (int64), embedding (fixed-size list),
                                 fingerprint (what the input was when it was embedded)
    failures/part-000000.parquet key, ordinal, reason, fingerprint (shards with failures only)
    failures.parquet         every failure of the job, written when the job completes

A shard is committed in three steps: its parquet files are written under a temporary name,
fsynced and renamed into place (``os.replace``), then one JSON line naming them and the input
ordinals they cover is appended to the journal and fsynced. A kill at any point leaves either a
journal line (the shard counts) or none (the shard's files, if any, are orphans: deleted and
redone on resume). A torn last journal line (a kill inside the append) is cut off on resume.
The journal is append-only so a long job never rewrites a growing file per shard.

Deleting: only what the journal names, the folder's own fixed names (manifest, journal,
failures table) and shard names ``part-NNNNNN.parquet`` past the last committed one (left by a
kill) are ever removed; anything else a user put there stays.

Strings are written as UTF-8. Keys from file or member names that are not UTF-8 (Python keeps
their bytes as surrogate escapes) are written with backslash escapes: byte 0xFF becomes the
four characters ``\\xff``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from clipfast.errors import ClipfastError

FORMAT = "clipfast-embeddings"
FORMAT_VERSION = 2  # 2: per-item fingerprints in every shard
MANIFEST = "manifest.json"
JOURNAL = "journal.jsonl"
LOCK = ".clipfast-embed.lock"
SHARDS = "shards"
FAILURES = "failures"
FAILURES_TABLE = "failures.parquet"
_OURS = (MANIFEST, JOURNAL, SHARDS, FAILURES, FAILURES_TABLE, LOCK)
_PART = re.compile(r"part-(\d{6})\.parquet")
# atomic_write_bytes' temporaries: ".<name>.<random>.tmp"
_TEMP = re.compile(r"\.(part-\d{6}\.parquet|manifest\.json|failures\.parquet)\.[^/]+\.tmp")


def escape_text(s: str) -> str:
    """``s`` as valid UTF-8 text: a surrogate escape (an undecodable byte of a file name, as
    Python reads it) becomes ``\\xNN``, any other lone surrogate ``\\uNNNN``; everything else
    is unchanged."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        pass
    out = []
    for ch in s:
        o = ord(ch)
        out.append(f"\\x{o - 0xDC00:02x}" if 0xDC80 <= o <= 0xDCFF else
                   f"\\u{o:04x}" if 0xD800 <= o <= 0xDFFF else ch)
    return "".join(out)


def _no_space(e: OSError, path: Path) -> ClipfastError | None:
    """The user's next step for a full disk or quota, else None."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ClipfastError(f"embed: no space left writing {path} ({e.strerror}); free some "
                             "space (or choose an --out on another disk), then rerun the same "
                             "command: the job resumes after its last saved shard")
    return None


def pyarrow_modules(command: str = "clipfast embed", extra: str = "embed"):
    """``(pyarrow, pyarrow.parquet)``, or an error naming ``command`` and the extra to install."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ClipfastError(f"{command} needs pyarrow: pip install 'clipfast[{extra}]'") from e
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
    try:
        atomic_write_bytes(path, lambda f: f.write((json.dumps(doc, indent=2) + "\n").encode()))
    except OSError as e:
        raise (_no_space(e, path) or e) from e


def _strings(values) -> list[str | None]:
    return [None if v is None else escape_text(str(v)) for v in values]


def embedding_table(keys: list[str], ordinals: list[int], emb: np.ndarray,
                    fingerprints: list[str | None] | None = None):
    """A pyarrow table: key, ordinal, embedding as a fixed-size list of the array's dtype, and
    each input's fingerprint."""
    pa, _ = pyarrow_modules()
    dim = emb.shape[1] if emb.ndim == 2 else 0
    flat = pa.array(np.ascontiguousarray(emb).reshape(-1))
    return pa.table({
        "key": pa.array(_strings(keys), type=pa.string()),
        "ordinal": pa.array(ordinals, type=pa.int64()),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        "fingerprint": pa.array(fingerprints or [None] * len(keys), type=pa.string()),
    })


def failures_table(rows: list[dict[str, Any]], fingerprints: bool = True):
    pa, _ = pyarrow_modules()
    cols = {
        "key": pa.array(_strings(r["key"] for r in rows), type=pa.string()),
        "ordinal": pa.array([r["ordinal"] for r in rows], type=pa.int64()),
        "reason": pa.array(_strings(r["reason"] for r in rows), type=pa.string()),
    }
    if fingerprints:
        cols["fingerprint"] = pa.array([r.get("fingerprint") for r in rows], type=pa.string())
    return pa.table(cols)


def _write_parquet(path: Path, table) -> None:
    _, pq = pyarrow_modules()
    try:
        atomic_write_bytes(path, lambda f: pq.write_table(table, f))
    except OSError as e:
        raise (_no_space(e, path) or e) from e


class JobLock:
    """An exclusive ``flock`` on ``--out/.clipfast-embed.lock`` for the whole job. The holder
    writes its pid, host, command and start time into the file so a refused job can name it.
    The kernel drops the lock when the holder exits, however it exits (kill -9 included), so a
    lock is never stale; a stopped (SIGSTOP) holder still holds it."""

    def __init__(self, root: Path):
        self.path = root / LOCK
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise ClipfastError(f"embed: cannot create the job's lock file {self.path} "
                                f"({e.strerror}); --out must be a writable folder") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            try:
                holder = os.read(fd, 4096).decode("utf-8", "replace").strip()
            finally:
                os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ClipfastError(f"embed: cannot lock {self.path}: {e}") from e
            try:
                h = json.loads(holder)
                who = (f"pid {h.get('pid')} on {h.get('host')}, started {h.get('started')}: "
                       f"{h.get('command')}")
            except ValueError:
                who = "a job that is starting up"
            raise ClipfastError(
                f"embed: --out {self.path.parent} is in use by another clipfast embed job "
                f"({who}); wait for it to end (or stop it), then rerun this command") from None
        doc = {"pid": os.getpid(), "host": socket.gethostname(),
               "command": " ".join(sys.argv),
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(doc) + "\n").encode("utf-8", "backslashreplace"), 0)
        except OSError as e:
            self.release()
            raise (_no_space(e, self.path) or e) from e

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)  # drops the flock
            self.fd = None

    def __enter__(self) -> JobLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


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


def check_records(records: list[ShardRecord], where: Path) -> None:
    """Committed shards must cover ordinals 0, 1, 2, ... once each, in index order; anything
    else (two writers, a hand-edited journal) is refused, not read."""
    end = 0
    for i, r in enumerate(records):
        if r.index != i or r.start != end or r.end <= r.start or r.rows < 0 or r.failed < 0 \
                or r.rows + r.failed != r.end - r.start:
            raise ClipfastError(
                f"{where}: shard {r.index} (line {i + 1}) covers inputs [{r.start}, {r.end}) "
                f"with {r.rows} rows and {r.failed} failures, but the previous shards end at "
                f"input {end}: duplicate or missing inputs (was the folder written by two "
                "jobs?). Start over with --overwrite")
        end = r.end


def _parse_journal(data: bytes, where: Path) -> tuple[list[ShardRecord], int]:
    """The journal's records and the length of its intact part. Only the last line may be torn
    (a kill inside the append); damage before it is refused."""
    records: list[ShardRecord] = []
    pos = 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        try:
            records.append(ShardRecord(**json.loads(data[pos:nl])))
        except (ValueError, TypeError) as e:
            raise ClipfastError(f"{where}: line {len(records) + 1} is damaged ({e}); start over "
                                "with --overwrite") from e
        pos = nl + 1
    check_records(records, where)
    return records, pos


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
            raise ClipfastError(f"embed: {path} is not a clipfast embed manifest ({e}); clipfast "
                                "never deletes files it did not write: choose another --out"
                                ) from e
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ClipfastError(f"embed: {path} is not a clipfast embed manifest; clipfast "
                                "never deletes files it did not write: choose another --out")
        return doc

    def write_manifest(self, doc: dict[str, Any]) -> None:
        write_json(self.root / MANIFEST, doc)

    def foreign_entries(self) -> list[str]:
        """Entries of the folder that clipfast embed did not make."""
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.name not in _OURS
                      and not _TEMP.fullmatch(p.name))

    def is_empty(self) -> bool:
        """Nothing in the folder but what a job that died while starting may have left (the
        lock file, a manifest temporary)."""
        if not self.root.exists():
            return True
        return all(p.name == LOCK or _TEMP.fullmatch(p.name) for p in self.root.iterdir())

    def _journal(self) -> tuple[list[ShardRecord], int, bytes]:
        path = self.root / JOURNAL
        data = path.read_bytes() if path.exists() else b""
        records, good = _parse_journal(data, path)
        return records, good, data

    def committed(self) -> list[ShardRecord]:
        """The shards the journal commits now (what a rerun resumes after)."""
        return self._journal()[0]

    def _unlink(self, p: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()

    def _remove_orphans(self, keep: set[str], first_free: int) -> None:
        """Shard files a kill left behind (our names, past the committed ones) and our
        temporaries; nothing else."""
        for folder in (SHARDS, FAILURES):
            d = self.root / folder
            if not d.is_dir():
                continue
            for p in d.iterdir():
                m = _PART.fullmatch(p.name)
                if (m and int(m.group(1)) >= first_free and f"{folder}/{p.name}" not in keep) \
                        or (_TEMP.fullmatch(p.name) and p.is_file()):
                    self._unlink(p)
        for p in self.root.iterdir():
            if _TEMP.fullmatch(p.name) and p.is_file():
                self._unlink(p)

    def clear(self) -> None:
        """Remove what clipfast embed wrote (the files its journal names, its manifest,
        journal and failures table) and nothing else. Call with the lock held."""
        records, _, _ = self._journal()
        for r in records:
            self._unlink(self.root / r.file)
            if r.failures_file:
                self._unlink(self.root / r.failures_file)
        self._remove_orphans(set(), 0)
        for name in (FAILURES_TABLE, JOURNAL, MANIFEST):
            self._unlink(self.root / name)
        for folder in (SHARDS, FAILURES):
            with contextlib.suppress(OSError):  # left in place when a user's file is in it
                (self.root / folder).rmdir()

    def truncate(self, keep: int) -> None:
        """Forget every committed shard from index ``keep`` on (their inputs are redone)."""
        records, _, data = self._journal()
        pos = 0
        for _ in range(min(keep, len(records))):
            pos = data.index(b"\n", pos) + 1
        with open(self.root / JOURNAL, "r+b") as f:
            f.truncate(pos)
            f.flush()
            os.fsync(f.fileno())

    def recover(self) -> list[ShardRecord]:
        """Committed shards from the journal. A torn last line (killed mid-append) is cut off;
        shard files a kill left past the committed ones, and temporaries, are deleted."""
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in (SHARDS, FAILURES):
            d = self.root / folder
            if d.exists() and not d.is_dir():
                raise ClipfastError(f"embed: {d} is not a folder; start over with --overwrite "
                                    "or choose another --out")
            d.mkdir(exist_ok=True)
        path = self.root / JOURNAL
        records, good, data = self._journal()
        if good != len(data):
            with open(path, "r+b") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())
        named = {r.file for r in records} | {r.failures_file for r in records if r.failures_file}
        self._remove_orphans(named, len(records))
        return records

    def commit(self, index: int, start: int, end: int, keys: list[str], ordinals: list[int],
               emb: np.ndarray, failures: list[dict[str, Any]],
               fingerprints: list[str | None] | None = None) -> ShardRecord:
        """Write one shard covering ordinals ``[start, end)`` and append it to the journal."""
        name = f"part-{index:06d}.parquet"
        rec = ShardRecord(index, start, end, len(keys), len(failures), f"{SHARDS}/{name}")
        _write_parquet(self.root / rec.file, embedding_table(keys, ordinals, emb, fingerprints))
        if failures:
            rec.failures_file = f"{FAILURES}/{name}"
            _write_parquet(self.root / rec.failures_file, failures_table(failures))
        line = (json.dumps(rec.to_dict()) + "\n").encode()
        path = self.root / JOURNAL
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            n = os.write(fd, line)
            if n != len(line):  # a short write: the disk filled up inside the line
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
        except OSError as e:
            # cut a partial line now, so the journal stays whole if this process lives on
            with contextlib.suppress(OSError):
                os.ftruncate(fd, os.fstat(fd).st_size - (n if "n" in locals() else 0))
            raise (_no_space(e, path) or e) from e
        finally:
            os.close(fd)
        return rec

    def fingerprints(self, rec: ShardRecord) -> dict[int, tuple[str, str | None]]:
        """ordinal -> (key, fingerprint) for every input of one committed shard."""
        _, pq = pyarrow_modules()
        out: dict[int, tuple[str, str | None]] = {}
        for f in (rec.file, rec.failures_file):
            if not f:
                continue
            t = pq.read_table(self.root / f)
            if "fingerprint" not in t.column_names:
                raise ClipfastError(f"embed: {self.root / f} has no fingerprints (written by an "
                                    "older clipfast); start over with --overwrite")
            for o, k, fp in zip(t.column("ordinal").to_pylist(), t.column("key").to_pylist(),
                                t.column("fingerprint").to_pylist()):
                out[o] = (k, fp)
        return out

    def write_failures_table(self, records: list[ShardRecord]) -> int:
        """Gather every shard's failures into failures.parquet; returns how many."""
        pa, pq = pyarrow_modules()
        tables = [pq.read_table(self.root / r.failures_file, columns=["key", "ordinal", "reason"])
                  for r in records if r.failures_file]
        table = pa.concat_tables(tables) if tables else failures_table([], fingerprints=False)
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
    jpath = root / JOURNAL
    records, _ = _parse_journal(jpath.read_bytes() if jpath.exists() else b"", jpath)
    return manifest, records


def read_embeddings(directory: str | os.PathLike, *, require_complete: bool = True
                    ) -> Embeddings:
    """Keys and one embedding matrix from a ``clipfast embed --out`` folder.

    Only committed shards are read (the journal's), in input order. ``require_complete``
    (default): refuse a job that has not finished (resume it first); False reads what is
    committed so far.
    """
    _, pq = pyarrow_modules()
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
    if require_complete and sum(r.end - r.start for r in records) != int(
            manifest.get("source", {}).get("items", -1)):
        raise ClipfastError(f"{root}: the journal's shards do not cover the manifest's "
                            f"{manifest.get('source', {}).get('items')} inputs")
    for r in records:
        table = pq.read_table(root / r.file, columns=["key", "ordinal", "embedding"])
        ords = np.asarray(table.column("ordinal").to_numpy(), dtype=np.int64)
        if len(ords) != r.rows or (len(ords) and (ords[0] < r.start or ords[-1] >= r.end
                                                  or (np.diff(ords) <= 0).any())):
            raise ClipfastError(f"{root / r.file}: its ordinals are not the {r.rows} distinct "
                                f"inputs of [{r.start}, {r.end}) the journal commits (duplicate "
                                "or foreign rows); start the job over with --overwrite")
        keys.extend(table.column("key").to_pylist())
        col = table.column("embedding").combine_chunks()
        flat = col.values.to_numpy(zero_copy_only=False) if len(col) else np.zeros(0, dtype)
        parts.append(np.asarray(flat, dtype=dtype).reshape(len(col), dim))
    emb = np.concatenate(parts) if parts else np.zeros((0, dim), dtype=dtype)
    return Embeddings(keys, emb)


def read_failures(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """Every failure committed so far: dicts with key, ordinal and reason, in input order."""
    _, pq = pyarrow_modules()
    root = Path(directory)
    _, records = _committed(root)
    rows: list[dict[str, Any]] = []
    for r in records:
        if r.failures_file:
            rows.extend(pq.read_table(root / r.failures_file,
                                      columns=["key", "ordinal", "reason"]).to_pylist())
    return rows
