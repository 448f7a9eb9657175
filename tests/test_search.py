"""clipfast index / clipfast search: recall of the approximate kinds against exact search on a
generated clustered set, refusal of another artifact's embeddings, atomic and idempotent
rebuilds, near-duplicate groups, and the CLI end to end on a tiny exported CLIP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")
pytest.importorskip("pyarrow")

from clipfast.embed.output import FORMAT, FORMAT_VERSION, OutputDir  # noqa: E402
from clipfast.errors import InputError  # noqa: E402
from clipfast.search.index import (  # noqa: E402
    DEDUP,
    IndexOptions,
    SearchIndex,
    build_index,
    normalize,
)


def clustered(n: int, dim: int, *, clusters: int = 64, rank: int = 8, seed: int = 0
              ) -> np.ndarray:
    """Unit vectors around ``clusters`` centres, each cluster spread over a random ``rank``-dim
    subspace plus a little isotropic noise (neighbourhoods with structure, as real embeddings
    have; isotropic noise alone makes every neighbour equally far)."""
    centres = np.random.default_rng(1000).standard_normal((clusters, dim)).astype(np.float32)
    basis = (np.random.default_rng(1001).standard_normal((clusters, rank, dim))
             .astype(np.float32) / np.sqrt(rank))
    rng = np.random.default_rng(seed)
    label = rng.integers(0, clusters, n)
    z = rng.standard_normal((n, rank)).astype(np.float32)
    x = centres[label] + np.einsum("nr,nrd->nd", z, basis[label])
    x += 0.1 * rng.standard_normal((n, dim)).astype(np.float32)
    return normalize(x)


def fake_embed_dir(root: Path, emb: np.ndarray, *, digest: str = "a" * 16,
                   keys: list[str] | None = None, shard: int = 1000) -> Path:
    """An embed --out folder written with clipfast embed's own writer."""
    out = OutputDir(root)
    keys = keys or [f"item-{i:06d}" for i in range(len(emb))]
    records = []
    out.recover()
    for s in range(0, len(emb), shard):
        e = min(len(emb), s + shard)
        records.append(out.commit(len(records), s, e, keys[s:e], list(range(s, e)), emb[s:e],
                                  []))
    out.write_manifest({
        "format": FORMAT, "format_version": FORMAT_VERSION, "status": "complete",
        "artifact": {"digest": digest, "path": f"/nowhere/{digest}"},
        "source": {"specs": [{"kind": "folder", "path": "/photos"}], "items": len(emb)},
        "output": {"kind": "image", "dtype": "float32"}, "embed_dim": emb.shape[1],
        "options": {"dtype": "float32"}, "shards": [r.to_dict() for r in records]})
    return root


def recall_at(approx: list, exact: list, k: int = 10) -> float:
    return float(np.mean([len({h.id for h in a[:k]} & {h.id for h in e[:k]}) / k
                          for a, e in zip(approx, exact)]))


@pytest.fixture(scope="module")
def clustered_dir(tmp_path_factory) -> tuple[Path, np.ndarray]:
    x = clustered(12_000, 64)
    return fake_embed_dir(tmp_path_factory.mktemp("emb") / "emb", x, shard=2500), x


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw"])
def test_approximate_recall_against_exact(clustered_dir, tmp_path, kind):
    emb_dir, x = clustered_dir
    exact = build_index([emb_dir], tmp_path / "flat", IndexOptions(kind="flat"))
    assert exact.kind == "flat"
    approx = build_index([emb_dir], tmp_path / kind, IndexOptions(kind=kind, nlist=64))
    assert approx.kind == kind and approx.count == len(x)
    queries = clustered(300, 64, seed=7)
    ex = SearchIndex(tmp_path / "flat").search(queries, 10)
    ap = SearchIndex(tmp_path / kind).search(queries, 10)
    # Exact search is exact: its scores are the numpy inner products.
    best = np.argsort(-(queries @ x.T), axis=1)[:, :10]
    assert np.mean([len({h.id for h in e} & set(b.tolist())) / 10
                    for e, b in zip(ex, best)]) >= 0.99
    assert recall_at(ap, ex, 10) >= 0.95


