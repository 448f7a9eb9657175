"""The OpenAI-shaped request and response bodies of the serving API, and how a raw body becomes
a request model.

Routes read the raw body (the guard middleware has capped its size and deadline) and parse it
here: its JSON values are counted before pydantic sees it (``check_json``), then pydantic
validates it straight from the bytes. So that the OpenAPI schema still shows each request body,
routes declare it with ``request_body(Model)`` (``openapi_extra``).
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from clipfast.serve.errors import ApiError
from clipfast.serve.inputs import check_json
from clipfast.types import Failure


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request; ``modality`` is infinity's extension (``"image"``: each
    input is a ``data:image/...;base64,...`` URL or bare base64)."""

    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = "float"  # null: float
    dimensions: int | None = None
    user: str | None = None
    modality: Literal["text", "image"] = "text"


class ImageEmbeddingRequest(BaseModel):
    """Images as JSON: each input a data URL or bare base64 (multipart uploads also work)."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: str | list[str]
    encoding_format: Literal["float", "base64"] | None = "float"  # null: float


class ClassifyRequest(BaseModel):
    """Zero-shot classification: images (data URLs or base64), labels and a literal template
    with one ``{}`` (default: the model's own)."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: str | list[str]
    labels: list[str]
    template: str | None = None


_MULTIPART_IMAGES = {"type": "object", "properties": {
    "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
    "model": {"type": "string"},
    "encoding_format": {"type": "string", "enum": ["float", "base64"]}}}


def request_body(model: type[BaseModel], *, multipart: bool = False) -> dict[str, Any]:
    """``openapi_extra`` declaring ``model`` as the route's JSON body (and, with ``multipart``,
    image uploads) for a route that parses its raw body itself."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)  # the request models nest none
    content: dict[str, Any] = {"application/json": {"schema": schema}}
    if multipart:
        content["multipart/form-data"] = {"schema": _MULTIPART_IMAGES}
    return {"requestBody": {"required": True, "content": content}}


def parse(model: type[BaseModel], body: bytes, max_values: int) -> BaseModel:
    """The body as ``model``: values counted first (LimitExceeded past ``max_values``), then
    parsed and validated by pydantic straight from the bytes (422 ``invalid_json`` for a body
    that is not JSON; ValidationError for one of the wrong shape)."""
    check_json(body, max_values)
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        bad = [err for err in e.errors() if err.get("type") == "json_invalid"]
        if bad:
            raise ApiError(422, f"the body is not valid JSON ({bad[0].get('msg')})",
                           code="invalid_json", kind="invalid") from None
        raise


def as_list(value: str | list) -> list:
    """A request's ``input``: one item or a list of them."""
    return [value] if isinstance(value, str) else list(value)


def encode_rows(emb: np.ndarray, indices: list[int], fmt: str) -> list[dict[str, Any]]:
    """OpenAI's ``data``: one embedding object per row, at its request index; ``base64`` is the
    little-endian float32 bytes."""
    data = []
    for row, i in zip(emb, indices):
        value = (base64.b64encode(np.ascontiguousarray(row, dtype="<f4").tobytes()).decode()
                 if fmt == "base64" else row.tolist())
        data.append({"object": "embedding", "index": int(i), "embedding": value})
    return data


def item_errors(failures: list[Failure]) -> list[dict[str, Any]]:
    """The ``errors`` list of a response with bad items: each one's request index and why."""
    return [{"index": f.index, "message": f.error} for f in failures]


def embedding_list(emb: np.ndarray, indices: list[int], failures: list[Failure], fmt: str,
                   n_tokens: int, model: str) -> dict[str, Any]:
    """The embeddings response; 422 ``bad_items`` when no item could be embedded."""
    if not indices and failures:
        raise ApiError(422, "no input could be embedded: " + "; ".join(
            f.error for f in failures[:5]), code="bad_items", kind="bad_item")
    payload: dict[str, Any] = {"object": "list", "data": encode_rows(emb, indices, fmt),
                               "model": model,
                               "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}
    if failures:
        payload["errors"] = item_errors(failures)
    return payload
