"""Ray Serve: online embedding past one machine, one Engine per replica, each replica running
the same serving core as ``clipfast serve`` (``clipfast.serve.service.Service`` behind the same
ASGI app): the same routes, request limits, error bodies, ``usage`` counts and batching (one
``TowerBatcher`` per tower merges the rows of a replica's concurrent requests).

    from ray import serve
    from clipfast.ray import build_app

    handle = serve.run(build_app("artifacts/vit-b-32", num_replicas=2, max_batch=32),
                       route_prefix="/")
    handle.embed_texts.remote(["a cat", "a dog"]).result()     # float32 (2, D)

Over HTTP the replica answers what ``clipfast serve`` answers: POST /v1/embeddings (OpenAI
schema; inline images with ``"modality": "image"``, data URLs or bare base64, URLs never
fetched), /v1/images/embeddings, /v1/classify; GET /v1/models, /health, /ready, /metrics.
Results equal ``Engine.encode_texts`` / ``encode_images`` on the same inputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from ray import serve

from clipfast.errors import InputError
from clipfast.serve.config import ServeConfig
from clipfast.serve.inputs import check_items, check_texts
from clipfast.types import Failure

__all__ = ["ClipfastDeployment", "build_app"]


@serve.deployment(name="clipfast")
class ClipfastDeployment:
    """One replica: an Engine and the serving core's ASGI app over it, configured by the same
    ``ServeConfig`` as ``clipfast serve`` (its host, port, workers and connection limits are the
    Ray Serve proxy's business and unused here)."""

    def __init__(self, artifact: str, config: ServeConfig | None = None, *,
                 backend: str = "auto", device: str | None = None,
                 threads: int | None = None):
        from clipfast.serve.app import create_app
        from clipfast.serve.service import load_engine

        config = config or ServeConfig()
        engine = load_engine(str(artifact), backend=backend, device=device, threads=threads,
                             config=config)
        self.app = create_app(engine, config)
        self.service = self.app.state.service
        # Ray Serve runs no ASGI lifespan: the replica is ready once it is constructed.
        self.service.started = True

    async def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Strings -> float32 ``(N, D)``, L2-normalised."""
        texts = list(texts)
        check_items(len(texts), self.service.config.max_items, "texts")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise InputError(f"texts[{bad[0]}]: expected str, got {type(texts[bad[0]]).__name__}")
        check_texts(texts, self.service.config.max_text_chars, "texts")
        emb, _ = await self.service.with_timeout(self.service.embed_texts(texts))
        return emb

    async def embed_images(self, images: list[bytes]) -> tuple[np.ndarray, list[int],
                                                                  list[Failure]]:
        """Encoded images -> (float32 ``(M, D)`` for the M good ones, their indices, one
        Failure per bad one, at its index: the others are still embedded)."""
        datas: list[bytes | Failure] = [bytes(b) for b in images]
        check_items(len(datas), self.service.config.max_items, "images")
        return await self.service.with_timeout(self.service.embed_images(datas))

    async def __call__(self, request: Any) -> Any:
        """An HTTP request, answered by the serving core's ASGI app."""
        from starlette.responses import Response

        scope = dict(request.scope)
        # The app's routes are absolute: serve them whatever the route prefix.
        root = scope.get("root_path", "")
        if root and not scope["path"].startswith(root):
            scope["path"] = root + scope["path"]
        scope["root_path"] = ""
        start: dict[str, Any] = {}
        body: list[bytes] = []

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                body.append(message.get("body", b""))

        await self.app(scope, request.receive, send)
        response = Response(b"".join(body), status_code=start.get("status", 500))
        response.raw_headers = [(k, v) for k, v in start.get("headers", [])]
        return response

    def stats(self) -> dict[str, dict[int, int]]:
        """Tower calls so far per tower and batch size (bounded: one key per size)."""
        return self.service.stats()


def build_app(artifact: str, config: ServeConfig | None = None, *, num_replicas: int = 1,
              max_ongoing_requests: int | None = None,
              ray_actor_options: dict[str, Any] | None = None, backend: str = "auto",
              device: str | None = None, threads: int | None = None, **settings: Any):
    """The bound deployment for ``serve.run``. ``config`` (default ``ServeConfig()``) with
    ``settings`` replacing its fields (``max_batch=16, model_name="m"``: the names of
    ``clipfast serve``'s flags). ``max_ongoing_requests`` (default ``2 * max_batch``) bounds
    each replica's queue; past it Ray Serve queues at the proxy and rejects past its own
    limits."""
    names = {f.name for f in dataclasses.fields(ServeConfig)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise InputError(f"build_app: unknown setting(s) {', '.join(unknown)}; the settings are "
                         f"ServeConfig's fields: {', '.join(sorted(names))}")
    config = dataclasses.replace(config or ServeConfig(), **settings)
    return ClipfastDeployment.options(
        num_replicas=num_replicas,
        max_ongoing_requests=max_ongoing_requests or 2 * config.max_batch,
        ray_actor_options=ray_actor_options or {"num_cpus": 1},
    ).bind(str(artifact), config, backend=backend, device=device, threads=threads)
