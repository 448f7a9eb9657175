"""Helpers shared by the serving tests (no tests here; the tiny CLIP artifact is conftest's
``small_clip_artifact``): a uvicorn server in a thread, a stand-in Engine whose towers can be
held, image data URLs."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from types import SimpleNamespace

import httpx
import numpy as np
from PIL import Image

from clipfast.artifact.spec import LogitsConfig
from clipfast.inputs.pipeline import PreparedImages, embeddings_result
from clipfast.types import Failure

ERROR_KEYS = {"message", "type", "param", "code"}


def run_asgi(app, fn):
    """``await fn(client)`` with an httpx client on ``app`` in-process (no socket)."""
    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await fn(client)
    return asyncio.run(main())


def assert_client_error(r: httpx.Response, what: str) -> dict:
    """A 4xx with the OpenAI error body; returns its ``error`` object."""
    assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == ERROR_KEYS and err["type"] == "invalid_request_error", (what, err)
    assert isinstance(err["message"], str) and err["message"], what
    return err


def jpeg(arr: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def decode_rows(body: dict) -> dict[int, np.ndarray]:
    """index -> float32 row from an embeddings response (float or base64 encoding)."""
    out = {}
    for d in body["data"]:
        e = d["embedding"]
        out[d["index"]] = (np.frombuffer(base64.b64decode(e), "<f4") if isinstance(e, str)
                           else np.asarray(e, np.float32))
    return out


class ThreadServer:
    """``clipfast.serve``'s uvicorn server (with its connection guard) on an ephemeral loopback
    port, in a thread."""

    def __init__(self, app, protocol: type | None = None):
        import dataclasses

        from clipfast.serve.server import _Server, uvicorn_config

        config = dataclasses.replace(app.state.service.config, host="127.0.0.1", port=0,
                                     drain_timeout_s=10)
        self.server = _Server(uvicorn_config(app, config, protocol=protocol))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class StubEngine:
    """The part of clipfast.Engine the server uses, with 4-dim embeddings computed from the
    inputs, and a ``gate`` the towers wait on (cleared: every tower call blocks)."""

    embed_dim = 4
    backend = "stub"
    backend_device = "cpu"
    prompt_template = "a photo of a {}."

    def __init__(self):
        self.manifest = SimpleNamespace(directory="/stub/stub-model", spec=SimpleNamespace(
            family="stub", precision="fp32",
            logits=LogitsConfig(kind="softmax", scale=100.0),
            tokenizer=SimpleNamespace(pad_id=0)))
        self.gate = threading.Event()
        self.gate.set()
        self.calls: list[int] = []
        self.running = threading.Event()

    def tokenize(self, texts):
        ids = np.zeros((len(texts), 8), np.int64)
        for i, t in enumerate(texts):
            codes = [ord(c) % 97 + 1 for c in t[:8]]
            ids[i, :len(codes)] = codes
        return {"input_ids": ids}

    def _tower(self, x: np.ndarray) -> np.ndarray:
        self.running.set()
        self.gate.wait(30)
        self.calls.append(len(x))
        flat = x.reshape(len(x), -1).astype(np.float64)
        return np.stack([flat.sum(1), flat.max(1), flat.min(1) + 1, np.ones(len(x))], 1
                        ).astype(np.float32)

    def run_text_tower(self, tokens):
        return self._tower(tokens["input_ids"])

    def run_image_tower(self, pixels):
        return self._tower(pixels)

    def prepare_images(self, images, *, offset=0):
        """A PreparedImages, as Engine.prepare_images: a failure names its position
        ``offset + i``."""
        rows, idx, failures = [], [], []
        for i, data in enumerate(images, start=offset):
            try:
                img = Image.open(io.BytesIO(data))
                img.load()
                arr = np.asarray(img.convert("RGB").resize((4, 4)), np.float32) / 255
                rows.append(arr.transpose(2, 0, 1))
                idx.append(i)
            except Exception as e:
                failures.append(Failure(i, "<bytes>", f"image {i} (<bytes>): cannot identify "
                                        f"image data ({type(e).__name__})"))
        pixels = np.stack(rows) if rows else np.zeros((0, 3, 4, 4), np.float32)
        return PreparedImages(pixels, idx, failures, offset, len(images))

    def embed_prepared(self, prepared, *, normalize=True):
        """Prepared batches through the image tower as one batch, as Engine.embed_prepared."""
        prepared = [p for p in prepared if len(p)]
        emb = self.run_image_tower(np.concatenate([p.pixels for p in prepared]))
        return embeddings_result(emb, [i for p in prepared for i in p.indices],
                                 [f for p in prepared for f in p.failures], normalize)

    def logits(self, a, b):
        return (100.0 * a @ b.T).astype(np.float32)


class HeldTokenizer:
    """Stands in for ``engine.tokenize``: each call sets ``entered`` and waits (5 s at most) for
    ``release``; ``released`` records, call by call, whether the release came in time. Shows
    that tokenization runs off the event loop: the loop must answer while a call is held."""

    def __init__(self, engine):
        self.entered, self.release = threading.Event(), threading.Event()
        self.released: list[bool] = []
        self._tokenize = engine.tokenize

    def __call__(self, texts):
        self.entered.set()
        self.released.append(self.release.wait(5))
        return self._tokenize(texts)

    async def wait_entered(self) -> None:
        """Until a call is being held (waited for in a thread, not by polling the loop)."""
        assert await asyncio.get_running_loop().run_in_executor(None, self.entered.wait, 30)
