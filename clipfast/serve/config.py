"""The server's settings, in one dataclass shared by the CLI, the app and the Ray deployment
(``clipfast.ray.build_app`` takes the same fields; there host, port, workers, the connection
limits and the header deadline are the Ray Serve proxy's business and unused)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from clipfast.errors import InputError


@dataclass(frozen=True)
class ServeConfig:
    """What ``clipfast serve`` is told; every limit is named in the errors it causes.

    max_batch: most rows one tower call gets (requests are merged up to it).
    max_wait_ms: how long the first queued row waits for others before its batch runs.
    max_queue: most rows admitted per tower (decoding, queued or running); past it a request
        gets 503 with Retry-After. This bounds the server's memory.
    max_items: most inputs in one request (413 past it).
    max_labels: most labels in one /v1/classify request (413 past it); their prompts are
        embedded in chunks of at most ``max_items`` and cached.
    max_body_bytes: most bytes in one request body (413 past it).
    max_image_pixels: most pixels (width x height, read from the header before decoding) in
        one image (422 past it).
    request_timeout_s: a request not answered by then gets 504; its rows not yet run are
        dropped from the queue.
    drain_timeout_s: on SIGTERM, how long in-flight requests get to finish.
    api_key: when set, /v1/* and /metrics need ``Authorization: Bearer KEY`` (or
        ``X-API-Key: KEY``).
    model_name: the id clients pass as ``model`` (default: the artifact folder's name).
    decode_threads: threads that decode and preprocess images, off the event loop.
    workers: server processes, each with its own Engine, accepting on one socket.
    max_connections: most open connections per process: past it the API routes answer 503
        (``/health`` and ``/ready`` still answer, on up to ``PROBE_HEADROOM`` more connections;
        beyond those a connection is answered 503 and closed at once); with ``max_body_bytes``
        it bounds the memory held by request bodies.
    max_connections_per_client: most open connections from one client address; past it a new
        connection is answered 429 and closed before anything is read.
    header_timeout_s: a request's line and headers must arrive within this (from the
        connection's first byte, or a keep-alive request's first byte); else 408 and close.
    body_timeout_s: a request's body must arrive within this after its headers; else 408
        and close.
    max_buffered_bytes: most bytes of request bodies held at once by the process, all requests
        together (counted as they arrive, released when the request is answered); past it
        503 with Retry-After. With ``max_queue`` this bounds the memory held for requests.
    max_text_chars: most characters in one text (and one label); 413 past it. The tokenizer
        keeps only the context's tokens, but a text is refused rather than cut: where the cut
        would fall cannot be known without tokenizing the whole text.
    index: a clipfast index folder: adds POST /v1/search and the search page (clipfast.search).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256
    max_items: int = 64
    max_labels: int = 1024
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    request_timeout_s: float = 30.0
    drain_timeout_s: float = 30.0
    api_key: str | None = None
    model_name: str | None = None
    decode_threads: int | None = None
    workers: int = 1
    max_connections: int = 512
    max_connections_per_client: int = 64
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_text_chars: int = 16384
    max_buffered_bytes: int = 256 * 1024 * 1024
    index: str | None = None

    def __post_init__(self) -> None:
        positive = ("max_batch", "max_queue", "max_items", "max_labels", "max_body_bytes",
                    "max_image_pixels", "request_timeout_s", "drain_timeout_s", "workers",
                    "max_connections", "max_connections_per_client", "header_timeout_s",
                    "body_timeout_s", "max_text_chars", "max_buffered_bytes")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise InputError(f"--{name.replace('_', '-')} {value!r}: must be a positive "
                                 "number")
        if self.max_wait_ms < 0:
            raise InputError(f"--max-wait-ms {self.max_wait_ms!r}: must be at least 0")
        if self.max_queue < self.max_items:
            raise InputError(f"--max-queue {self.max_queue} is below --max-items "
                             f"{self.max_items}: a full-size request could never be admitted")
        if self.max_buffered_bytes < self.max_body_bytes:
            raise InputError(f"--max-buffered-bytes {self.max_buffered_bytes} is below "
                             f"--max-body-bytes {self.max_body_bytes}: a full-size body could "
                             "never be read")
        if self.decode_threads is not None and self.decode_threads < 1:
            raise InputError(f"--decode-threads {self.decode_threads!r}: must be at least 1")
        if not 0 <= self.port <= 65535:
            raise InputError(f"--port {self.port}: expected 0..65535")
        if self.api_key is not None and not self.api_key.strip():
            raise InputError("the API key is blank: give a non-empty key or none")
        if self.api_key is not None and self.api_key != self.api_key.strip():
            # Clients strip their header values, so such a key could never match.
            raise InputError("the API key has blanks around it (--api-key / CLIPFAST_API_KEY): "
                             "no client could send it; remove them")

    def as_dict(self) -> dict:
        """Every field but the API key (for logs and /v1/models)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "api_key"}
