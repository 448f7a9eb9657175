"""Vector indexes over ``clipfast embed`` output folders (FAISS, inner product on L2-normalised
embeddings, i.e. cosine similarity).

Layout of ``clipfast index EMB_DIR --out INDEX``::

    index.json      what the index is: kind, FAISS factory string, search parameters, count,
                    dimension, the artifact digest and each embed folder's manifest (path, sha256)
    index.faiss     the FAISS index; row i of keys.parquet is FAISS id i
    keys.parquet    id, key, ordinal, shard, row, source: where each vector came from
    dedup.parquet   (with --dedup) group, id, key, score: near-duplicate groups

The folder is written under a temporary name beside ``--out`` and renamed into place, so a
reader sees the old index or the new one, never half of one. Rebuilding the same inputs with the
same options finds the index up to date (the embed manifests' hashes match) and does nothing.

Kinds (``index_factory`` strings, as autofaiss picks them for clip-retrieval):

- ``flat``: exact search ("Flat"), the default below ``flat_below`` vectors.
- ``ivfpq``: "IVF{nlist},PQ{m}x4fs,RFlat": an inverted file over fast-scan product codes, the
  candidates re-ranked with the exact vectors (recall near exact; the default above
  ``flat_below``). Trained on a sample of at most ``train_size`` vectors.
- ``hnsw``: "HNSW{M},Flat": a graph index (no training; slower to build, fast to query).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipfast.embed.output import pyarrow_modules
from clipfast.errors import ClipfastError, InputError

FORMAT = "clipfast-index"
FORMAT_VERSION = 1
INDEX_JSON = "index.json"
INDEX_FAISS = "index.faiss"
KEYS = "keys.parquet"
DEDUP = "dedup.parquet"
KINDS = ("auto", "flat", "ivfpq", "hnsw")


def faiss_module():
    """The faiss module, or an error naming the extra to install."""
    try:
        import faiss
    except ImportError as e:
        raise ClipfastError("clipfast index/search need faiss: pip install 'clipfast[search]'"
                            ) from e
    return faiss


def _pyarrow():
    return pyarrow_modules("clipfast index", "search")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def normalize(x: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit length (zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


# --------------------------------------------------------------------------- options


@dataclass
class IndexOptions:
    """What ``clipfast index`` is told.

    kind: auto (flat below ``flat_below`` vectors, ivfpq above), flat, ivfpq or hnsw.
    nlist: IVF lists (default about sqrt(N), at least 16). pq_m: product-quantizer sub-vectors
    (default dim / 4). nprobe: lists visited per query (default 16). k_factor: candidates
    re-ranked exactly per result (default 4). hnsw_m / ef_construction / ef_search: HNSW graph.
    train_size: most vectors the trained kinds learn from (a uniform sample of the shards).
    chunk: vectors added per call (bounds the memory of the build besides the index itself).
    factory: a raw FAISS index_factory string (overrides kind's).
    dedup: with a threshold (cosine), also write near-duplicate groups; dedup_k neighbours
    looked at per vector.
    """

    kind: str = "auto"
    flat_below: int = 100_000
    nlist: int | None = None
    pq_m: int | None = None
    nprobe: int = 16
    k_factor: int = 4
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 64
    train_size: int = 50_000
    chunk: int = 16_384
    factory: str | None = None
    dedup: float | None = None
    dedup_k: int = 16
    seed: int = 0

    def check(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"--kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        for name in ("flat_below", "nprobe", "k_factor", "hnsw_m", "ef_construction",
                     "ef_search", "train_size", "chunk", "dedup_k"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be "
                                 "at least 1")
        for name in ("nlist", "pq_m"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise InputError(f"--{name.replace('_', '-')} {v}: must be at least 1")
        if self.dedup is not None and not -1.0 <= self.dedup <= 1.0:
            raise InputError(f"--dedup {self.dedup}: a cosine similarity threshold is in "
                             "[-1, 1] (0.95 is a usual near-duplicate threshold)")


def choose(n: int, dim: int, opts: IndexOptions) -> tuple[str, str, dict[str, Any]]:
    """(kind, factory string, search parameters) for ``n`` vectors of ``dim``."""
    kind = opts.kind
    if kind == "auto":
        kind = "flat" if n < opts.flat_below else "ivfpq"
    if kind == "flat":
        factory, params = "Flat", {}
    elif kind == "hnsw":
        factory, params = f"HNSW{opts.hnsw_m},Flat", {"efSearch": opts.ef_search}
    else:
        nlist = opts.nlist or max(16, int(round(math.sqrt(max(n, 1)))))
        # An IVF list needs a few dozen training vectors, and a trained kind at least nlist.
        if n < nlist:
            raise InputError(f"--kind ivfpq with {nlist} lists needs at least that many vectors; "
                             f"there are {n} (use --kind flat, or a smaller --nlist)")
        m = opts.pq_m or max(1, dim // 4)
        if dim % m:
            raise InputError(f"--pq-m {m} must divide the embedding dimension {dim}")
        factory = f"IVF{nlist},PQ{m}x4fs,RFlat"
        params = {"nprobe": min(opts.nprobe, nlist), "k_factor_rf": opts.k_factor}
    if opts.factory:
        factory = opts.factory
    return kind, factory, params


# --------------------------------------------------------------------------- inputs


@dataclass
class EmbedSource:
    """One ``clipfast embed`` output folder: its manifest and committed shards."""

    path: Path
    manifest: dict[str, Any]
    shards: list[tuple[str, int]]  # (shard file relative to path, rows), in input order
    manifest_sha256: str

    @property
    def digest(self) -> str:
        return str(self.manifest.get("artifact", {}).get("digest"))

    @property
    def rows(self) -> int:
        return sum(r for _, r in self.shards)

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "manifest_sha256": self.manifest_sha256,
                "rows": self.rows, "artifact_path": self.manifest.get("artifact", {}).get("path")}


def open_embeddings(path: str | os.PathLike) -> EmbedSource:
    """A completed ``clipfast embed`` folder, or an error that says what is wrong with it."""
    from clipfast.embed.output import MANIFEST, _committed

    root = Path(path).resolve()
    if not (root / MANIFEST).is_file():
        raise InputError(f"{path}: no {MANIFEST}; expected a clipfast embed --out folder (or a "
                         "folder of shards Ray Data wrote with clipfast embed --ray)")
    try:
        manifest, records = _committed(root)
    except (ValueError, OSError) as e:
        raise InputError(f"{path}: unreadable embed manifest ({e})") from e
    if manifest.get("status") != "complete":
        raise InputError(f"{path}: the embed job has not completed ({len(records)} shards "
                         "committed); run the same clipfast embed command again to finish it")
    shards = [(r.file, r.rows) for r in sorted(records, key=lambda r: r.start)]
    return EmbedSource(root, manifest, shards, _sha256(root / MANIFEST))


def _source_of(src: EmbedSource) -> str | None:
    """The input a key came from when one embed folder had a single source (else None: the
    key itself names it, e.g. an image path)."""
    specs = src.manifest.get("source", {}).get("specs") or []
    return str(specs[0].get("path")) if len(specs) == 1 else None


def iter_batches(sources: list[EmbedSource], chunk: int
                 ) -> Iterator[tuple[np.ndarray, dict[str, list]]]:
    """(normalised float32 (n, D), keys table columns) per slice of at most ``chunk`` rows, in
    order over every source's shards: one shard's rows at a time in memory."""
    _, pq = _pyarrow()
    for src in sources:
        dim = int(src.manifest.get("embed_dim") or 0)
        origin = _source_of(src)
        for file, _rows in src.shards:
            table = pq.read_table(src.path / file, columns=["key", "ordinal", "embedding"])
            col = table.column("embedding").combine_chunks()
            n = len(col)
            if n == 0:
                continue
            flat = col.values.to_numpy(zero_copy_only=False)
            if flat.size != n * dim:
                raise InputError(f"{src.path / file}: embeddings of {flat.size // n} values, the "
                                 f"manifest says {dim}")
            emb = flat.reshape(n, dim)
            keys = table.column("key").to_pylist()
            ordinals = table.column("ordinal").to_pylist()
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                yield normalize(emb[s:e]), {
                    "key": keys[s:e], "ordinal": ordinals[s:e],
                    "shard": [str(src.path / file)] * (e - s), "row": list(range(s, e)),
                    "source": [origin] * (e - s)}


def _sample(sources: list[EmbedSource], total: int, size: int, chunk: int, seed: int
            ) -> np.ndarray:
    """A uniform sample of ``size`` rows, read in one streaming pass."""
    rng = np.random.default_rng(seed)
    want = np.sort(rng.choice(total, size=min(size, total), replace=False))
    parts, start = [], 0
    for emb, _ in iter_batches(sources, chunk):
        lo, hi = np.searchsorted(want, [start, start + len(emb)])
        if hi > lo:
            parts.append(emb[want[lo:hi] - start])
        start += len(emb)
    return np.concatenate(parts)


# --------------------------------------------------------------------------- build


@dataclass
class BuildSummary:
    out: str
    kind: str
    factory: str
    count: int
    dim: int
    seconds: float
    up_to_date: bool
    dedup_groups: int | None = None


def _identity(sources: list[EmbedSource], opts: IndexOptions) -> dict[str, Any]:
    o = asdict(opts)
    o.pop("chunk")  # how the build streams does not change the index
    return {"embeddings": [s.describe() for s in sources], "options": o}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == FORMAT else None


def build_index(embeddings: list[str | os.PathLike], out: str | os.PathLike,
                opts: IndexOptions | None = None, *, artifact_digest: str | None = None,
                overwrite: bool = False, progress: bool = False) -> BuildSummary:
    """Build ``out`` from the embed folders ``embeddings`` (every one of the same artifact,
    and of ``artifact_digest`` when given). Atomic; a no-op when ``out`` is up to date."""
    opts = opts or IndexOptions()
    opts.check()
    faiss = faiss_module()
    pa, pq = _pyarrow()
    t0 = time.perf_counter()
    if not embeddings:
        raise InputError("clipfast index: no embed folder given")
    sources = [open_embeddings(p) for p in embeddings]
    digests = {s.digest for s in sources}
    if artifact_digest is not None:
        digests.add(artifact_digest)
    if len(digests) != 1:
        names = ", ".join(f"{s.path} (artifact {s.digest})" for s in sources)
        extra = f"; the index must be of artifact {artifact_digest}" if artifact_digest else ""
        raise InputError(f"clipfast index: the embeddings come from different artifacts: "
                         f"{names}{extra}. Vectors of different models are not comparable: "
                         "index each model's embeddings separately")
    dims = {int(s.manifest.get("embed_dim") or 0) for s in sources}
    if len(dims) != 1 or 0 in dims:
        raise InputError(f"clipfast index: embedding dimensions differ or are missing: {dims}")
    dim = dims.pop()
    n = sum(s.rows for s in sources)
    if n == 0:
        raise InputError("clipfast index: the embed folders hold no embeddings")
    kind, factory, params = choose(n, dim, opts)
    ident = _identity(sources, opts)

    out = Path(out).resolve()
    if out.exists():
        old = _read_json(out / INDEX_JSON)
        if old is None:
            raise InputError(f"clipfast index: --out {out} exists and is not a clipfast index; "
                             "choose another --out")
        if old.get("identity") == ident and (out / INDEX_FAISS).is_file():
            return BuildSummary(str(out), old["kind"], old["factory"], int(old["count"]), dim,
                                time.perf_counter() - t0, up_to_date=True,
                                dedup_groups=(old.get("dedup") or {}).get("groups"))
        if old.get("artifact", {}).get("digest") != sources[0].digest and not overwrite:
            raise InputError(f"clipfast index: --out {out} is an index of another artifact "
                             f"({old.get('artifact', {}).get('digest')}); these embeddings are "
                             f"of {sources[0].digest}. Pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        if kind == "hnsw" and not opts.factory:
            faiss.downcast_index(index).hnsw.efConstruction = opts.ef_construction
        if not index.is_trained:
            index.train(_sample(sources, n, opts.train_size, opts.chunk, opts.seed))
        writer = None
        schema = pa.schema([("id", pa.int64()), ("key", pa.string()), ("ordinal", pa.int64()),
                            ("shard", pa.string()), ("row", pa.int64()),
                            ("source", pa.string())])
        added = 0
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, unit="vec", desc="index", dynamic_ncols=True)
        try:
            writer = pq.ParquetWriter(tmp / KEYS, schema)
            for emb, cols in iter_batches(sources, opts.chunk):
                index.add(emb)
                cols = {"id": list(range(added, added + len(emb))), **cols}
                writer.write_table(pa.table(cols, schema=schema))
                added += len(emb)
                if bar is not None:
                    bar.update(len(emb))
        finally:
            if writer is not None:
                writer.close()
            if bar is not None:
                bar.close()
        if added != n or index.ntotal != n:
            raise ClipfastError(f"clipfast index: {added} vectors read, {n} expected: an embed "
                                "folder changed during the build; run it again")
        faiss.write_index(index, str(tmp / INDEX_FAISS))
        doc = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
            "factory": factory, "params": params, "metric": "inner_product", "normalized": True,
            "count": n, "dim": dim,
            "artifact": {"digest": sources[0].digest,
                         "path": sources[0].manifest.get("artifact", {}).get("path"),
                         "family": sources[0].manifest.get("artifact", {}).get("family")},
            "identity": ident,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "dedup": None,
        }
        if opts.dedup is not None:
            set_params(index, params)
            groups = write_dedup(index, sources, tmp / DEDUP, opts.dedup, opts.dedup_k,
                                 opts.chunk, keys_path=tmp / KEYS)
            doc["dedup"] = {"threshold": opts.dedup, "k": opts.dedup_k, "groups": groups,
                            "file": DEDUP}
        (tmp / INDEX_JSON).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BuildSummary(str(out), kind, factory, n, dim, time.perf_counter() - t0,
                        up_to_date=False, dedup_groups=(doc["dedup"] or {}).get("groups"))


def _replace_dir(tmp: Path, out: Path) -> None:
    """Put the folder ``tmp`` at ``out``: a rename when ``out`` is new; else the old one is
    renamed aside first, so ``out`` is always a whole index (old or new)."""
    with contextlib.suppress(OSError):
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the index from a server's user
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def set_params(index: Any, params: dict[str, Any]) -> None:
    """Apply search parameters (nprobe, efSearch, k_factor_rf) through FAISS's ParameterSpace."""
    if params:
        faiss = faiss_module()
        spec = ",".join(f"{k}={v}" for k, v in params.items())
        faiss.ParameterSpace().set_index_parameters(index, spec)


# --------------------------------------------------------------------------- dedup


def _union_find_groups(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Root per element after joining every pair (a[i], b[i]). Written here (a few lines over
    numpy) rather than pulling scipy's connected_components into the runtime extra."""
    parent = np.arange(n, dtype=np.int64)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for x, y in zip(a.tolist(), b.tolist()):
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)  # the smallest id is each group's root
    return np.fromiter((find(i) for i in range(n)), dtype=np.int64, count=n)


def find_duplicates(index: Any, batches: Iterator[np.ndarray], n: int, threshold: float,
                    k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, group root per id) of the vectors in a near-duplicate group: pairs with cosine at
    least ``threshold`` among each vector's ``k`` nearest neighbours, joined transitively."""
    pa_, pb_ = [], []
    start = 0
    k = min(k + 1, n)  # +1: a vector finds itself
    for emb in batches:
        scores, ids = index.search(emb, k)
        q = np.arange(start, start + len(emb))[:, None].repeat(k, axis=1)
        keep = (scores >= threshold) & (ids >= 0) & (ids != q)
        pa_.append(q[keep])
        pb_.append(ids[keep])
        start += len(emb)
    a = np.concatenate(pa_) if pa_ else np.zeros(0, np.int64)
    b = np.concatenate(pb_) if pb_ else np.zeros(0, np.int64)
    roots = _union_find_groups(n, a, b)
    members = np.unique(np.concatenate([a, b]))
    return members, roots[members]


def write_dedup(index: Any, sources: list[EmbedSource], path: Path, threshold: float, k: int,
                chunk: int, *, keys_path: Path) -> int:
    """Write the near-duplicate groups table; returns the number of groups. Columns: group
    (0..G-1), id, key, score (cosine to the group's first member)."""
    pa, pq = _pyarrow()
    n = index.ntotal
    ids, roots = find_duplicates(index, (e for e, _ in iter_batches(sources, chunk)), n,
                                 threshold, k)
    keys = pq.read_table(keys_path, columns=["key"]).column("key").to_pylist()
    order = np.lexsort((ids, roots))
    ids, roots = ids[order], roots[order]
    _, group = np.unique(roots, return_inverse=True)
    scores = np.ones(len(ids), np.float32)
    if len(ids):
        vec = index.reconstruct_batch(ids.astype(np.int64))
        rep = index.reconstruct_batch(roots.astype(np.int64))
        scores = np.einsum("nd,nd->n", normalize(vec), normalize(rep)).astype(np.float32)
    table = pa.table({"group": pa.array(group.astype(np.int64)),
                      "id": pa.array(ids.astype(np.int64)),
                      "key": pa.array([keys[i] for i in ids.tolist()], type=pa.string()),
                      "score": pa.array(scores)})
    pq.write_table(table, path)
    return int(group.max()) + 1 if len(group) else 0


# --------------------------------------------------------------------------- reading


@dataclass
class Hit:
    """One search result."""

    id: int
    key: str
    score: float
    source: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "key": self.key, "score": self.score, "source": self.source}