def test_auto_kind_by_size(clustered_dir, tmp_path):
    emb_dir, _ = clustered_dir
    small = build_index([emb_dir], tmp_path / "a", IndexOptions(flat_below=20_000))
    big = build_index([emb_dir], tmp_path / "b", IndexOptions(flat_below=10_000, nlist=32,
                                                                    train_size=4000))
    assert (small.kind, small.factory) == ("flat", "Flat")
    assert big.kind == "ivfpq" and big.factory.startswith("IVF32,PQ")


def test_keys_and_sources_recorded(tmp_path):
    x = clustered(50, 16)
    d = fake_embed_dir(tmp_path / "emb", x, shard=20)
    build_index([d], tmp_path / "idx")
    idx = SearchIndex(tmp_path / "idx")
    hit = idx.search(x[37:38], 1)[0][0]
    assert (hit.id, hit.key, hit.source) == (37, "item-000037", "/photos")
    assert hit.score == pytest.approx(1.0, abs=1e-5)
    import pyarrow.parquet as pq

    keys = pq.read_table(tmp_path / "idx" / "keys.parquet").to_pylist()
    assert keys[37]["shard"].endswith("shards/part-000001.parquet") and keys[37]["row"] == 17
    doc = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert doc["artifact"]["digest"] == "a" * 16
    assert doc["identity"]["embeddings"][0]["manifest_sha256"]


def test_refuses_another_artifacts_embeddings(tmp_path):
    a = fake_embed_dir(tmp_path / "a", clustered(40, 16), digest="a" * 16)
    b = fake_embed_dir(tmp_path / "b", clustered(40, 16, seed=1), digest="b" * 16)
    with pytest.raises(InputError, match="different artifacts"):
        build_index([a, b], tmp_path / "idx")
    with pytest.raises(InputError, match="different artifacts"):
        build_index([b], tmp_path / "idx", artifact_digest="a" * 16)
    build_index([a], tmp_path / "idx")
    # An existing index of artifact a is not replaced by b's embeddings without --overwrite.
    with pytest.raises(InputError, match="index of another artifact"):
        build_index([b], tmp_path / "idx")
    assert SearchIndex(tmp_path / "idx").digest == "a" * 16
    build_index([b], tmp_path / "idx", overwrite=True)
    assert SearchIndex(tmp_path / "idx").digest == "b" * 16


def test_query_engine_of_another_artifact_refused(tmp_path, small_clip_engine):
    build_index([fake_embed_dir(tmp_path / "a", clustered(40, 16))], tmp_path / "idx")
    with pytest.raises(InputError, match="same model"):
        SearchIndex(tmp_path / "idx").check_artifact(small_clip_engine)


def test_rebuild_is_idempotent_and_atomic(tmp_path, monkeypatch):
    d = fake_embed_dir(tmp_path / "emb", clustered(60, 16))
    first = build_index([d], tmp_path / "idx")
    assert not first.up_to_date
    stamp = (tmp_path / "idx" / "index.faiss").stat().st_mtime_ns
    again = build_index([d], tmp_path / "idx")
    assert again.up_to_date and (tmp_path / "idx" / "index.faiss").stat().st_mtime_ns == stamp

    # A build that dies half-way leaves the old index whole and no temporary folder behind.
    import clipfast.search.index as mod

    def boom(*a, **k):
        raise RuntimeError("killed")

    monkeypatch.setattr(mod, "write_dedup", boom)
    with pytest.raises(RuntimeError):
        build_index([d], tmp_path / "idx", IndexOptions(dedup=0.9))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb", "idx"]
    assert len(SearchIndex(tmp_path / "idx")) == 60


