"""The serving core, independent of any transport: embed texts and images, classify, describe
the model, count usage, batch through one ``TowerBatcher`` per tower. The ASGI app
(``clipfast.serve.app``) and the Ray Serve deployment (``clipfast.ray.serve``) both wrap it;
tests call it directly.

Each endpoint is two steps: ``prepare_*`` (sync, sized by the client: limits checked, images
decoded from base64, texts tokenized; run off the event loop by the caller) and the coroutine
that embeds and returns the response body as a dict. Errors are raised as ``ApiError`` or a
clipfast ``InputError``; ``clipfast.serve.errors.to_api_error`` turns either into its answer.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from clipfast.artifact.fidelity import l2_normalize
from clipfast.errors import InputError
from clipfast.inputs.pipeline import PreparedImages
from clipfast.serve.batcher import Overloaded, TowerBatcher
from clipfast.serve.config import ServeConfig
from clipfast.serve.errors import ApiError
from clipfast.serve.inputs import (
    BadItem,
    LimitExceeded,
    check_items,
    check_template,
    check_texts,
    decode_inline,
    fill_template,
    preprocess_one,
    token_count,
    token_rows,
)
from clipfast.serve.metrics import Metrics
from clipfast.serve.protocol import ConnectionGuard
from clipfast.serve.schemas import (
    ClassifyRequest,
    EmbeddingRequest,
    ImageEmbeddingRequest,
    as_list,
    embedding_list,
    item_errors,
)
from clipfast.types import Failure

ROUTES = frozenset({"/v1/embeddings", "/v1/images/embeddings", "/v1/classify", "/v1/models",
                    "/metrics", "/health", "/ready"})
_LABEL_CACHE = 4096  # prompt embeddings kept for /v1/classify


def load_engine(artifact: str, *, backend: str = "auto", device: str | None = None,
                threads: int | None = None, config: ServeConfig | None = None) -> Any:
    """The Engine a server (``clipfast serve`` or a Ray Serve replica) runs ``artifact`` on."""
    import clipfast

    config = config or ServeConfig()
    # One server batch is one tower call: the Engine chunks at its batch size.
    return clipfast.Engine(artifact, backend=backend, device=device, threads=threads,
                           batch_size=max(32, config.max_batch))


class Service:
    """The state behind the routes: the engine, the batchers, the pools, the metrics."""

    def __init__(self, engine: Any, config: ServeConfig):
        self.engine = engine
        self.config = config
        self.model_name = config.model_name or Path(str(engine.manifest.directory)).name
        self.metrics = Metrics()
        self.created = int(time.time())
        self.draining = False
        self.started = False
        self.connections = ConnectionGuard(max_connections=config.max_connections,
                                           max_per_client=config.max_connections_per_client,
                                           header_timeout_s=config.header_timeout_s)
        # Most JSON values a request may hold: its items and labels, a few per item, the rest.
        self.max_json_values = 4 * (config.max_items + config.max_labels) + 256
        self.buffered = 0  # bytes of request bodies held now (--max-buffered-bytes)
        threads = config.decode_threads or os.cpu_count() or 1
        self.decode_pool = ThreadPoolExecutor(max_workers=threads,
                                              thread_name_prefix="clipfast-decode")
        # On the CPU both towers share the cores: one tower call at a time gets them all. On a
        # GPU the towers' calls may overlap.
        tower_threads = 2 if getattr(engine, "backend_device", "cpu") == "cuda" else 1
        self.tower_pool = ThreadPoolExecutor(max_workers=tower_threads,
                                             thread_name_prefix="clipfast-tower")
        # Tower calls per batch size: at most max_batch keys per tower, however long it runs.
        self.batch_sizes: dict[str, collections.Counter[int]] = {
            "text": collections.Counter(), "image": collections.Counter()}
        wait = config.max_wait_ms / 1000.0
        self.batchers = {
            tower: TowerBatcher(tower, run, max_batch=config.max_batch, max_wait_s=wait,
                                max_queue=config.max_queue, executor=self.tower_pool,
                                deadline_s=0.8 * config.request_timeout_s,
                                on_batch=self._batch_observer(tower),
                                on_depth=self.metrics.depth_observer(tower))
            for tower, run in (("text", self._run_text), ("image", self._run_image))
        }
        self._label_cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        # Paths with their own metrics label and listed in a 404's message; mounted routes
        # (the search routes) add theirs. ``param_routes``: prefixes of routes that end in one
        # path parameter (``prefix/{id}``), labelled by the prefix.
        self.routes: set[str] = set(ROUTES)
        self.param_routes: set[str] = set()
        self._pad_id = int(engine.manifest.spec.tokenizer.pad_id)

    def _batch_observer(self, tower: str):
        metrics, counts = self.metrics.batch_observer(tower), self.batch_sizes[tower]

        def observe(n: int, seconds: float) -> None:
            metrics(n, seconds)
            counts[n] += 1
        return observe

    # Tower calls, in the tower thread: exactly Engine.encode_texts / encode_images per row.
    def _run_text(self, rows: list[dict[str, np.ndarray]]) -> np.ndarray:
        tokens = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        return l2_normalize(self.engine.run_text_tower(tokens))

    def _run_image(self, rows: list[PreparedImages]) -> np.ndarray:
        # the Engine joins the prepared images (host arrays or device tensors) and normalises
        return self.engine.embed_prepared(rows).embeddings

    async def close(self) -> None:
        for b in self.batchers.values():
            await b.close()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.tower_pool.shutdown(wait=False, cancel_futures=True)

    # -- helpers ----------------------------------------------------------------------------
    def endpoint(self, path: str) -> str:
        """The metrics label of ``path``: its route, or "other" (bounded cardinality)."""
        if path in self.routes:
            return path
        head = path.rpartition("/")[0]
        return head if head in self.param_routes else "other"

    def route_names(self) -> list[str]:
        return sorted(self.routes | {p + "/{id}" for p in self.param_routes})

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"model {model!r} is not served here; this server serves "
                           f"{self.model_name!r} (GET /v1/models)", code="model_not_found",
                           kind="invalid", param="model")

    def reserve(self, tower: str, n: int):
        try:
            return self.batchers[tower].reserve(n)
        except Overloaded as e:
            raise ApiError(503, str(e), code="overloaded", kind="overloaded",
                           headers={"Retry-After": str(e.retry_after)}) from None

    async def with_timeout(self, coro):
        try:
            return await asyncio.wait_for(coro, self.config.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, f"the request took longer than {self.config.request_timeout_s:g}"
                           " s (--request-timeout-s)", code="request_timeout",
                           kind="timeout") from None

    async def in_pool(self, fn, *args):
        """``fn(*args)`` in the decode pool, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, fn, *args)

    def count_bad(self, endpoint: str, failures: list[Failure]) -> None:
        if failures:
            self.metrics.errors.labels(endpoint, "bad_item").inc(len(failures))

    # -- images to pixels -------------------------------------------------------------------
    def prepare_image(self, data: bytes, index: int) -> PreparedImages | Failure:
        """Encoded bytes of the request's item ``index`` -> the image prepared by the Engine's
        input pipeline (on the device where the Engine preprocesses there), or that item's
        Failure (over ``--max-image-pixels``, or not decodable), its message naming ``index``.
        Runs in a decode thread.

        The only place the server turns bytes into pixels: the Engine's own loading policy
        and preprocessing, one item at a time so that a request's items decode in parallel
        across the pool and each is batched as soon as the request's last one is ready."""
        return preprocess_one(self.engine, data, index, self.config.max_image_pixels)

    @staticmethod
    def inline_images(items: list, offset: int = 0) -> list[bytes | Failure]:
        """Each item (data URL or bare base64) as its bytes, or its Failure at request index
        ``offset + position``."""
        out: list[bytes | Failure] = []
        for i, item in enumerate(items, start=offset):
            try:
                out.append(decode_inline(item, i))
            except BadItem as e:
                out.append(Failure(i, e.item or "", str(e)))
        return out

    # -- the towers ---------------------------------------------------------------------------
    async def embed_texts(self, texts: list[str], tokens: dict[str, np.ndarray] | None = None
                          ) -> tuple[np.ndarray, int]:
        """Texts -> (normalised (N, D), prompt tokens); tokenized in the decode pool unless
        ``tokens`` (``engine.tokenize(texts)``, done off the loop already) are given."""
        with self.reserve("text", len(texts)):
            if tokens is None:
                tokens = await self.in_pool(self.engine.tokenize, texts)
            emb = await self.batchers["text"].submit(token_rows(tokens))
        return emb, token_count(tokens, self._pad_id)

    async def embed_images(self, datas: list[bytes | Failure]
                           ) -> tuple[np.ndarray, list[int], list[Failure]]:
        """Encoded images (or an item's Failure already) -> (rows for the good ones, their
        indices, failures). Decoding runs in the decode pool."""
        with self.reserve("image", len(datas)):
            loop = asyncio.get_running_loop()
            futures = [None if isinstance(d, Failure) else
                       loop.run_in_executor(self.decode_pool, self.prepare_image, d, i)
                       for i, d in enumerate(datas)]
            try:
                done = [d if f is None else await f for d, f in zip(datas, futures)]
            except BaseException:
                for f in futures:
                    if f is not None:
                        f.cancel()
                raise
            good = [(i, x) for i, x in enumerate(done) if not isinstance(x, Failure)]
            failures = [x for x in done if isinstance(x, Failure)]
            if not good:
                return np.zeros((0, self.engine.embed_dim), np.float32), [], failures
            emb = await self.batchers["image"].submit([x for _, x in good])
        return emb, [i for i, _ in good], failures

    async def prompt_embeddings(self, prompts: list[str]) -> np.ndarray:
        """Normalised embeddings of the prompts, from the cache or embedded in chunks that each
        fit the queue (a label set may be larger than --max-items)."""
        # Rows are taken from the cache before any await: a concurrent request may evict them.
        rows = {p: self._label_cache[p] for p in prompts if p in self._label_cache}
        for p in rows:
            self._label_cache.move_to_end(p)
        missing = [p for p in dict.fromkeys(prompts) if p not in rows]
        step = min(self.config.max_items, self.config.max_queue)
        for s in range(0, len(missing), step):
            part = missing[s:s + step]
            emb, _ = await self.embed_texts(part)
            for p, row in zip(part, emb):
                rows[p] = row
                self._label_cache[p] = row
                while len(self._label_cache) > _LABEL_CACHE:
                    self._label_cache.popitem(last=False)
        return np.stack([rows[p] for p in prompts])

    def probabilities(self, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
        """What Engine.classify returns for these embeddings."""
        return self.engine.manifest.spec.logits.probabilities(
            self.engine.logits(image_emb, text_emb))

    # -- endpoints: prepare (off the loop), then answer ---------------------------------------
    def prepare_embeddings(self, req: EmbeddingRequest
                           ) -> tuple[list[bytes | Failure] | None, dict | None]:
        """The limits, then the images decoded from base64 or the texts tokenized: (images,
        None), (None, tokens), or (None, None) for token ids (refused by ``embeddings``)."""
        items = as_list(req.input)
        check_items(len(items), self.config.max_items)
        if req.modality == "image":
            return self.inline_images(items), None
        if all(isinstance(t, str) for t in items):
            check_texts(items, self.config.max_text_chars)
            return None, self.engine.tokenize(items)
        return None, None

    async def embeddings(self, req: EmbeddingRequest,
                         prepared: tuple[list | None, dict | None] | None = None
                         ) -> dict[str, Any]:
        """POST /v1/embeddings: texts, or with ``"modality": "image"`` inline images.
        ``prepared``: ``prepare_embeddings(req)`` if the caller ran it already."""
        if prepared is None:
            prepared = await self.in_pool(self.prepare_embeddings, req)
        datas, tokens = prepared
        self.check_model(req.model)
        dim = self.engine.embed_dim
        if req.dimensions is not None and req.dimensions != dim:
            raise ApiError(422, f"dimensions={req.dimensions}: this model's embeddings have "
                           f"{dim} (CLIP embeddings are not truncated)",
                           code="invalid_dimensions", kind="invalid", param="dimensions")
        items = as_list(req.input)
        check_items(len(items), self.config.max_items)
        fmt = req.encoding_format or "float"
        if req.modality == "image":
            emb, idx, failures = await self.with_timeout(self.embed_images(datas))
            self.count_bad("/v1/embeddings", failures)
            return embedding_list(emb, idx, failures, fmt, 0, self.model_name)
        if not all(isinstance(t, str) for t in items):
            raise ApiError(422, "input: token ids are not accepted; send strings (the server "
                           "tokenizes with the model's own tokenizer)", code="invalid_input",
                           kind="invalid", param="input")
        emb, n_tokens = await self.with_timeout(self.embed_texts(items, tokens))
        return embedding_list(emb, list(range(len(items))), [], fmt, n_tokens, self.model_name)

    def prepare_image_request(self, req: ImageEmbeddingRequest) -> list[bytes | Failure]:
        items = as_list(req.input)
        check_items(len(items), self.config.max_items)
        return self.inline_images(items)

    async def image_embeddings(self, datas: list[bytes | Failure], fmt: str = "float",
                               model: str | None = None) -> dict[str, Any]:
        """POST /v1/images/embeddings, once the images are bytes (multipart uploads or
        ``prepare_image_request``): the embeddings of the good ones, ``errors`` for the rest."""
        self.check_model(model)
        emb, idx, failures = await self.with_timeout(self.embed_images(datas))
        self.count_bad("/v1/images/embeddings", failures)
        return embedding_list(emb, idx, failures, fmt, 0, self.model_name)

    def prepare_classify(self, req: ClassifyRequest) -> tuple[list[str], list[bytes | Failure]]:
        """The limits and the template, then (prompts, images as bytes or Failures)."""
        check_items(len(as_list(req.input)), self.config.max_items)
        if not req.labels:
            raise ApiError(422, "labels: at least one label is needed",
                           code="invalid_request", kind="invalid", param="labels")
        if len(req.labels) > self.config.max_labels:
            raise LimitExceeded(f"labels: {len(req.labels)}, more than the limit of "
                                f"{self.config.max_labels} per request (--max-labels)",
                                limit="max_labels", status=413)
        check_texts(req.labels, self.config.max_text_chars, "labels")
        template = req.template if req.template is not None else self.engine.prompt_template
        try:
            check_template(template)
        except LimitExceeded:
            raise
        except InputError as e:
            raise ApiError(422, str(e), code="invalid_template", kind="invalid",
                           param="template") from None
        prompts = [fill_template(template, label) for label in req.labels]
        return prompts, self.inline_images(as_list(req.input))

    async def classify(self, req: ClassifyRequest,
                       prepared: tuple[list[str], list[bytes | Failure]] | None = None
                       ) -> dict[str, Any]:
        """POST /v1/classify: per image the probability of each label (softmax, or sigmoid for
        SigLIP) and the likeliest label."""
        if prepared is None:
            prepared = await self.in_pool(self.prepare_classify, req)
        prompts, datas = prepared
        self.check_model(req.model)

        async def both():
            text = await self.prompt_embeddings(prompts)
            emb, idx, failures = await self.embed_images(datas)
            return text, emb, idx, failures

        text, emb, idx, failures = await self.with_timeout(both())
        self.count_bad("/v1/classify", failures)
        if not idx:
            raise ApiError(422, "no image could be read: " + "; ".join(
                f.error for f in failures[:5]), code="bad_items", kind="bad_item")
        probs = self.probabilities(emb, text)
        data = [{"object": "classification", "index": int(i),
                 "label": req.labels[int(np.argmax(p))], "scores": p.tolist()}
                for i, p in zip(idx, probs)]
        payload: dict[str, Any] = {"object": "list", "data": data, "labels": req.labels,
                                   "model": self.model_name}
        if failures:
            payload["errors"] = item_errors(failures)
        return payload

    def models(self) -> dict[str, Any]:
        """GET /v1/models: the one model served, with what it is and where it runs."""
        engine = self.engine
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created,
            "owned_by": "clipfast", "embed_dim": engine.embed_dim,
            "family": engine.manifest.spec.family, "precision": engine.manifest.spec.precision,
            "backend": engine.backend, "device": engine.backend_device,
            "modalities": ["text", "image"]}]}

    def ready(self) -> tuple[dict[str, Any], int]:
        """GET /ready: (body, status): 503 while starting or draining, else the queues."""
        if self.draining or not self.started:
            return {"status": "draining" if self.draining else "starting"}, 503
        return {"status": "ready", "queue": {
            t: {"queued": b.queued, "admitted": b.admitted, "max_queue": b.max_queue}
            for t, b in self.batchers.items()}}, 200

    def stats(self) -> dict[str, dict[int, int]]:
        """Tower calls so far per tower and batch size (bounded: one key per size)."""
        return {tower: dict(sorted(c.items())) for tower, c in self.batch_sizes.items()}
