"""``clipfast serve``: the argument parser and the command. Importing this module needs neither
fastapi nor uvicorn: they are imported when the command runs, and their absence is reported as
the extra to install."""

from __future__ import annotations

import argparse
import importlib.util

from clipfast.errors import ClipfastError

_EXTRA_MODULES = ("fastapi", "uvicorn", "multipart", "prometheus_client")


def missing_extra() -> list[str]:
    """The serve extra's modules that are not installed."""
    return [m for m in _EXTRA_MODULES if importlib.util.find_spec(m) is None]


def _cmd_serve(args: argparse.Namespace) -> int:
    missing = missing_extra()
    if missing:
        raise ClipfastError(f"`clipfast serve` needs the serve extra ({', '.join(missing)} "
                            "missing): pip install 'clipfast[serve]'")
    import logging

    from clipfast import settings
    from clipfast.serve.config import ServeConfig

    logging.getLogger("clipfast.serve").setLevel(args.log_level.upper())
    from clipfast.serve.server import serve

    api_key = args.api_key if args.api_key is not None else settings.CLIPFAST_API_KEY
    config = ServeConfig(
        host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue, max_items=args.max_items, max_labels=args.max_labels,
        max_body_bytes=args.max_body_bytes,
        max_image_pixels=args.max_image_pixels, request_timeout_s=args.request_timeout_s,
        drain_timeout_s=args.drain_timeout_s, api_key=api_key, model_name=args.model_name,
        decode_threads=args.decode_threads, workers=args.workers,
        max_connections=args.max_connections,
        max_connections_per_client=args.max_connections_per_client,
        header_timeout_s=args.header_timeout_s, body_timeout_s=args.body_timeout_s,
        max_text_chars=args.max_text_chars, max_buffered_bytes=args.max_buffered_bytes,
        index=args.index)
    return serve(args.artifact, config, backend=args.backend, device=args.device,
                 threads=args.threads, log_level=args.log_level)


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``serve`` on the CLI's subparsers."""
    from clipfast.serve.config import ServeConfig

    d = ServeConfig()
    p = sub.add_parser(
        "serve", help="serve an artifact over HTTP (OpenAI-style embeddings, dynamic batching)",
        description="HTTP embedding server: POST /v1/embeddings (OpenAI schema; images with "
                    "\"modality\": \"image\" as data URLs), /v1/images/embeddings, "
                    "/v1/classify; GET /v1/models, /health, /ready, /metrics. Needs "
                    "pip install 'clipfast[serve]'.")
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("--host", default=d.host,
                   help=f"address to bind (default {d.host}: this machine only)")
    p.add_argument("--port", type=int, default=d.port, help=f"default {d.port}")
    p.add_argument("--max-batch", type=int, default=d.max_batch, metavar="N",
                   help=f"most rows per tower call (default {d.max_batch})")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms, metavar="T",
                   help=f"longest wait for a batch to fill (default {d.max_wait_ms:g})")
    p.add_argument("--max-queue", type=int, default=d.max_queue, metavar="Q",
                   help=f"most rows admitted per tower; past it 503 + Retry-After "
                        f"(default {d.max_queue})")
    p.add_argument("--max-items", type=int, default=d.max_items, metavar="N",
                   help=f"most inputs per request (413 past it; default {d.max_items})")
    p.add_argument("--max-labels", type=int, default=d.max_labels, metavar="N",
                   help=f"most labels per /v1/classify request (413; default "
                        f"{d.max_labels})")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, metavar="B",
                   help=f"most bytes per request body (413; default {d.max_body_bytes})")
    p.add_argument("--max-buffered-bytes", type=int, default=d.max_buffered_bytes, metavar="B",
                   help="most bytes of request bodies held at once, all requests together "
                        f"(503 past it; default {d.max_buffered_bytes})")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, metavar="P",
                   help=f"most pixels per image, from its header (422; default "
                        f"{d.max_image_pixels})")
    p.add_argument("--request-timeout-s", type=float, default=d.request_timeout_s,
                   metavar="S", help=f"answer 504 after this (default {d.request_timeout_s:g})")
    p.add_argument("--drain-timeout-s", type=float, default=d.drain_timeout_s, metavar="S",
                   help="on SIGTERM, how long in-flight requests get to finish "
                        f"(default {d.drain_timeout_s:g})")
    p.add_argument("--api-key", default=None,
                   help="require Authorization: Bearer KEY on /v1/* and /metrics (default: "
                        "$CLIPFAST_API_KEY, else no key)")
    p.add_argument("--model-name", default=None,
                   help="the model id clients send (default: the artifact folder's name)")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="server processes, each with its own Engine (default 1)")
    p.add_argument("--decode-threads", type=int, default=None, metavar="N",
                   help="image decode threads (default: the CPU count)")
    p.add_argument("--max-connections", type=int, default=d.max_connections, metavar="N",
                   help="most open connections per process; past it the API routes answer 503, "
                        f"the probes still answer (default {d.max_connections})")
    p.add_argument("--max-connections-per-client", type=int,
                   default=d.max_connections_per_client, metavar="N",
                   help="most open connections from one client address (429 and closed past "
                        f"it; default {d.max_connections_per_client})")
    p.add_argument("--header-timeout-s", type=float, default=d.header_timeout_s, metavar="S",
                   help="a request's line and headers must arrive within this (408 and closed; "
                        f"default {d.header_timeout_s:g})")
    p.add_argument("--body-timeout-s", type=float, default=d.body_timeout_s, metavar="S",
                   help="a request's body must arrive within this after its headers (408 and "
                        f"closed; default {d.body_timeout_s:g})")
    p.add_argument("--max-text-chars", type=int, default=d.max_text_chars, metavar="N",
                   help=f"most characters per text or label (413; default {d.max_text_chars})")
    p.add_argument("--index", default=None,
                   help="a clipfast index folder: adds POST /v1/search and a search page at / "
                        "(needs clipfast[search])")
    p.add_argument("--backend", default="auto",
                   help="auto, tensorrt, onnxruntime or torch (default auto)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=None, help="tower threads (ONNX Runtime)")
    p.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(fn=_cmd_serve)
    return p
