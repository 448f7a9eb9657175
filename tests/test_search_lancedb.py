"""The README's LanceDB example, run as written on shards of the real `clipfast embed`: the
embedded vector database returns what `clipfast index` + search return."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

pytest.importorskip("lancedb")
pytest.importorskip("faiss")

from test_search import clipfast, make_photos  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    m = re.search(r"<!-- lancedb-example -->\n```python\n(.*?)```", text, re.S)
    assert m, "README.md lost its LanceDB example block"
    return m.group(1)


def test_readme_lancedb_example(tmp_path, small_clip_artifact, small_clip_engine, monkeypatch):
    from clipfast.search import SearchIndex, search

    make_photos(tmp_path / "photos", 7)
    os.symlink(small_clip_artifact, tmp_path / "art")
    monkeypatch.chdir(tmp_path)
    for args in (("embed", "art/", "photos/", "--out", "emb/", "--quiet"),
                 ("index", "emb/", "--out", "idx/", "--quiet")):
        r = clipfast(*args)
        assert r.returncode == 0, r.stderr
    scope: dict = {}
    exec(compile(readme_example(), "README.md:lancedb-example", "exec"), scope)
    got = scope["results"]
    want = search(SearchIndex("idx"), small_clip_engine, text="a red car", k=5)
    assert [k for k, _ in got] == [h.key for h in want]
    assert [s for _, s in got] == pytest.approx([h.score for h in want], abs=1e-4)
    assert scope["table"].count_rows() == 7
