"""Visual search benchmark: ``clipfast index`` on N generated 512-d vectors (default 1 M) next
to a numpy brute-force baseline in the same run, and text-query latency through the server.

Index part: the vectors are written as ``clipfast embed`` shards (its own writer), then
``build_index`` runs at its default settings in a child process (its time and peak RSS are the
child's alone). Recall@10 of the index against exact search, and queries per second at k=10 for
the index and for numpy (``q @ X.T`` + argpartition, in blocks), on the same queries.

Server part: ``clipfast serve ARTIFACT --index`` (create_app on uvicorn, loopback), an index of
the artifact's digest, POST /v1/search with a text query; p50 / p99 at concurrency 1 and 8.

    python benchmarks/search_bench.py --artifact ART [--n 1000000] [--out benchmarks/results]

ART: any exported artifact (``clipfast export --model ViT-B-32 --pretrained none --out ART``).
Results: ``search-<isa>.json`` and ``.md`` in --out (e.g. search-avx-512-vnni.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def generate(n: int, dim: int, seed: int, *, clusters: int = 1000, rank: int = 16,
             chunk: int = 65_536):
    """Unit vectors around ``clusters`` centres, each cluster spread over a random
    ``rank``-dim subspace plus isotropic noise (structured neighbourhoods like real
    embeddings'), yielded in chunks (deterministic for a seed)."""
    centres = np.random.default_rng(1000).standard_normal((clusters, dim)).astype(np.float32)
    basis = (np.random.default_rng(1001).standard_normal((clusters, rank, dim))
             .astype(np.float32) / np.sqrt(rank))
    rng = np.random.default_rng(seed)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        label = rng.integers(0, clusters, m)
        z = rng.standard_normal((m, rank)).astype(np.float32)
        x = centres[label]
        for c in np.unique(label):  # per cluster: never a (m, rank, dim) temporary
            rows = np.flatnonzero(label == c)
            x[rows] += z[rows] @ basis[c]
        x += 0.1 * rng.standard_normal((m, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield x


def write_shards(root: Path, n: int, dim: int, digest: str, shard: int = 65_536) -> None:
    from clipfast.embed.output import FORMAT, FORMAT_VERSION, OutputDir

    out = OutputDir(root)
    out.recover()
    records, start = [], 0
    for x in generate(n, dim, seed=0, chunk=shard):
        e = start + len(x)
        records.append(out.commit(len(records), start, e, [f"v{i:08d}" for i in range(start, e)],
                                  list(range(start, e)), x, []))
        start = e
    out.write_manifest({
        "format": FORMAT, "format_version": FORMAT_VERSION, "status": "complete",
        "artifact": {"digest": digest, "path": None}, "embed_dim": dim,
        "source": {"specs": [{"kind": "generated", "path": "generated"}], "items": n},
        "output": {"kind": "image", "dtype": "float32"}, "options": {"dtype": "float32"},
        "shards": [r.to_dict() for r in records]})


def _build_child(emb: str, out: str, conn) -> None:
    import faiss  # noqa: F401  (imported before the baseline RSS is read)
    import pyarrow.parquet  # noqa: F401

    from clipfast.search.index import build_index

    # What the process holds before building (the interpreter, numpy, pyarrow, faiss).
    base = int(next(line.split()[1] for line in open("/proc/self/status")
                    if line.startswith("VmRSS:"))) / 1024
    t0 = time.perf_counter()
    s = build_index([emb], out)
    conn.send({"seconds": time.perf_counter() - t0, "kind": s.kind, "factory": s.factory,
               "rss_before_build_mib": base,
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def brute_force(x: np.ndarray, q: np.ndarray, k: int, block: int = 131_072) -> np.ndarray:
    """Exact top-k ids by inner product, scanning ``x`` in blocks (numpy only)."""
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.zeros((len(q), k), np.int64)
    for s in range(0, len(x), block):
        sc = q @ x[s:s + block].T
        top = np.argpartition(-sc, k - 1, axis=1)[:, :k]
        cand_s = np.concatenate([best_s, np.take_along_axis(sc, top, 1)], axis=1)
        cand_i = np.concatenate([best_i, top + s], axis=1)
        keep = np.argsort(-cand_s, axis=1)[:, :k]
        best_s = np.take_along_axis(cand_s, keep, 1)
        best_i = np.take_along_axis(cand_i, keep, 1)
    return best_i


def index_part(n: int, dim: int, queries: int, digest: str, work: Path) -> dict:
    from clipfast.search.index import SearchIndex

    emb, idx = work / "emb", work / "idx"
    t0 = time.perf_counter()
    write_shards(emb, n, dim, digest)
    gen_s = time.perf_counter() - t0
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_build_child, args=(str(emb), str(idx), send))
    p.start()
    build = recv.recv()
    p.join()
    x = np.concatenate(list(generate(n, dim, seed=0, chunk=65_536)))
    q = np.concatenate(list(generate(queries, dim, seed=99)))
    t0 = time.perf_counter()
    exact = brute_force(x, q, 10)
    numpy_s = time.perf_counter() - t0
    index = SearchIndex(idx)
    index.search(q[:8], 10)  # warm-up
    t0 = time.perf_counter()
    hits = index.search(q, 10)
    index_s = time.perf_counter() - t0
    one = []
    for row in q[:200]:
        t1 = time.perf_counter()
        index.search(row[None], 10)
        one.append(time.perf_counter() - t1)
    recall = float(np.mean([len({h.id for h in hs} & set(e.tolist())) / 10
                            for hs, e in zip(hits, exact)]))
    return {"n": n, "dim": dim, "queries": queries, "write_shards_s": gen_s, **build,
            "params": index.params, "recall_at_10": recall,
            "index_qps_batch": queries / index_s, "numpy_qps_batch": queries / numpy_s,
            "index_single_query_p50_ms": 1000 * float(np.median(one)),
            "speedup_vs_numpy": numpy_s / index_s}


async def _load(url: str, conc: int, total: int, key: str | None) -> list[float]:
    import httpx

    words = ["a red car", "a dog on a beach", "a city at night", "a bowl of soup",
             "two people hiking", "a cat asleep", "a white boat", "a mountain lake"]
    lat: list[float] = []
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers) as c:
        async def worker(w: int) -> None:
            for i in range(w, total, conc):
                t0 = time.perf_counter()
                r = await c.post("/v1/search", json={"text": f"{words[i % 8]} {i}", "k": 10})
                r.raise_for_status()
                lat.append(time.perf_counter() - t0)
        await asyncio.gather(*(worker(w) for w in range(conc)))
    return lat


def server_part(artifact: str, index: Path, requests: int) -> dict:
    from test_serve_support import ThreadServer

    import clipfast
    from clipfast.serve.app import create_app
    from clipfast.serve.config import ServeConfig

    engine = clipfast.Engine(artifact, backend="onnxruntime")
    app = create_app(engine, ServeConfig(index=str(index)))
    out = {}
    with ThreadServer(app) as url:
        asyncio.run(_load(url, 1, 10, None))  # warm-up
        for conc in (1, 8):
            lat = np.asarray(asyncio.run(_load(url, conc, requests, None))) * 1000
            out[f"concurrency_{conc}"] = {"requests": len(lat),
                                          "p50_ms": float(np.percentile(lat, 50)),
                                          "p99_ms": float(np.percentile(lat, 99))}
        # The text tower alone, same engine, same run: what the server adds on top.
        tower = []
        for i in range(30):
            t0 = time.perf_counter()
            engine.encode_texts([f"a red car {i}"])
            tower.append(time.perf_counter() - t0)
        out["encode_text_p50_ms"] = 1000 * float(np.median(tower))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    from clipfast.artifact.manifest import artifact_digest, load_manifest
    from clipfast.cpu import host_cpu

    manifest = load_manifest(args.artifact)
    cpu = host_cpu()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        idx = index_part(args.n, manifest.spec.embed_dim, args.queries, artifact_digest(manifest),
                         Path(tmp))
        print(json.dumps(idx, indent=2), flush=True)
        srv = server_part(args.artifact, Path(tmp) / "idx", args.requests)
    result = {"host": {"isa": cpu.isa, "cpu": cpu.to_dict(), "cores": os.cpu_count(),
                       "python": platform.python_version(),
                       "load_avg": os.getloadavg()},
              "artifact": {"path": str(args.artifact), "family": manifest.spec.family,
                           "precision": manifest.spec.precision},
              "index": idx, "server_text_query": srv,
              "command": " ".join([Path(sys.executable).name, *sys.argv])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / ("search-" + cpu.isa.lower().replace(" ", "-"))
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    i, s = idx, srv
    md = [f"# clipfast search benchmark ({cpu.isa}, {os.cpu_count()} cores)", "",
          f"`{result['command']}`", "",
          f"Index of {i['n']:,} generated {i['dim']}-d vectors at the defaults: {i['kind']} "
          f"(`{i['factory']}`, {i['params']}).", "",
          "| | value |", "|---|---|",
          f"| build time (streamed from shards) | {i['seconds']:.1f} s |",
          f"| build peak RSS | {i['peak_rss_mib']:.0f} MiB ({i['rss_before_build_mib']:.0f} "
          "MiB before the build) |",
          f"| recall@10 vs exact | {i['recall_at_10']:.3f} |",
          f"| index QPS, k=10, batch of {i['queries']} | {i['index_qps_batch']:.0f} |",
          f"| numpy brute force QPS, same queries | {i['numpy_qps_batch']:.0f} |",
          f"| index vs numpy | {i['speedup_vs_numpy']:.1f}x |",
          f"| one query at a time, p50 | {i['index_single_query_p50_ms']:.2f} ms |", "",
          f"Text query through the server ({manifest.spec.family}, {manifest.spec.precision}, "
          "POST /v1/search, k=10):", "",
          "| concurrency | p50 | p99 |", "|---|---|---|"]
    for conc in (1, 8):
        c = s[f"concurrency_{conc}"]
        md.append(f"| {conc} | {c['p50_ms']:.1f} ms | {c['p99_ms']:.1f} ms |")
    md += ["", f"Text tower alone (Engine.encode_texts, one text): p50 "
           f"{s['encode_text_p50_ms']:.1f} ms. Load average at the end: "
           f"{result['host']['load_avg'][0]:.1f} (shared machine)."]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
