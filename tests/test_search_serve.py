"""``clipfast serve --index``: POST /v1/search equals ``clipfast search``, the zero-shot filter,
thumbnails limited to indexed keys, the API key, and the search page driven in a real browser
(Debian's Chromium through playwright)."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from test_search import clipfast, clustered, fake_embed_dir, make_photos  # noqa: E402
from test_serve_support import ThreadServer  # noqa: E402

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
    required = os.environ.get("CI") == "true" or os.environ.get("CLIPFAST_REQUIRE_BROWSER") == "1"
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
