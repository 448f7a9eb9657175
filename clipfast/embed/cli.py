"""The ``clipfast embed`` subcommand's arguments (imports nothing heavy: ``clipfast --help``
loads this module)."""

from __future__ import annotations

import argparse
import sys

from clipfast.types import plural


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "embed",
        help="embed image folders, list files, webdataset .tar shards or parquet/CSV/JSONL "
             "tables into resumable parquet shards",
        description="Embed every input of SOURCE... into parquet shards under --out. Running "
                    "the same command again after an interruption (kill -9 included) resumes "
                    "where it stopped. Read the result with clipfast.read_embeddings(OUT).")
    p.add_argument("artifact", help="artifact directory (clipfast export)")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="folders (recursive), list files (.txt/.lst: one path a line), "
                        "webdataset shards (.tar, brace patterns such as shard-{000..099}.tar) "
                        "or tables (.parquet, .csv, .jsonl) with an image path/bytes column")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--text-column", default=None,
                   help="embed texts from this table column (or tar member extension, e.g. "
                        "txt) instead of images")
    p.add_argument("--image-column", default=None,
                   help="table column holding image paths or bytes (default: the first of "
                        "image, image_path, path, filepath, file, jpg, png, img)")
    p.add_argument("--key-column", default=None,
                   help="table column used as the row key (default: the image path, else "
                        "FILE:ROW)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="embedding dtype in the shards (default float32)")
    p.add_argument("--batch-size", type=int, default=32, help="inputs per tower call (32)")
    p.add_argument("--shard-size", type=int, default=4096,
                   help="inputs per output shard, rounded up to a multiple of --batch-size "
                        "(4096): the most work a kill can lose")
    p.add_argument("--workers", type=int, default=None,
                   help="decode/preprocess threads (default: the CPU count)")
    p.add_argument("--threads", type=int, default=None,
                   help="tower intra-op threads (default: the Engine's, physical cores)")
    p.add_argument("--prefetch", type=int, default=None,
                   help="batches decoded ahead of the tower (default: workers + 1); bounds "
                        "memory")
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--fast-decode", action="store_true",
                   help="JPEG draft (DCT downscaling) + Pillow reducing_gap: much faster on "
                        "large photos, not pixel-exact; its cost on a sample of the inputs is "
                        "recorded in the output manifest")
    p.add_argument("--fidelity-sample", type=int, default=16,
                   help="images used to measure --fast-decode's cost (16)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing clipfast embed output in --out (only the files "
                        "it wrote are deleted; a folder that is not a clipfast output is "
                        "always refused)")
    p.add_argument("--reembed-changed", action="store_true",
                   help="on resume, embed again inputs whose content changed since they were "
                        "embedded (default: refuse, naming them)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--ray", action="store_true",
                   help="run the towers on a Ray cluster (Ray Data map_batches); same output")
    p.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="Ray actors, each loading the Engine once (1)")
    p.set_defaults(fn=_cmd_embed)
    return p


def _cmd_embed(args: argparse.Namespace) -> int:
    try:
        return _embed(args)
    except KeyboardInterrupt as e:
        # Ctrl-C: what is saved stays saved; say so instead of a traceback (130 = 128 + SIGINT)
        from clipfast.embed.job import EmbedInterrupted

        msg = (str(e) if isinstance(e, EmbedInterrupted) else
               "interrupted while starting; rerun the same command to resume")
        print(f"\nclipfast embed: {msg}", file=sys.stderr)
        return 130


def _embed(args: argparse.Namespace) -> int:
    from clipfast.embed.job import EmbedOptions, run_embed

    opts = EmbedOptions(
        artifact=args.artifact, sources=args.sources, out=args.out,
        text_column=args.text_column, image_column=args.image_column,
        key_column=args.key_column, dtype=args.dtype, batch_size=args.batch_size,
        shard_size=args.shard_size, workers=args.workers, threads=args.threads,
        prefetch=args.prefetch, backend=args.backend, device=args.device,
        fast_decode=args.fast_decode, fidelity_sample=args.fidelity_sample,
        overwrite=args.overwrite, reembed_changed=args.reembed_changed,
        progress=not args.quiet, ray=args.ray,
        ray_address=args.address, ray_concurrency=args.concurrency)
    s = run_embed(opts)
    resumed = f", resumed after {s.resumed_from}" if s.resumed_from else ""
    print(f"{s.embedded} of {plural(s.items, 'input')} embedded, {s.failed} failed, "
          f"{plural(s.shards, 'shard')} -> {s.out}{resumed} ({s.seconds:.1f} s)", file=sys.stderr)
    return 0 if not s.failed else 2
