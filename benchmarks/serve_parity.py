"""Answers of ``clipfast serve``'s app to a fixed set of requests, for comparing two checkouts
byte for byte (the app in-process through httpx's ASGI transport; no socket, no timing).

    /work/wt/venv-main/bin/python benchmarks/serve_parity.py record --artifact ART --out old.json
    python benchmarks/serve_parity.py record --artifact ART --out new.json
    python benchmarks/serve_parity.py compare old.json new.json

Run it from this folder with each checkout's interpreter: it needs only ``create_app`` and
``ServeConfig``, which both have. ``compare`` lists every request whose status, content type or
body differs and exits 1 if any does (``/v1/models``'s ``created`` time is masked).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import sys
from typing import Any

import numpy as np


def _jpeg(seed: int, h: int = 48, w: int = 80) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _url(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def requests(model: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, method path, httpx keyword arguments) of every request compared."""
    a, b = _url(_jpeg(0)), _url(_jpeg(1))
    big = _url(_jpeg(2, 200, 200))  # over max_image_pixels below
    texts = ["a cat", "two dogs on a sofa", "", "日本語のテキスト", "x" * 300]
    post = "POST "
    return [
        ("texts", post + "/v1/embeddings", {"json": {"model": model, "input": texts}}),
        ("text str", post + "/v1/embeddings", {"json": {"model": model, "input": "a cat"}}),
        ("texts base64", post + "/v1/embeddings",
         {"json": {"model": model, "input": texts[:2], "encoding_format": "base64"}}),
        ("texts null format", post + "/v1/embeddings",
         {"json": {"model": model, "input": ["a"], "encoding_format": None}}),
        ("images", post + "/v1/embeddings",
         {"json": {"model": model, "modality": "image", "input": [a, b]}}),
        ("images bad items", post + "/v1/embeddings",
         {"json": {"model": model, "modality": "image", "input": [
             "https://example.com/x.jpg", _url(b"junk"), a, big, "%%%",
             "data:text/plain;base64,aGk=",
             base64.b64encode(_jpeg(3)).decode()]}}),
        ("images all bad", post + "/v1/embeddings",
         {"json": {"model": model, "modality": "image", "input": [_url(b"junk"), "%%"]}}),
        ("wrong model", post + "/v1/embeddings", {"json": {"model": "other", "input": "a"}}),
        ("no model", post + "/v1/embeddings", {"json": {"input": "a"}}),
        ("token ids", post + "/v1/embeddings", {"json": {"model": model, "input": [1, 2, 3]}}),
        ("dimensions", post + "/v1/embeddings",
         {"json": {"model": model, "input": "a", "dimensions": 3}}),
        ("too many items", post + "/v1/embeddings",
         {"json": {"model": model, "input": ["a"] * 9}}),
        ("text too long", post + "/v1/embeddings",
         {"json": {"model": model, "input": ["a" * 2001]}}),
        ("empty input", post + "/v1/embeddings", {"json": {"model": model, "input": []}}),
        ("bad format", post + "/v1/embeddings",
         {"json": {"model": model, "input": "a", "encoding_format": "int8"}}),
        ("not json", post + "/v1/embeddings",
         {"content": b"{nope", "headers": {"content-type": "application/json"}}),
        ("long number", post + "/v1/embeddings",
         {"content": b'{"model": "m", "input": "a", "dimensions": ' + b"9" * 40 + b"}"}),
        ("body too large", post + "/v1/embeddings",
         {"json": {"model": model, "input": ["a" * 1000] * 70}}),
        ("image json", post + "/v1/images/embeddings", {"json": {"input": [a, "%%", b]}}),
        ("image json base64", post + "/v1/images/embeddings",
         {"json": {"input": a, "encoding_format": "base64", "model": model}}),
        ("image multipart", post + "/v1/images/embeddings",
         {"files": [("file", ("a.jpg", _jpeg(4), "image/jpeg")),
                    ("files", ("b.bin", b"junk", "application/octet-stream")),
                    ("files", ("e.jpg", b"", "image/jpeg"))]}),
        ("image multipart model", post + "/v1/images/embeddings",
         {"files": [("file", ("a.jpg", _jpeg(4), "image/jpeg"))], "data": {"model": "x"}}),
        ("classify", post + "/v1/classify",
         {"json": {"input": [a, "%%", b], "labels": ["cat", "dog", "car"]}}),
        ("classify template", post + "/v1/classify",
         {"json": {"input": a, "labels": ["cat", "dog"], "template": "a {} here"}}),
        ("classify bad template", post + "/v1/classify",
         {"json": {"input": a, "labels": ["cat"], "template": "{} {}"}}),
        ("classify no labels", post + "/v1/classify", {"json": {"input": a, "labels": []}}),
        ("classify too many labels", post + "/v1/classify",
         {"json": {"input": a, "labels": [f"l{i}" for i in range(17)]}}),
        ("classify all bad", post + "/v1/classify",
         {"json": {"input": ["%%"], "labels": ["a", "b"]}}),
        ("models", "GET /v1/models", {}),
        ("health", "GET /health", {}),
        ("ready", "GET /ready", {}),
        ("unknown route", "GET /v1/nowhere", {}),
        ("wrong method", "GET /v1/embeddings", {}),
    ]


def record(artifact: str, out: str) -> None:
    import httpx

    import clipfast
    from clipfast.serve.app import create_app
    from clipfast.serve.config import ServeConfig

    config = ServeConfig(max_items=8, max_queue=16, max_labels=16, max_text_chars=2000,
                         max_body_bytes=64 * 1024, max_image_pixels=20_000, max_wait_ms=0.0,
                         model_name="m", decode_threads=2)
    engine = clipfast.Engine(artifact, backend="onnxruntime", batch_size=32)
    app = create_app(engine, config)

    async def main() -> list[dict[str, Any]]:
        answers = []
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            for name, line, kw in requests("m"):
                method, path = line.split(" ", 1)
                r = await c.request(method, path, **kw)
                body = r.text
                if path == "/v1/models":
                    payload = r.json()
                    payload["data"][0]["created"] = 0
                    body = json.dumps(payload, separators=(",", ":"))
                answers.append({"name": name, "status": r.status_code, "body": body,
                                "content_type": r.headers.get("content-type"),
                                "retry_after": r.headers.get("retry-after")})
        return answers

    answers = asyncio.run(main())
    with open(out, "w") as f:
        json.dump({"python": sys.executable, "clipfast": clipfast.__file__,
                   "answers": answers}, f, indent=1)
    print(f"{len(answers)} answers -> {out}")


def compare(a_path: str, b_path: str) -> int:
    a, b = (json.load(open(p))["answers"] for p in (a_path, b_path))
    differ = 0
    for x, y in zip(a, b, strict=True):
        same = all(x[k] == y[k] for k in ("status", "body", "content_type", "retry_after"))
        differ += not same
        print(f"{'same  ' if same else 'DIFFER'} {x['status']:>3} {x['name']}")
        if not same:
            print(f"   old: {x['status']} {x['body'][:400]}\n   new: {y['status']} "
                  f"{y['body'][:400]}")
    print(f"{len(a) - differ} of {len(a)} answers byte-identical")
    return 1 if differ else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--artifact", required=True)
    r.add_argument("--out", required=True)
    c = sub.add_parser("compare")
    c.add_argument("old")
    c.add_argument("new")
    args = p.parse_args()
    if args.cmd == "record":
        record(args.artifact, args.out)
        return 0
    return compare(args.old, args.new)


if __name__ == "__main__":
    sys.exit(main())