class SearchIndex:
    """A built index: ``search(vectors, k)`` -> hits, ``check_artifact(engine)``."""

    def __init__(self, path: str | os.PathLike):
        faiss = faiss_module()
        _, pq = _pyarrow()
        self.path = Path(path)
        doc = _read_json(self.path / INDEX_JSON)
        if doc is None:
            raise InputError(f"{path}: not a clipfast index (no readable {INDEX_JSON}); build "
                             "one with clipfast index EMB_DIR --out INDEX")
        if doc.get("format_version") != FORMAT_VERSION:
            raise InputError(f"{path}: index format version {doc.get('format_version')}, this "
                             f"clipfast reads {FORMAT_VERSION}: rebuild it with clipfast index")
        self.info = doc
        self.index = faiss.read_index(str(self.path / INDEX_FAISS))
        self.params = dict(doc.get("params") or {})
        set_params(self.index, self.params)
        table = pq.read_table(self.path / KEYS, columns=["key", "source"])
        self.keys: list[str] = table.column("key").to_pylist()
        self.sources: list[str | None] = table.column("source").to_pylist()
        if len(self.keys) != self.index.ntotal:
            raise InputError(f"{path}: {len(self.keys)} keys for {self.index.ntotal} vectors; "
                             "rebuild the index")
        self._ids = {k: i for i, k in enumerate(self.keys)}

    @property
    def digest(self) -> str:
        return str(self.info["artifact"]["digest"])

    @property
    def artifact_path(self) -> str | None:
        return self.info["artifact"].get("path")

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    def __len__(self) -> int:
        return len(self.keys)

    def id_of(self, key: str) -> int | None:
        return self._ids.get(key)

    def check_artifact(self, engine: Any) -> None:
        """Refuse an Engine of another artifact than the one the index's embeddings came from."""
        from clipfast.artifact.manifest import artifact_digest

        got = artifact_digest(engine.manifest)
        if got != self.digest:
            raise InputError(f"the index {self.path} holds embeddings of artifact {self.digest} "
                             f"({self.artifact_path}); the artifact "
                             f"{engine.manifest.directory} is {got}. Queries must be embedded by "
                             "the same model: pass that artifact, or rebuild the index")

    def vectors(self, ids: list[int]) -> np.ndarray:
        """The stored (normalised) vectors of ``ids``, (n, D)."""
        return self.index.reconstruct_batch(np.asarray(ids, dtype=np.int64))

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """Top-``k`` hits per query row of ``queries`` (n, D), best first."""
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if q.shape[1] != self.dim:
            raise InputError(f"query of dimension {q.shape[1]}; the index holds {self.dim}")
        if k < 1:
            raise InputError(f"k={k}: must be at least 1")
        scores, ids = self.index.search(normalize(q), min(k, len(self)))
        return [[Hit(int(i), self.keys[i], float(s), self.sources[i])
                 for s, i in zip(srow, irow) if i >= 0] for srow, irow in zip(scores, ids)]
