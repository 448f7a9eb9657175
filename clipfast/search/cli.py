"""The ``clipfast index`` and ``clipfast search`` subcommands (importing this module pulls in
nothing heavy: ``clipfast --help`` loads it)."""

from __future__ import annotations

import argparse
import json


def add_index_parser(sub) -> argparse.ArgumentParser:
    from clipfast.search.index import KINDS, IndexOptions

    d = IndexOptions()
    p = sub.add_parser(
        "index", help="build a FAISS index over clipfast embed output (needs clipfast[search])",
        description="Index the embeddings of one or more clipfast embed --out folders (all of "
                    "one artifact) for clipfast search and clipfast serve --index. Exact search "
                    f"below --flat-below vectors ({d.flat_below}), IVF-PQ with exact re-ranking "
                    "above. Written atomically; running it again on unchanged inputs does "
                    "nothing.")
    p.add_argument("embeddings", nargs="+", metavar="EMB_DIR", help="clipfast embed --out folders")
    p.add_argument("--out", required=True, help="index folder to write")
    p.add_argument("--kind", choices=KINDS, default="auto",
                   help="auto (flat below --flat-below, else ivfpq), flat, ivfpq or hnsw")
    p.add_argument("--flat-below", type=int, default=d.flat_below, metavar="N",
                   help=f"auto: exact search below this many vectors (default {d.flat_below})")
    p.add_argument("--nlist", type=int, default=None, help="ivfpq lists (default ~sqrt(N))")
    p.add_argument("--pq-m", type=int, default=None, help="ivfpq sub-vectors (default dim/4)")
    p.add_argument("--nprobe", type=int, default=d.nprobe,
                   help=f"ivfpq lists visited per query (default {d.nprobe})")
    p.add_argument("--k-factor", type=int, default=d.k_factor,
                   help=f"ivfpq candidates re-ranked exactly per result (default {d.k_factor})")
    p.add_argument("--hnsw-m", type=int, default=d.hnsw_m, help=f"hnsw links (default {d.hnsw_m})")
    p.add_argument("--ef-search", type=int, default=d.ef_search,
                   help=f"hnsw search breadth (default {d.ef_search})")
    p.add_argument("--train-size", type=int, default=d.train_size,
                   help=f"most vectors ivfpq trains on (default {d.train_size})")
    p.add_argument("--factory", default=None,
                   help="a FAISS index_factory string instead of --kind's (inner product)")
    p.add_argument("--dedup", type=float, default=None, metavar="THRESHOLD",
                   help="also write INDEX/dedup.parquet: groups of near-duplicates (cosine >= "
                        "THRESHOLD, e.g. 0.95)")
    p.add_argument("--dedup-k", type=int, default=d.dedup_k,
                   help=f"neighbours compared per vector for --dedup (default {d.dedup_k})")
    p.add_argument("--artifact", default=None,
                   help="refuse embeddings that are not of this artifact")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an index of another artifact at --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=_cmd_index)
    return p


def _cmd_index(args: argparse.Namespace) -> int:
    from clipfast.search.index import IndexOptions, build_index

    digest = None
    if args.artifact:
        from clipfast.artifact.manifest import artifact_digest, load_manifest

        digest = artifact_digest(load_manifest(args.artifact))
    opts = IndexOptions(kind=args.kind, flat_below=args.flat_below, nlist=args.nlist,
                        pq_m=args.pq_m, nprobe=args.nprobe, k_factor=args.k_factor,
                        hnsw_m=args.hnsw_m, ef_search=args.ef_search,
                        train_size=args.train_size, factory=args.factory, dedup=args.dedup,
                        dedup_k=args.dedup_k)
    s = build_index(args.embeddings, args.out, opts, artifact_digest=digest,
                    overwrite=args.overwrite, progress=not args.quiet)
    what = "up to date" if s.up_to_date else f"built in {s.seconds:.1f} s"
    dedup = f", {s.dedup_groups} near-duplicate groups" if s.dedup_groups is not None else ""
    print(f"{s.out}: {s.count} vectors of {s.dim}, {s.kind} ({s.factory}), {what}{dedup}")
    return 0


def add_search_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "search", help="search an index (clipfast index) by text or image",
        description="Top-k keys of INDEX for a text query (or --image), embedded by the "
                    "artifact the index was built from.")
    p.add_argument("index", help="index folder (clipfast index --out)")
    p.add_argument("text", nargs="?", default=None, help="the query text")
    p.add_argument("--image", default=None, help="query by this image file instead")
    p.add_argument("--k", type=int, default=10, help="results (default 10)")
    p.add_argument("--artifact", default=None,
                   help="artifact to embed the query with (default: the one the index names; "
                        "refused if it is another model)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="cpu")
    p.set_defaults(fn=_cmd_search)
    return p


def _cmd_search(args: argparse.Namespace) -> int:
    import clipfast
    from clipfast.errors import InputError
    from clipfast.search.index import SearchIndex
    from clipfast.search.query import search

    if (args.text is None) == (args.image is None):
        raise InputError("clipfast search: give a query text or --image FILE (one of them)")
    index = SearchIndex(args.index)
    artifact = args.artifact or index.artifact_path
    if not artifact:
        raise InputError(f"{args.index} names no artifact: pass --artifact")
    engine = clipfast.Engine(artifact, backend=args.backend, device=args.device)
    hits = search(index, engine, text=args.text, image=args.image, k=args.k)
    if args.json:
        print(json.dumps({"query": {"text": args.text, "image": args.image}, "k": args.k,
                          "results": [h.to_dict() for h in hits]}, indent=2))
    else:
        for rank, h in enumerate(hits, 1):
            print(f"{rank:3d}  {h.score:+.4f}  {h.key}")
    return 0
