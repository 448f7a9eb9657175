"""Ray Serve: online embedding past one machine, one Engine per replica, requests from many
callers merged into tower batches by ``@serve.batch``.

    from ray import serve
    from clipfast.ray import build_app

    handle = serve.run(build_app("artifacts/vit-b-32", num_replicas=2, max_batch=32),
                       route_prefix="/v1/embeddings")
    handle.embed_texts.remote(["a cat", "a dog"]).result()     # float32 (2, D)

Over HTTP the route speaks the OpenAI embeddings schema of ``clipfast serve`` (texts, or inline
images with ``"modality": "image"``: infinity's convention, data URLs or bare base64; URLs are
never fetched). Results equal ``Engine.encode_texts`` / ``encode_images`` on the same inputs.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import numpy as np
from ray import serve

from clipfast.errors import InputError
from clipfast.serve.inputs import BadItem, check_items, decode_inline
from clipfast.types import Failure

__all__ = ["ClipfastDeployment", "build_app"]


@serve.deployment(name="clipfast")
class ClipfastDeployment:
    """One replica: an Engine and a ``@serve.batch`` queue per tower.

    max_batch / max_wait_ms: the batch queues' size and wait (``set_max_batch_size`` /
    ``set_batch_wait_timeout_s`` on the batched methods). max_items: most inputs per call.
    """

    def __init__(self, artifact: str, *, max_batch: int = 32, max_wait_ms: float = 5.0,
                 max_items: int = 64, backend: str = "auto", device: str | None = None,
                 threads: int | None = None, model_name: str | None = None):
        from pathlib import Path

        import clipfast

        self.engine = clipfast.Engine(artifact, backend=backend, device=device, threads=threads,
                                      batch_size=max(32, max_batch))
        self.model_name = model_name or Path(str(artifact)).name
        self.max_items = max_items
        for method in (self._text_batch, self._image_batch):
            method.set_max_batch_size(max_batch)
            method.set_batch_wait_timeout_s(max_wait_ms / 1000.0)
        self.batch_sizes: list[tuple[str, int]] = []

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _text_batch(self, texts: list[str]) -> list[np.ndarray]:
        self.batch_sizes.append(("text", len(texts)))
        emb = await asyncio.to_thread(self.engine.encode_texts, texts)
        return list(emb)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _image_batch(self, images: list[bytes]) -> list[np.ndarray | str]:
        self.batch_sizes.append(("image", len(images)))
        res = await asyncio.to_thread(self.engine.encode_images, images, errors="skip")
        out: list[np.ndarray | str] = [""] * len(images)
        for row, i in zip(res.embeddings, res.indices):
            out[int(i)] = row
        for f in res.failures:
            out[f.index] = f.error
        return out

    async def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Strings -> float32 ``(N, D)``, L2-normalised."""
        texts = list(texts)
        check_items(len(texts), self.max_items, "texts")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise InputError(f"texts[{bad[0]}]: expected str, got {type(texts[bad[0]]).__name__}")
        rows = await asyncio.gather(*(self._text_batch(t) for t in texts))
        return np.stack(rows).astype(np.float32, copy=False)

    async def embed_images(self, images: list[bytes]) -> tuple[np.ndarray, list[int],
                                                                  list[Failure]]:
        """Encoded images -> (float32 ``(M, D)`` for the M good ones, their indices, one
        Failure per bad one: the others are still embedded)."""
        images = list(images)
        check_items(len(images), self.max_items, "images")
        rows = await asyncio.gather(*(self._image_batch(bytes(b)) for b in images))
        good = [(i, r) for i, r in enumerate(rows) if not isinstance(r, str)]
        failures = [Failure(i, "", r.replace("image 0 ", f"image {i} ", 1))
                    for i, r in enumerate(rows) if isinstance(r, str)]
        emb = (np.stack([r for _, r in good]).astype(np.float32, copy=False) if good
               else np.zeros((0, self.engine.embed_dim), np.float32))
        return emb, [i for i, _ in good], failures

    async def __call__(self, request: Any) -> Any:
        """POST an OpenAI embeddings request (``input``, ``encoding_format``, ``modality``)."""
        from starlette.responses import JSONResponse

        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise InputError("the body must be a JSON object")
            model = body.get("model")
            if model is not None and model != self.model_name:
                return JSONResponse({"error": {"message": f"model {model!r} is not served here "
                                               f"({self.model_name!r})", "code":
                                               "model_not_found"}}, status_code=404)
            items = body.get("input")
            items = [items] if isinstance(items, str) else items
            if not isinstance(items, list):
                raise InputError("input: expected a string or a list of strings")
            fmt = body.get("encoding_format") or "float"
            if fmt not in ("float", "base64"):
                raise InputError(f"encoding_format={fmt!r}: expected float or base64")
            failures: list[Failure] = []
            if body.get("modality", "text") == "image":
                check_items(len(items), self.max_items)
                datas, where = [], []
                for i, item in enumerate(items):
                    try:
                        datas.append(decode_inline(item, i))
                        where.append(i)
                    except BadItem as e:
                        failures.append(Failure(i, e.item or "", str(e)))
                emb, idx, fails = (await self.embed_images(datas) if datas
                                   else (np.zeros((0, 0), np.float32), [], []))
                indices = [where[i] for i in idx]
                failures += [Failure(where[f.index], f.item, f.error) for f in fails]
            else:
                emb = await self.embed_texts(items)
                indices = list(range(len(items)))
        except InputError as e:
            status = getattr(e, "status", 422)
            return JSONResponse({"error": {"message": str(e), "type": "invalid_request_error",
                                           "code": getattr(e, "limit", "invalid_request")}},
                                status_code=status)
        data = []
        for row, i in zip(emb, indices):
            value = (base64.b64encode(np.ascontiguousarray(row, "<f4").tobytes()).decode()
                     if fmt == "base64" else row.tolist())
            data.append({"object": "embedding", "index": i, "embedding": value})
        payload: dict[str, Any] = {"object": "list", "data": data, "model": self.model_name,
                                   "usage": {"prompt_tokens": 0, "total_tokens": 0}}
        if failures:
            payload["errors"] = [{"index": f.index, "message": f.error}
                                 for f in sorted(failures, key=lambda f: f.index)]
        return JSONResponse(payload, status_code=200 if data or not failures else 422)

    def stats(self) -> dict[str, Any]:
        """Batch sizes run so far per tower (for tests and tuning)."""
        out: dict[str, list[int]] = {"text": [], "image": []}
        for tower, n in self.batch_sizes:
            out[tower].append(n)
        return out


def build_app(artifact: str, *, num_replicas: int = 1, max_batch: int = 32,
              max_wait_ms: float = 5.0, max_items: int = 64,
              max_ongoing_requests: int | None = None,
              ray_actor_options: dict[str, Any] | None = None, **engine_options: Any):
    """The bound deployment for ``serve.run``. ``engine_options``: backend, device, threads,
    model_name. ``max_ongoing_requests`` (default ``2 * max_batch``) bounds each replica's
    queue; past it Ray Serve queues at the proxy and rejects past its own limits."""
    return ClipfastDeployment.options(
        num_replicas=num_replicas,
        max_ongoing_requests=max_ongoing_requests or 2 * max_batch,
        ray_actor_options=ray_actor_options or {"num_cpus": 1},
    ).bind(str(artifact), max_batch=max_batch, max_wait_ms=max_wait_ms, max_items=max_items,
           **engine_options)
