"""Connection-level guards under the ASGI app: a deadline for each request's line and headers, a
cap on the bytes before the headers end, a cap on connections per client address, and a count
of open connections that the app reads to answer 503 on the API routes while ``/health`` and
``/ready`` still answer.

Why hand-written: uvicorn 0.55 has only ``timeout_keep_alive`` (idle time between requests,
cancelled by the first byte of the next one) and ``limit_concurrency`` (which counts every open
connection, so connections that never finish their headers make it answer 503 to every route,
probes included); h11 caps the size of the unfinished headers (16 KiB) but not the time they
take, httptools neither; starlette sees a request only once its headers are complete. So the
guard wraps uvicorn's own HTTP protocol class (h11 or httptools, whichever it picked) in a
subclass that keeps a timer per connection and a shared count per address.
"""

from __future__ import annotations

import asyncio
import collections
import json
from typing import Any

# Connections past --max-connections that are still accepted, so that /health and /ready answer
# while the API routes answer 503; past this many more, a connection is refused at once.
PROBE_HEADROOM = 32
# Most bytes a request's line and headers may take (h11's own default cap, applied to httptools
# too).
MAX_HEADER_BYTES = 16 * 1024


def raw_error(status: int, reason: str, message: str, code: str,
              headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete HTTP/1.1 error response with the OpenAI-shaped body, closing the connection:
    written before any request was parsed, so the HTTP state machine is bypassed."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error"
                                 if status < 500 else "server_error", "param": None,
                                 "code": code}}, separators=(",", ":")).encode()
    lines = [f"HTTP/1.1 {status} {reason}", "content-type: application/json",
             f"content-length: {len(body)}", "connection: close",
             *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class ConnectionGuard:
    """Open connections of one server process, in all and per client address."""

    def __init__(self, *, max_connections: int, max_per_client: int, header_timeout_s: float):
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.header_timeout_s = header_timeout_s
        self.open = 0
        self.per_client: collections.Counter[str] = collections.Counter()
        self.refused = collections.Counter()  # reason -> connections refused or cut

    def admit(self, client: str | None) -> tuple[int, str, str, str] | None:
        """None when the connection may stay; else (status, reason, message, code)."""
        if self.open >= self.max_connections + PROBE_HEADROOM:
            self.refused["max_connections"] += 1
            return (503, "Service Unavailable",
                    f"{self.open} connections open, past the limit of {self.max_connections} "
                    "(--max-connections)", "max_connections")
        if client is not None and self.per_client[client] >= self.max_per_client:
            self.refused["max_connections_per_client"] += 1
            return (429, "Too Many Requests",
                    f"{self.per_client[client]} connections open from {client}, the limit per "
                    f"client address (--max-connections-per-client {self.max_per_client})",
                    "max_connections_per_client")
        self.open += 1
        if client is not None:
            self.per_client[client] += 1
        return None

    def release(self, client: str | None) -> None:
        self.open -= 1
        if client is not None:
            self.per_client[client] -= 1
            if self.per_client[client] <= 0:
                del self.per_client[client]

    @property
    def over_limit(self) -> bool:
        """More connections than --max-connections are open (the API routes answer 503)."""
        return self.open > self.max_connections


def guarded_protocol(base: type[asyncio.Protocol], guard: ConnectionGuard) -> type:
    """``base`` (uvicorn's H11Protocol or HttpToolsProtocol) with the guard's checks."""

    class Guarded(base):  # type: ignore[misc, valid-type]
        _guard = guard

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._peer = self.client[0] if self.client else None
            self._admitted = False
            self._deadline: asyncio.TimerHandle | None = None
            self._header_bytes = 0
            refusal = self._guard.admit(self._peer)
            if refusal is not None:
                self._cut(*refusal)
                return
            self._admitted = True
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._admitted:
                self._admitted = False
                self._guard.release(self._peer)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if not self._admitted:
                return
            cycle = self.cycle
            if self._deadline is None and (cycle is None or cycle.response_complete):
                self._arm()  # the first byte of a keep-alive connection's next request
            waiting = self._deadline is not None
            super().data_received(data)
            if not waiting:
                return
            if self.cycle is not cycle:  # the headers are complete: a request began
                self._disarm()
                return
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
                self._guard.refused["max_header_bytes"] += 1
                self._cut(431, "Request Header Fields Too Large",
                          f"the request line and headers are over {MAX_HEADER_BYTES} bytes",
                          "max_header_bytes")

        def _arm(self) -> None:
            self._header_bytes = 0
            self._deadline = self.loop.call_later(self._guard.header_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a request is running: the body deadline is the app's
            self._guard.refused["header_timeout"] += 1
            self._cut(408, "Request Timeout",
                      f"the request line and headers did not arrive within "
                      f"{self._guard.header_timeout_s:g} s (--header-timeout-s)", "header_timeout")

        def _cut(self, status: int, reason: str, message: str, code: str) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self.transport.write(raw_error(status, reason, message, code))
                self.transport.close()

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded
