"""Run the app on uvicorn: load the Engine, bind (127.0.0.1 unless told otherwise), serve, and on
SIGTERM or SIGINT stop accepting, let in-flight requests finish (at most ``drain_timeout_s``),
then return 0. ``workers > 1`` runs that many processes, each with its own Engine, on one
listening socket."""

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

from clipfast.serve.config import ServeConfig

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


def load_engine(artifact: str, *, backend: str = "auto", device: str | None = None,
                threads: int | None = None, config: ServeConfig | None = None) -> Any:
    import clipfast

    config = config or ServeConfig()
    # One server batch is one tower call: the Engine chunks at its batch size.
    return clipfast.Engine(artifact, backend=backend, device=device, threads=threads,
                           batch_size=max(32, config.max_batch))


def _uvicorn_config(app: Any, config: ServeConfig, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        app, host=config.host, port=config.port, log_level=log_level, access_log=False,
        lifespan="on", timeout_graceful_shutdown=config.drain_timeout_s,
        limit_concurrency=config.max_connections, timeout_keep_alive=5)


def _serve(engine: Any, config: ServeConfig, log_level: str,
           sockets: list[socket.socket] | None = None) -> int:
    from clipfast.serve.app import create_app

    app = create_app(engine, config)
    service = app.state.service

    def on_drain() -> None:
        service.draining = True

    server = _Server(_uvicorn_config(app, config, log_level), on_drain=on_drain)
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
    if config.workers == 1:
        engine = load_engine(artifact, config=config, **options)
        return _serve(engine, config, log_level)
    # Several processes accept on one socket bound here (as uvicorn's --workers does).
    sock = _uvicorn_config(None, config, log_level).bind_socket()
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
