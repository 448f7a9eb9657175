"""Run the app on uvicorn: bind (127.0.0.1 unless told otherwise; a port that cannot be bound is
an error before the model loads), load the Engine, serve, and on SIGTERM or SIGINT stop
accepting, let in-flight requests finish (at most ``drain_timeout_s``), then return 0.
``workers > 1`` runs that many processes, each with its own Engine, on one listening socket.
Connections go through ``clipfast.serve.protocol``'s guard (header deadline, per-address cap)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
import socket
import sys
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from clipfast.errors import InputError
from clipfast.serve.config import ServeConfig
from clipfast.serve.protocol import guarded_protocol
from clipfast.serve.service import load_engine

__all__ = ["bind", "load_engine", "serve", "uvicorn_config"]

log = logging.getLogger("clipfast.serve")


class _Server(uvicorn.Server):
    """uvicorn's server with our signal policy: a signal starts the graceful drain and the
    process then exits 0 (uvicorn re-raises the signal after shutdown, which would end the
    process with 143 instead)."""

    def __init__(self, config: uvicorn.Config, on_drain=None):
        super().__init__(config)
        self._on_drain = on_drain

    @contextlib.contextmanager
    def capture_signals(self):
        loop = asyncio.get_running_loop()

        def stop(sig: int) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            if self._on_drain is not None:
                self._on_drain()
            log.info("clipfast serve: %s received, draining in-flight requests",
                     signal.Signals(sig).name)

        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop, sig)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                pass
        try:
            yield
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)


def uvicorn_config(app: Any, config: ServeConfig, log_level: str = "warning",
                   protocol: type | None = None) -> uvicorn.Config:
    """uvicorn's settings for ``app`` (from ``create_app``): its HTTP protocol (``protocol``,
    default uvicorn's pick: httptools if installed, else h11) wrapped in the app's connection
    guard. uvicorn's own ``limit_concurrency`` stays off: the guard's count answers 503 on the
    API routes past --max-connections while the probes still answer."""
    http: Any = "auto"
    service = getattr(getattr(app, "state", None), "service", None)
    if service is not None:
        http = guarded_protocol(protocol or AutoHTTPProtocol, service.connections)
    return uvicorn.Config(
        app, host=config.host, port=config.port, log_level=log_level, access_log=False,
        lifespan="on", timeout_graceful_shutdown=config.drain_timeout_s, http=http,
        timeout_keep_alive=5)


def bind(config: ServeConfig) -> socket.socket:
    """The listening socket for ``config.host``:``config.port``; InputError naming the address
    when it cannot be bound (in use, not this machine's, no permission)."""
    infos = socket.getaddrinfo(config.host or None, config.port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise InputError(f"--host {config.host} --port {config.port}: cannot listen there "
                         f"({e.strerror or e}); pick another port or stop what holds it"
                         ) from None
    sock.set_inheritable(True)
    return sock


def _serve(engine: Any, config: ServeConfig, log_level: str,
           sockets: list[socket.socket] | None = None) -> int:
    from clipfast.serve.app import create_app

    app = create_app(engine, config)
    service = app.state.service

    def on_drain() -> None:
        service.draining = True

    server = _Server(uvicorn_config(app, config, log_level), on_drain=on_drain)
    server.run(sockets=sockets)
    if not server.started:
        return 1
    return 0


def _worker(artifact: str, options: dict, config: ServeConfig, log_level: str,
            sock: socket.socket) -> None:
    logging.basicConfig(level=log_level.upper(), format="%(message)s")
    engine = load_engine(artifact, config=config, **options)
    sys.exit(_serve(engine, config, log_level, sockets=[sock]))


def serve(artifact: str, config: ServeConfig, *, backend: str = "auto",
          device: str | None = None, threads: int | None = None,
          log_level: str = "info") -> int:
    """Serve ``artifact`` until SIGTERM/SIGINT; the exit status (0 after a clean drain)."""
    options = {"backend": backend, "device": device, "threads": threads}
    # Bound before the model loads: a port in use is an error at once, not after loading.
    sock = bind(config)
    if config.workers == 1:
        try:
            engine = load_engine(artifact, config=config, **options)
            return _serve(engine, config, log_level, sockets=[sock])
        finally:
            sock.close()
    # Several processes accept on the one socket (as uvicorn's --workers does).
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(artifact, options, config, log_level, sock),
                         name=f"clipfast-serve-{i}") for i in range(config.workers)]
    for p in procs:
        p.start()

    def forward(sig, frame) -> None:
        for p in procs:
            if p.is_alive() and p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    import os

                    os.kill(p.pid, sig)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for p in procs:
            p.join()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        sock.close()
    return max((p.exitcode or 0) for p in procs)
