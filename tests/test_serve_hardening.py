"""clipfast serve against hostile clients (stand-in engine, no model): every client error is a 4xx
with the OpenAI-shaped body; nothing client-sized runs on the event loop; templates are literal;
the pixel limit fails its item; and, on a real loopback server with raw sockets, slow clients
are cut by deadlines and per-address caps while /health keeps answering; startup refuses a
blank-padded API key and a port in use before loading anything."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")

from test_serve_support import (  # noqa: E402
    ERROR_KEYS,
    HeldTokenizer,
    StubEngine,
    ThreadServer,
    assert_client_error,
    data_url,
    jpeg,
    run_asgi,
)

from clipfast.serve.app import create_app  # noqa: E402
from clipfast.serve.config import ServeConfig  # noqa: E402


def _cfg(**kw) -> ServeConfig:
    opts = {"max_items": 4, "max_queue": 8, "max_body_bytes": 4_000_000,
            "max_image_pixels": 10_000, "max_wait_ms": 0.0, "max_labels": 16,
            "max_text_chars": 1000}
    opts.update(kw)
    return ServeConfig(**opts)






def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "XyZ") -> bytes:
    out = []
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out.append(f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data
                   + b"\r\n")
    return b"".join(out) + f"--{boundary}--\r\n".encode()


# Each case: (what, method, path, body bytes, content type, expected status or None for any 4xx)
_IMG = data_url(jpeg(np.zeros((8, 8, 3), np.uint8)))
CASES = [
    ("JSON nested 10,000 deep", "/v1/embeddings", b"[" * 10_000 + b"]" * 10_000,
     "application/json", None),
    ("JSON nested 10,000 deep in a field", "/v1/embeddings",
     b'{"model":"stub-model","input":"a","x":' + b"[" * 10_000 + b"]" * 10_000 + b"}",
     "application/json", None),
    ("5,000-digit integer", "/v1/embeddings",
     b'{"model":"stub-model","input":"a","dimensions":' + b"7" * 5000 + b"}",
     "application/json", 422),
    ("5,000-digit integer in an extra field", "/v1/classify",
     b'{"input":["x"],"labels":["a"],"n":' + b"9" * 5000 + b"}", "application/json", 422),
    ("a body of 500,000 integers", "/v1/embeddings",
     b'{"model":"stub-model","input":[' + b"1," * 499_999 + b"1]}", "application/json", 413),
    ("invalid JSON", "/v1/embeddings", b"{not json", "application/json", 422),
    ("invalid UTF-8", "/v1/embeddings", b'{"model":"stub-model","input":"\xff\xfe"}',
     "application/json", 422),
    ("a JSON array", "/v1/embeddings", b"[]", "application/json", 422),
    ("JSON null", "/v1/classify", b"null", "application/json", 422),
    ("text over --max-text-chars", "/v1/embeddings",
     json.dumps({"model": "stub-model", "input": ["b" * 1001]}).encode(), "application/json",
     413),
    ("label over --max-text-chars", "/v1/classify",
     json.dumps({"input": [_IMG], "labels": ["b" * 1001]}).encode(), "application/json", 413),
    ("token ids", "/v1/embeddings", b'{"model":"stub-model","input":[[1,2],[3]]}',
     "application/json", 422),
    ("multipart with 100 files", "/v1/images/embeddings",
     _multipart([("files", f"{i}.jpg", b"x") for i in range(100)]),
     "multipart/form-data; boundary=XyZ", None),
    ("multipart with 200 fields", "/v1/images/embeddings",
     _multipart([(f"f{i}", None, b"v") for i in range(200)]),
     "multipart/form-data; boundary=XyZ", None),
    ("multipart without a boundary", "/v1/images/embeddings",
     _multipart([("files", "a.jpg", b"x")]), "multipart/form-data", None),
    ("multipart with a wrong boundary", "/v1/images/embeddings",
     _multipart([("files", "a.jpg", b"x")]), "multipart/form-data; boundary=other", None),
]
TEMPLATES = ["{.__class__.__mro__}{{}}", "{:>20000000}{{}}", "{} {0}", "{0}", "{} and {}",
             "{.x}", "{:>9}", "no slot", "{}}", "{{}", "{!r}", "x" * 1001 + "{}"]
for _t in TEMPLATES:
    CASES.append((f"template {_t[:30]!r}", "/v1/classify",
                  json.dumps({"input": [_IMG], "labels": ["cat"], "template": _t}).encode(),
                  "application/json", 413 if len(_t) > 1000 else 422))


def test_every_client_error_is_a_4xx_with_the_openai_error_body():
    engine = StubEngine()
    app = create_app(engine, _cfg())

    async def fn(c):
        out = []
        for what, path, body, ctype, status in CASES:
            r = await c.post(path, content=body, headers={"content-type": ctype})
            err = assert_client_error(r, what)
            if status is not None:
                assert r.status_code == status, (what, r.status_code, err)
            out.append((what, err["code"]))
        # Over the body cap, by the declared length (never read) and by the bytes sent.
        r = await c.post("/v1/embeddings", content=b"x" * 4_000_001,
                         headers={"content-type": "application/json"})
        assert assert_client_error(r, "body over the cap")["code"] == "max_body_bytes"
        return out

    codes = dict(run_asgi(app, fn))
    assert codes["template '{} {0}'"] == "invalid_template"
    assert codes["a body of 500,000 integers"] == "max_json_values"
    assert codes["text over --max-text-chars"] == "max_text_chars"
    assert not engine.calls  # no case reached a tower


def test_template_is_literal_text_filled_by_replacement():
    engine = StubEngine()
    seen: list[str] = []
    tokenize = engine.tokenize

    def recording(texts):
        seen.extend(texts)
        return tokenize(texts)

    engine.tokenize = recording
    app = create_app(engine, _cfg())

    async def fn(c):
        r = await c.post("/v1/classify", json={"input": [_IMG], "labels": ["{0}", "a.b"],
                                               "template": "a {} (photo) %s"})
        assert r.status_code == 200, r.text
        r = await c.post("/v1/classify", json={"input": [_IMG], "labels": ["dog"]})
        assert r.status_code == 200, r.text  # the model's own template

    run_asgi(app, fn)
    assert seen == ["a {0} (photo) %s", "a a.b (photo) %s", "a photo of a dog."]


def test_pixel_limit_fails_its_item_and_the_others_are_answered():
    app = create_app(StubEngine(), _cfg())
    small = data_url(jpeg(np.full((20, 30, 3), 90, np.uint8)))
    big = data_url(jpeg(np.zeros((120, 100, 3), np.uint8), "PNG"), "image/png")  # 12000 px

    async def fn(c):
        r = await c.post("/v1/embeddings", json={"model": "stub-model", "modality": "image",
                                                 "input": [small, big, small]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [d["index"] for d in body["data"]] == [0, 2]
        assert body["errors"][0]["index"] == 1
        assert "--max-image-pixels" in body["errors"][0]["message"]
        r = await c.post("/v1/classify", json={"input": [big, small], "labels": ["a", "b"]})
        assert r.status_code == 200 and [d["index"] for d in r.json()["data"]] == [1]

    run_asgi(app, fn)


def test_tokenization_runs_off_the_event_loop():
    """/health answers while a request's texts are being tokenized (the tokenizer is held until
    /health has answered; were it on the event loop, /health could only answer after it)."""
    engine = StubEngine()
    engine.tokenize = held = HeldTokenizer(engine)
    app = create_app(engine, _cfg())

    async def fn(c):
        texts = ["a" * 900] * 3  # over the size parsed inline
        task = asyncio.create_task(c.post("/v1/embeddings",
                                          json={"model": "stub-model", "input": texts}))
        await held.wait_entered()
        r = await c.get("/health")
        assert r.status_code == 200
        held.release.set()
        assert (await task).status_code == 200

    run_asgi(app, fn)
    assert held.released == [True]


def test_bodies_held_at_once_are_bounded_by_max_buffered_bytes():
    engine = StubEngine()
    engine.gate.clear()  # the first request stays in the tower, its body held
    app = create_app(engine, _cfg(max_body_bytes=2000, max_buffered_bytes=3000))
    service = app.state.service
    body = {"model": "stub-model", "input": ["x" * 900, "y" * 900]}

    async def fn(c):
        first = asyncio.create_task(c.post("/v1/embeddings", json=body))
        for _ in range(5000):
            if engine.running.is_set():
                break
            await asyncio.sleep(0.001)
        held = service.buffered
        r = await c.post("/v1/embeddings", json=body)
        engine.gate.set()
        assert (await first).status_code == 200
        return held, r

    held, r = run_asgi(app, fn)
    assert 1800 < held <= 2000
    err = r.json()["error"]
    assert r.status_code == 503 and err["code"] == "max_buffered_bytes"
    assert set(err) == ERROR_KEYS and "--max-buffered-bytes" in err["message"]
    assert r.headers["retry-after"] == "1"
    assert service.buffered == 0


def test_json_values_are_counted_outside_strings_before_parsing():
    from clipfast.serve.inputs import InputError, LimitExceeded, check_json

    check_json(json.dumps({"input": ["a, [b], {c}" * 10_000]}).encode(), 100)  # in a string
    check_json(json.dumps({"input": "\\\"[,,,]" * 1000}).encode(), 100)  # escaped quotes
    with pytest.raises(LimitExceeded, match="about 1001 values"):
        check_json(json.dumps({"input": [[1]] * 500}).encode(), 1000)
    # A long number across the 1 MiB slices the count is taken in.
    pad = b'{"a":"' + b"x" * ((1 << 20) - 20) + b'","b":'
    with pytest.raises(InputError, match="more than 32 digits"):
        check_json(pad + b"1" * 40 + b"}", 100)
    check_json(pad + b"1" * 32 + b"}", 100)


# -- raw sockets against a loopback server -----------------------------------------------------
def _connect(url: str, source: str = "127.0.0.1") -> socket.socket:
    port = int(url.rsplit(":", 1)[1])
    s = socket.socket()
    s.settimeout(10)
    s.bind((source, 0))  # all of 127/8 is loopback on Linux: distinct client addresses
    s.connect(("127.0.0.1", port))
    return s


def _read_all(s: socket.socket) -> bytes:
    """What the server sends until it closes (or 10 s pass)."""
    out = b""
    with contextlib.suppress(OSError):
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    return out


def _protocols():
    from uvicorn.protocols.http.h11_impl import H11Protocol

    out = [pytest.param(H11Protocol, id="h11")]
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # uvicorn without httptools uses h11
        return out
    return [*out, pytest.param(HttpToolsProtocol, id="httptools")]


@pytest.fixture(params=_protocols())
def slow_server(request):
    app = create_app(StubEngine(), _cfg(header_timeout_s=0.5, body_timeout_s=0.5,
                                        max_connections=6, max_connections_per_client=3))
    with ThreadServer(app, protocol=request.param) as url:
        yield url, app.state.service


def test_slow_headers_are_cut_the_address_is_capped_and_health_answers(slow_server):
    url, service = slow_server
    slow = [_connect(url, "127.0.0.2") for _ in range(3)]
    try:
        for s in slow:
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")  # never finished
        extra = _connect(url, "127.0.0.2")
        answer = _read_all(extra)
        extra.close()
        assert answer.startswith(b"HTTP/1.1 429 ")
        assert b'"code":"max_connections_per_client"' in answer
        assert httpx.get(url + "/health", timeout=10).status_code == 200  # another address
        for s in slow:
            answer = _read_all(s)
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
            assert b'"code":"header_timeout"' in answer
    finally:
        for s in slow:
            s.close()
    assert service.connections.refused["header_timeout"] == 3


def test_past_max_connections_the_api_answers_503_and_health_still_answers(slow_server):
    url, service = slow_server
    held = [_connect(url, f"127.0.0.{3 + i // 2}") for i in range(6)]  # 2 per address
    try:
        for s in held:
            s.sendall(b"GET /v1/models HTTP/1.1\r\n")
        with httpx.Client(base_url=url, timeout=10) as c:
            assert c.get("/health").status_code == 200
            assert c.get("/ready").status_code == 200
            r = c.get("/v1/models")
            assert r.status_code == 503 and r.json()["error"]["code"] == "max_connections"
    finally:
        for s in held:
            s.close()


def test_a_body_slower_than_its_deadline_gets_408_and_the_connection_closes(slow_server):
    url, _ = slow_server
    s = _connect(url)
    try:
        s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nContent-Length: 1000\r\n\r\n{\"input\": ")
        answer = _read_all(s)  # ends: the server closed the connection
    finally:
        s.close()
    assert answer.startswith(b"HTTP/1.1 408 ") and b'"code":"body_timeout"' in answer


def test_headers_over_the_byte_cap_get_431(slow_server):
    url, _ = slow_server
    s = _connect(url)
    try:
        s.sendall(b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 40_000)
        answer = _read_all(s)
    finally:
        s.close()
    assert answer[:12] in (b"HTTP/1.1 431", b"HTTP/1.1 400"), answer[:100]


# -- startup ---------------------------------------------------------------------------------
def test_startup_refuses_a_key_with_blanks_and_a_busy_port_before_loading(capsys, tmp_path):
    from clipfast.cli import main

    missing = str(tmp_path / "no-artifact")  # loading it would fail: the checks come first
    assert main(["serve", missing, "--api-key", " k "]) == 1
    assert "blanks around it" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["serve", missing, "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"--port {port}: cannot listen there" in err and "no-artifact" not in err
