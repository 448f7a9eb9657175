"""`clipfast serve` as a process on a loopback port: a bounded load test (correct rows for every
request, no errors), an overload far past the queue (only 200s and 503s with Retry-After, the
server alive and its memory bounded), and SIGTERM (in-flight requests complete, exit 0).
Behaviour only: the timing figures are benchmarks/serve_load.py's."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")

from test_serve_support import data_url, decode_rows, jpeg  # noqa: E402

ATOL = 1e-6  # see test_serve.py


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class Served:
    """``clipfast serve`` in a child process; its log (stdout and stderr) is read as it comes
    by a thread, so the test can wait on its lines and the pipe never fills."""

    READY = "clipfast serve: m ready ("  # each process logs it once its app has started

    def __init__(self, artifact, *flags: str, workers: int = 1):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "clipfast.cli", "serve", str(artifact), "--port",
             str(self.port), "--backend", "onnxruntime", "--model-name", "m",
             "--workers", str(workers), *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        # Every worker ready (its lifespan has started, so its signal handlers are installed:
        # SIGTERM now drains it instead of killing it while it loads), or the server gone.
        with self._changed:
            done = self._changed.wait_for(
                lambda: self._eof or self.log().count(self.READY) >= workers, timeout=180)
        if not done or self._eof:
            self.proc.kill()
            self._reader.join(10)
            raise AssertionError(f"{workers} worker(s) not ready within 180 s (exit "
                                 f"{self.proc.poll()}): {self.log()}")
        assert httpx.get(self.url + "/ready", timeout=30).status_code == 200

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def log(self) -> str:
        """What the server has logged so far (all of it once ``wait_closed`` returned)."""
        return "".join(self._lines)

    def wait_closed(self) -> str:
        self._reader.join(30)
        return self.log()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture(scope="module")
def inputs(photos):
    texts = [f"the number {i} in words" for i in range(40)]
    images = [jpeg(photos[k]) for k in ("astronaut", "chelsea", "coffee", "rocket")]
    return texts, images


@pytest.fixture(scope="module")
def served(small_clip_artifact):
    s = Served(small_clip_artifact, "--max-batch", "16", "--max-wait-ms", "5", "--max-queue", "24",
               "--max-items", "8")
    yield s
    assert s.stop() == 0


def test_bounded_loopback_load_every_answer_is_right(served, small_clip_engine, inputs):
    """120 requests (texts and images, 1 to 3 items) from 8 concurrent clients."""
    texts, images = inputs
    want_t = small_clip_engine.encode_texts(texts)
    want_i = small_clip_engine.encode_images(images)
    rng = np.random.default_rng(0)
    plan = []
    for _ in range(120):
        kind = "image" if rng.random() < 0.3 else "text"
        pool = images if kind == "image" else texts
        plan.append((kind, [int(i) for i in rng.integers(0, len(pool), rng.integers(1, 4))]))

    async def main():
        sem = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=served.url, timeout=120) as c:
            async def one(kind, idx):
                async with sem:
                    body = ({"model": "m", "input": [texts[i] for i in idx]} if kind == "text"
                            else {"model": "m", "modality": "image",
                                  "input": [data_url(images[i]) for i in idx]})
                    return await c.post("/v1/embeddings", json=body)
            return await asyncio.gather(*(one(k, i) for k, i in plan))

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * len(plan)
    for (kind, idx), r in zip(plan, responses):
        rows = decode_rows(r.json())
        want = want_i if kind == "image" else want_t
        got = np.stack([rows[j] for j in range(len(idx))])
        np.testing.assert_allclose(got, want[idx], rtol=0, atol=ATOL)


def test_overload_answers_only_503_with_retry_after_and_memory_stays_bounded(served, inputs):
    """64 clients at once, each with 8 images, against a queue of 24 rows: the excess gets 503
    with Retry-After; nothing else goes wrong and the server's memory does not run away."""
    _, images = inputs
    body = {"model": "m", "modality": "image", "input": [data_url(images[k % 4])
                                                         for k in range(8)]}
    rss_before = _rss_mb(served.proc.pid)
    high = []

    async def main():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=served.url, timeout=120, limits=limits) as c:
            async def one():
                return await c.post("/v1/embeddings", json=body)
            tasks = [asyncio.create_task(one()) for _ in range(64)]
            pending: set = set(tasks)
            while pending:  # a sample of the queue after each answer, not on a clock
                ready = (await c.get("/ready")).json()
                high.append(ready["queue"]["image"]["admitted"])
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            return [t.result() for t in tasks]

    rs = asyncio.run(main())
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 1
    assert all(int(r.headers["retry-after"]) >= 1 for r in rs if r.status_code == 503)
    assert max(high) <= 24
    assert httpx.get(served.url + "/health").status_code == 200
    # Bodies are small and admission is bounded: the server grows by far less than 64
    # requests' worth of decoded pixels kept around would need.
    assert _rss_mb(served.proc.pid) - rss_before < 300
    metrics = httpx.get(served.url + "/metrics").text
    assert 'clipfast_errors_total{endpoint="/v1/embeddings",kind="overloaded"}' in metrics


def test_sigterm_drains_in_flight_requests_then_exits_0(small_clip_artifact, small_clip_engine,
                                                        inputs):
    texts, _ = inputs
    # A long batching wait keeps the requests queued (in flight) when SIGTERM comes.
    s = Served(small_clip_artifact, "--max-batch", "64", "--max-wait-ms", "4000")
    try:
        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                tasks = [asyncio.create_task(c.post("/v1/embeddings", json={
                    "model": "m", "input": [texts[i]]})) for i in range(6)]
                # All six queued (or, on a very slow machine, the first batch already left):
                # each check waits for the server's own answer, not for a clock.
                while ((await c.get("/ready")).json()["queue"]["text"]["admitted"] < 6
                       and not any(t.done() for t in tasks)):
                    pass
                in_flight = sum(not t.done() for t in tasks)
                os.kill(s.proc.pid, signal.SIGTERM)
                assert in_flight >= 1
                return await asyncio.gather(*tasks)

        rs = asyncio.run(main())
        assert [r.status_code for r in rs] == [200] * 6
        got = np.stack([decode_rows(r.json())[0] for r in rs])
        want = small_clip_engine.encode_texts(texts[:6])
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
        assert s.proc.wait(60) == 0
        assert "SIGTERM received, draining" in s.wait_closed()
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/health", timeout=2)
    finally:
        if s.proc.poll() is None:
            s.proc.kill()


def test_workers_share_one_port_and_all_exit_0_on_sigterm(small_clip_artifact, small_clip_engine,
                                                          inputs):
    texts, _ = inputs
    s = Served(small_clip_artifact, workers=2)  # returns once both workers are ready
    try:
        for i in range(6):
            r = httpx.post(s.url + "/v1/embeddings", json={"model": "m", "input": [texts[i]]},
                           timeout=60)
            assert r.status_code == 200
            np.testing.assert_allclose(decode_rows(r.json())[0], small_clip_engine.encode_texts(
                [texts[i]])[0], rtol=0, atol=ATOL)
        assert s.stop() == 0
        log = s.wait_closed()
        assert log.count(Served.READY) == 2
        assert log.count("SIGTERM received, draining") == 2, log
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