def test_dedup_groups_planted_duplicates(tmp_path):
    rng = np.random.default_rng(3)
    x = clustered(400, 32, clusters=40)
    # Plant: 5 near-copies of row 10 (a chain 10 ~ 400 ~ 401 ...) and a pair 20 ~ 405.
    dups = [x[10] + 0.01 * rng.standard_normal(32) for _ in range(5)]
    dups.append(x[20] + 0.01 * rng.standard_normal(32))
    x = normalize(np.vstack([x, np.asarray(dups, np.float32)]))
    d = fake_embed_dir(tmp_path / "emb", x, shard=128)
    s = build_index([d], tmp_path / "idx", IndexOptions(dedup=0.995))
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "idx" / DEDUP).to_pylist()
    groups: dict[int, set[int]] = {}
    for r in rows:
        groups.setdefault(r["group"], set()).add(r["id"])
    assert sorted(map(sorted, groups.values())) == [[10, 400, 401, 402, 403, 404], [20, 405]]
    assert s.dedup_groups == 2
    assert all(r["score"] >= 0.99 for r in rows)


def test_bad_inputs_named(tmp_path):
    with pytest.raises(InputError, match="no manifest.json"):
        build_index([tmp_path], tmp_path / "idx")
    with pytest.raises(InputError, match="--kind"):
        build_index([tmp_path], tmp_path / "idx", IndexOptions(kind="lsh"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    d = fake_embed_dir(tmp_path / "emb", clustered(20, 16))
    with pytest.raises(InputError, match="not a clipfast index"):
        build_index([d], tmp_path / "junk")
    with pytest.raises(InputError, match="not a clipfast index"):
        SearchIndex(tmp_path / "emb")


# -- the real path: clipfast embed -> clipfast index -> clipfast search ------------------------
def make_photos(folder: Path, n: int = 6) -> list[Path]:
    """Small generated images, different enough to embed apart."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    paths = []
    for i in range(n):
        base = rng.integers(0, 255, 3)
        grid = rng.integers(0, 255, (8, 8, 3))
        img = np.kron(grid, np.ones((12, 12, 1))) * 0.5 + base * 0.5
        p = folder / f"photo-{i}.png"
        Image.fromarray(img.astype(np.uint8)).save(p)
        paths.append(p)
    return paths


def clipfast(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipfast.cli", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def real_index(tmp_path_factory, small_clip_artifact) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("real")
    photos = make_photos(root / "photos")
    r = clipfast("embed", str(small_clip_artifact), str(root / "photos"), "--out",
                 str(root / "emb"), "--quiet")
    assert r.returncode == 0, r.stderr
    r = clipfast("index", str(root / "emb"), "--out", str(root / "idx"), "--quiet")
    assert r.returncode == 0, r.stderr
    return root / "idx", photos


def test_cli_search_text_and_image(real_index, small_clip_engine):
    idx, photos = real_index
    r = clipfast("search", str(idx), "a red car", "--k", "3", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["results"]
    q = small_clip_engine.encode_texts(["a red car"])
    emb = small_clip_engine.encode_images([str(p) for p in photos])
    expect = np.argsort(-(emb @ q[0]))[:3]
    assert [h["key"] for h in got] == [str(photos[i]) for i in expect]
    np.testing.assert_allclose([h["score"] for h in got], (emb @ q[0])[expect], atol=1e-5)

    r = clipfast("search", str(idx), "--image", str(photos[4]), "--k", "1", "--json")
    assert r.returncode == 0, r.stderr
    hit = json.loads(r.stdout)["results"][0]
    assert hit["key"] == str(photos[4]) and hit["score"] == pytest.approx(1.0, abs=1e-4)


def test_cli_search_refuses_other_artifact(real_index, tmp_path):
    idx, _ = real_index
    other = fake_embed_dir(tmp_path / "emb", clustered(10, 16))
    build_index([other], tmp_path / "idx")
    doc = json.loads((tmp_path / "idx" / "index.json").read_text())
    real = json.loads((idx / "index.json").read_text())["artifact"]["path"]
    r = clipfast("search", str(tmp_path / "idx"), "x", "--artifact", real)
    assert r.returncode == 1 and "same model" in r.stderr, r.stderr
    assert doc["artifact"]["digest"] in r.stderr
    r = clipfast("search", str(idx))
    assert r.returncode == 1 and "query text or --image" in r.stderr
