"""``clipfast serve --index``: POST /v1/search equals ``clipfast search``, the zero-shot filter,
thumbnails limited to indexed keys, the API key, and the search page driven in a real browser
(Debian's Chromium through playwright)."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from test_search import clipfast, clustered, fake_embed_dir, make_photos  # noqa: E402
from test_serve_support import (  # noqa: E402
    HeldTokenizer,
    StubEngine,
    ThreadServer,
    assert_client_error,
    jpeg,
    run_asgi,
)

from clipfast import settings  # noqa: E402
from clipfast.errors import InputError  # noqa: E402
from clipfast.search.index import build_index  # noqa: E402
from clipfast.serve.app import create_app  # noqa: E402
from clipfast.serve.config import ServeConfig  # noqa: E402

KEY = "search-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, small_clip_artifact) -> tuple[Path, list[Path]]:
    """Generated photos, embedded with the real `clipfast embed`, indexed with `clipfast
    index`."""
    root = tmp_path_factory.mktemp("served")
    photos = make_photos(root / "photos", 8)
    for args in (("embed", str(small_clip_artifact), str(root / "photos"), "--out",
                  str(root / "emb"), "--quiet"),
                 ("index", str(root / "emb"), "--out", str(root / "idx"), "--quiet")):
        r = clipfast(*args)
        assert r.returncode == 0, r.stderr
    return root / "idx", photos


@pytest.fixture(scope="module")
def server(indexed, small_clip_engine):
    idx, _ = indexed
    app = create_app(small_clip_engine, ServeConfig(api_key=KEY, index=str(idx)))
    with ThreadServer(app) as url:
        yield url


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def post(url: str, body: dict, headers: dict | None = AUTH) -> httpx.Response:
    return httpx.post(f"{url}/v1/search", json=body, headers=headers, timeout=60)


def test_search_equals_cli(server, indexed):
    idx, photos = indexed
    for query, args in (({"text": "a red car"}, ("a red car",)),
                        ({"image": data_url(photos[3])}, ("--image", str(photos[3])))):
        r = post(server, {**query, "k": 5})
        assert r.status_code == 200, r.text
        got = r.json()["data"]
        cli = clipfast("search", str(idx), *args, "--k", "5", "--json")
        assert cli.returncode == 0, cli.stderr
        want = json.loads(cli.stdout)["results"]
        assert [h["key"] for h in got] == [h["key"] for h in want]
        np.testing.assert_allclose([h["score"] for h in got], [h["score"] for h in want],
                                   atol=1e-5)
        assert [h["rank"] for h in got] == [1, 2, 3, 4, 5]
    assert got[0]["key"] == str(photos[3])


def test_api_key_and_bad_requests(server):
    assert post(server, {"text": "x"}, headers=None).status_code == 401
    assert post(server, {"text": "x"}, headers={"Authorization": "Bearer no"}).status_code == 401
    page = httpx.get(f"{server}/", timeout=30)  # the page is open; its calls are not
    assert page.status_code == 200 and "clipfast search" in page.text
    assert "http" not in page.text.split("<script>")[0].replace("http-equiv", "")
    for body, word in (({}, "exactly one"), ({"text": "a", "image": "b"}, "exactly one"),
                       ({"text": "a", "k": 0}, "k"), ({"image": "not base64!"}, "image"),
                       ({"text": "a", "filter": {"labels": ["x"], "exclude": ["y"]}}, "exclude"),
                       ({"text": "a", "colour": 1}, "colour")):
        r = post(server, body)
        assert r.status_code == 422, (body, r.text)
        assert word in r.json()["error"]["message"], (body, r.text)


def test_thumbnails_only_for_indexed_keys(server, indexed):
    from PIL import Image

    _, photos = indexed
    hit = post(server, {"image": data_url(photos[1]), "k": 1}).json()["data"][0]
    assert httpx.get(f"{server}{hit['thumbnail']}", timeout=30).status_code == 401
    r = httpx.get(f"{server}{hit['thumbnail']}", headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    import io

    with Image.open(io.BytesIO(r.content)) as img:
        assert max(img.size) <= 256
    for bad in ("99999", "-1", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd"):
        r = httpx.get(f"{server}/v1/search/thumbnails/{bad}", headers=AUTH, timeout=30)
        assert r.status_code in (404, 422), (bad, r.status_code)
        assert b"root:" not in r.content


def test_zero_shot_filter(server, indexed, small_clip_engine):
    labels = ["a photo of a cat", "a photo of a dog"]
    base = post(server, {"text": "something", "k": 8,
                         "filter": {"labels": labels, "template": "{}"}})
    assert base.status_code == 200, base.text
    rows = base.json()["data"]
    assert len(rows) == 8
    p_cat = np.array([h["labels"][labels[0]] for h in rows])
    # The probabilities are Engine.classify's for the indexed images.
    _, photos = indexed
    keys = [h["key"] for h in rows]
    want = small_clip_engine.classify(keys, labels, template="{}")
    np.testing.assert_allclose(p_cat, np.asarray(want)[:, 0] if not hasattr(want, "probs")
                               else want.probs[:, 0], atol=1e-4)
    threshold = float(np.median(p_cat))
    kept = post(server, {"text": "something", "k": 8, "filter": {
        "labels": labels, "exclude": [labels[0]], "threshold": threshold, "template": "{}"}})
    got = kept.json()["data"]
    assert [h["key"] for h in got] == [h["key"] for h, p in zip(rows, p_cat) if p < threshold]
    assert 0 < len(got) < 8


def test_serve_refuses_index_of_another_artifact(tmp_path, small_clip_engine):
    build_index([fake_embed_dir(tmp_path / "emb", clustered(20, 16))], tmp_path / "idx")
    with pytest.raises(InputError, match="same model"):
        create_app(small_clip_engine, ServeConfig(index=str(tmp_path / "idx")))


# -- the page in a real browser ----------------------------------------------------------------
def _browser_or_skip():
    required = os.environ.get("CI") == "true" or settings.CLIPFAST_REQUIRE_BROWSER
    why = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        why = "playwright is not installed (pip install playwright)"
    if why is None and not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        why = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if why is not None:
        if required:
            pytest.fail(f"the browser test must run here (CI / CLIPFAST_REQUIRE_BROWSER): {why}")
        pytest.skip(why)


def test_page_in_chromium(server, indexed):
    _browser_or_skip()
    from playwright.sync_api import expect, sync_playwright

    _, photos = indexed
    expected_text = post(server, {"text": "a red car", "k": 1}).json()["data"][0]["key"]
    console: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium"),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            page.goto(server + "/")
            # Without the key the search is refused and the page says so.
            page.fill("#q", "a red car")
            page.click("#go")
            expect(page.locator("#status")).to_contain_text("API key", timeout=30_000)
            console.clear()  # the 401 itself is logged by the browser as a failed resource
            page.fill("#key", KEY)
            page.dispatch_event("#key", "change")
            page.click("#go")
            first = page.locator("#results figure.hit").first
            expect(first).to_have_attribute("data-key", expected_text, timeout=30_000)
            expect(page.locator("#results figure.hit")).to_have_count(8)
            expect(first.locator("img")).to_have_attribute("data-loaded", "1", timeout=30_000)
            # Upload an indexed photo: it comes first, with a score of about 1.
            page.set_input_files("#file", str(photos[5]))
            expect(first).to_have_attribute("data-key", str(photos[5]), timeout=30_000)
            score = float(first.locator(".score").inner_text())
            assert score == pytest.approx(1.0, abs=1e-3)
            expect(first.locator("img")).to_have_attribute("data-loaded", "1", timeout=30_000)
        finally:
            browser.close()
    assert console == [], console


def test_thumbnail_cache_is_bounded():
    from clipfast.search.routes import ThumbnailCache

    cache = ThumbnailCache(max_bytes=100)
    for i in range(5):
        cache.put(i, bytes(30))
    assert cache.bytes <= 100 and len(cache) == 3
    assert cache.get(0) is None and cache.get(4) == bytes(30)
    cache.get(2)  # recently used: kept over 3
    cache.put(9, bytes(30))
    assert cache.get(2) is not None and cache.get(3) is None
    cache.put(10, bytes(101))  # larger than the whole cache: not kept
    assert cache.get(10) is None


def test_serve_cli_passes_the_index(monkeypatch):
    import clipfast.serve.server as server_mod
    from clipfast.cli import main

    seen = {}
    monkeypatch.setattr(server_mod, "serve",
                        lambda artifact, config, **kw: seen.update(config=config) or 0)
    assert main(["serve", "art", "--index", "idx"]) == 0
    assert seen["config"].index == "idx"


# -- the serving core's rules, with a stand-in engine (no model) ------------------------------
def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (no pixel data follows)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                                 0, 0, 0)) + chunk(b"IEND", b""))


def stub_index(root: Path) -> tuple[Any, Path, dict[str, int]]:
    """A StubEngine (4-d embeddings) and a flat index of its artifact whose keys name generated
    photos and, by name, files no thumbnail can come from: over --max-image-pixels (10 000 in
    ``stub_config``), a header past Pillow's decompression-bomb limit, a FIFO, a folder, a text
    file, a file deleted after indexing. Returns (engine, index folder, name -> id)."""
    from PIL import Image

    from clipfast.artifact.manifest import artifact_digest
    from clipfast.search.index import build_index

    engine = StubEngine()
    engine.manifest.spec.files = {"stub.onnx": {"sha256": "0" * 64}}
    photos = make_photos(root / "photos", 4)
    files = {f"photo{i}": p for i, p in enumerate(photos)}
    files["big"] = root / "big.png"
    Image.fromarray(np.zeros((120, 100, 3), np.uint8)).save(files["big"])  # 12 000 pixels
    files["bomb"] = root / "bomb.png"
    files["bomb"].write_bytes(_png_header(30_000, 30_000))
    files["fifo"] = root / "fifo.jpg"
    os.mkfifo(files["fifo"])
    files["folder"] = root / "photos"
    files["text"] = root / "notes.jpg"
    files["text"].write_text("not an image")
    files["gone"] = root / "gone.jpg"
    files["gone"].write_bytes(jpeg(np.zeros((8, 8, 3), np.uint8)))
    names = list(files)
    emb = clustered(len(names), 4)
    build_index([fake_embed_dir(root / "emb", emb, digest=artifact_digest(engine.manifest),
                                keys=[str(files[n]) for n in names])], root / "idx")
    files["gone"].unlink()
    return engine, root / "idx", {n: i for i, n in enumerate(names)}


def stub_config(index: Path, **kw) -> ServeConfig:
    opts = {"max_items": 4, "max_queue": 8, "max_body_bytes": 4_000_000,
            "max_image_pixels": 10_000, "max_wait_ms": 0.0, "max_labels": 16,
            "max_text_chars": 1000, "index": str(index)}
    opts.update(kw)
    return ServeConfig(**opts)


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    return stub_index(tmp_path_factory.mktemp("stub-index"))






def _search_cases() -> list[tuple[str, bytes, int | None, str | None]]:
    """(what, body, status or None for any 4xx, error code or None)."""
    from test_serve_support import data_url

    big = data_url(jpeg(np.zeros((120, 100, 3), np.uint8), "PNG"), "image/png")
    flt = {"labels": ["cat", "dog"], "exclude": ["cat"]}
    cases = [
        ("JSON nested 10,000 deep", b"[" * 10_000 + b"]" * 10_000, None, None),
        ("JSON nested 10,000 deep in a field",
         b'{"text":"a","x":' + b"[" * 10_000 + b"]" * 10_000 + b"}", None, None),
        ("5,000-digit integer", b'{"text":"a","k":' + b"7" * 5000 + b"}", 422, None),
        ("a body of 500,000 integers", b'{"text":"a","x":[' + b"1," * 499_999 + b"1]}", 413,
         "max_json_values"),
        ("invalid JSON", b"{not json", 422, "invalid_json"),
        ("text over --max-text-chars", json.dumps({"text": "b" * 1001}).encode(), 413,
         "max_text_chars"),
        ("label over --max-text-chars", json.dumps({"text": "a", "filter": {
            "labels": ["b" * 1001]}}).encode(), 413, "max_text_chars"),
        ("labels over --max-labels", json.dumps({"text": "a", "filter": {
            "labels": [f"l{i}" for i in range(17)]}}).encode(), 413, "max_labels"),
        ("exclude over --max-labels", json.dumps({"text": "a", "filter": {
            "labels": ["cat"], "exclude": ["cat"] * 17}}).encode(), 413, "max_labels"),
        ("image over --max-image-pixels", json.dumps({"image": big}).encode(), 422, "bad_items"),
        ("image URL", json.dumps({"image": "https://example.com/x.jpg"}).encode(), 422,
         "bad_items"),
        ("k over the limit", json.dumps({"text": "a", "k": 10**6}).encode(), 422, None),
    ]
    for t in ("{.__class__.__mro__}{{}}", "{:>20000000}{{}}", "{} {0}", "{0}", "{} and {}",
              "{.x}", "{!r}", "{}{{}}", "no slot", "", "x" * 1001 + "{}"):
        cases.append((f"template {t[:30]!r}", json.dumps({"text": "a", "filter": {
            **flt, "template": t}}).encode(), 413 if len(t) > 1000 else 422,
            "max_template_chars" if len(t) > 1000 else "invalid_template"))
    return cases


def test_search_obeys_every_limit_of_the_serving_core(stub):
    """The body's JSON is counted before parsing; the text, the labels, the template and the
    image get the limits of /v1/embeddings and /v1/classify; each refusal is an OpenAI-shaped
    4xx, and no refused request reaches a tower."""
    engine, idx, _ = stub
    app = create_app(engine, stub_config(idx))

    async def fn(c):
        for what, body, status, code in _search_cases():
            r = await c.post("/v1/search", content=body,
                             headers={"content-type": "application/json"})
            err = assert_client_error(r, what)
            assert status is None or r.status_code == status, (what, r.status_code, err)
            assert code is None or err["code"] == code, (what, err)
        r = await c.post("/v1/search", content=b"x" * 4_000_001,
                         headers={"content-type": "application/json"})
        assert assert_client_error(r, "body over the cap")["code"] == "max_body_bytes"
        # What is allowed still answers.
        r = await c.post("/v1/search", json={"text": "a" * 1000, "k": 3, "filter": {
            "labels": ["cat", "dog"], "exclude": ["cat"], "template": "a {} (photo) %s",
            "threshold": 1.0}})
        assert r.status_code == 200, r.text
        assert len(r.json()["data"]) == 3

    calls_before = len(engine.calls)
    run_asgi(app, fn)
    # Only the allowed request reached the towers: its query and its two prompts.
    assert sum(engine.calls[calls_before:]) == 3


def test_search_template_is_filled_by_replacement(stub, monkeypatch):
    engine, idx, _ = stub
    seen: list[str] = []
    tokenize = engine.tokenize

    def recording(texts):
        seen.extend(texts)
        return tokenize(texts)

    app = create_app(engine, stub_config(idx))
    monkeypatch.setattr(engine, "tokenize", recording, raising=False)
    r = run_asgi(app, lambda c: c.post("/v1/search", json={"text": "q", "filter": {
        "labels": ["{0}", "a.b"], "template": "x {} %s "}}))
    assert r.status_code == 200, r.text
    assert seen == ["q", "x {0} %s ", "x a.b %s "]


def test_search_body_is_parsed_and_tokenized_off_the_event_loop(stub, monkeypatch):
    """A body over the inline size is counted and parsed in a decode thread (as on the other
    routes), and /health answers while its text is being tokenized."""
    import asyncio
    import threading

    import clipfast.serve.schemas as app_mod

    engine, idx, _ = stub
    threads: list[str] = []
    check_json = app_mod.check_json

    def recording_check(body, max_values):
        threads.append(threading.current_thread().name)
        return check_json(body, max_values)

    monkeypatch.setattr(app_mod, "check_json", recording_check)
    held = HeldTokenizer(engine)
    app = create_app(engine, stub_config(idx))
    monkeypatch.setattr(engine, "tokenize", held, raising=False)

    async def fn(c):
        body = {"text": "a" * 900, "filter": {"labels": ["b" * 900, "c" * 900]}}
        task = asyncio.create_task(c.post("/v1/search", json=body))
        await held.wait_entered()
        assert (await c.get("/health")).status_code == 200
        held.release.set()
        r = await task
        assert r.status_code == 200, r.text

    run_asgi(app, fn)
    assert held.released[:1] == [True]
    assert threads and all(t.startswith("clipfast-decode") for t in threads), threads


def test_search_routes_are_known_to_metrics_and_to_routing_errors(stub):
    engine, idx, _ = stub
    app = create_app(engine, stub_config(idx, api_key="k"))
    auth = {"Authorization": "Bearer k"}

    async def fn(c):
        assert (await c.post("/v1/search", json={"text": "a"})).status_code == 401
        r = await c.post("/v1/search", json={"text": "a"}, headers=auth)
        assert r.status_code == 200, r.text
        assert (await c.get("/v1/search/thumbnails/0", headers=auth)).status_code == 200
        assert_client_error(await c.get("/v1/search/thumbnails/x", headers=auth), "thumbnail x")
        r = await c.get("/nowhere", headers=auth)
        err = assert_client_error(r, "unknown path")
        assert r.status_code == 404
        assert "/v1/search" in err["message"] and "/v1/search/thumbnails/{id}" in err["message"]
        for method, path in (("PUT", "/v1/search"), ("GET", "/v1/search"),
                             ("POST", "/v1/search/thumbnails/0"), ("DELETE", "/")):
            r = await c.request(method, path, headers=auth)
            assert r.status_code == 405, (method, path, r.status_code)
            assert_client_error(r, f"{method} {path}")
        return (await c.get("/metrics", headers=auth)).text

    metrics = run_asgi(app, fn)
    for line in ('clipfast_requests_total{endpoint="/v1/search",status="401"}',
                 'clipfast_requests_total{endpoint="/v1/search",status="200"}',
                 'clipfast_requests_total{endpoint="/v1/search/thumbnails",status="200"}',
                 'clipfast_requests_total{endpoint="/v1/search/thumbnails",status="404"}',
                 'clipfast_errors_total{endpoint="/v1/search",kind="unauthorized"}'):
        assert line in metrics, line


def test_thumbnails_come_only_from_readable_indexed_images(stub):
    """Ids outside the index, ids that are not plain integers, and keys that are over the
    pixel limit, past Pillow's bomb limit, a FIFO, a folder, not an image or gone: each an
    OpenAI-shaped 404 (a FIFO is never opened: the request answers)."""
    from PIL import Image

    engine, idx, ids = stub
    # The bomb is within the server's own pixel limit: the loading policy refuses it.
    app = create_app(engine, stub_config(idx, max_image_pixels=10**10))
    small = create_app(engine, stub_config(idx))

    async def fn(c):
        r = await c.get(f"/v1/search/thumbnails/{ids['photo1']}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        import io

        with Image.open(io.BytesIO(r.content)) as img:
            assert max(img.size) <= 256
        bad = ["99999", str(len(ids)), "-1", "abc", "1.5", "1e3", " 1", "+1", "٣", "9" * 5000,
               "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd"]
        bad += [str(ids[n]) for n in ("bomb", "fifo", "folder", "text", "gone")]
        for item in bad:
            r = await asyncio.wait_for(c.get(f"/v1/search/thumbnails/{item}"), 30)
            err = assert_client_error(r, item)
            assert r.status_code == 404, (item, r.status_code, err)
            assert b"root:" not in r.content
        return (await c.get(f"/v1/search/thumbnails/{ids['gone']}")).json()["error"]["message"]

    import asyncio

    assert "not found" in run_asgi(app, fn)
    r = run_asgi(small, lambda c: c.get(f"/v1/search/thumbnails/{ids['big']}"))
    assert r.status_code == 404 and "--max-image-pixels" in r.json()["error"]["message"]
    assert run_asgi(app, lambda c: c.get(f"/v1/search/thumbnails/{ids['big']}")).status_code == 200
