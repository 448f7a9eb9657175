"""Property tests of load_manifest: whatever manifest.json holds (random JSON in any field, wrong
types, missing keys, path tricks, symbolic links in and out of the directory), loading either
succeeds with every referenced file listed and inside the directory, or raises ArtifactError."""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_manifest_hardening import FILES, make_artifact  # noqa: E402

from clipfast.artifact.manifest import MANIFEST_NAME, file_entries, load_manifest  # noqa: E402
from clipfast.errors import ArtifactError  # noqa: E402

# names worth trying anywhere a file name is read; the links are made in every example's folder
TRICKY_NAMES = ["image.onnx", "text.onnx", "tokenizer.json", "golden.npz", "./image.onnx",
                "sub/../image.onnx", "../image.onnx", "../outside.onnx", "/etc/passwd",
                "C:/x.onnx", "C:\\x.onnx", "a\\..\\..\\x", "", ".", "..", "/", "nul\x00.onnx",
                "link_in.onnx", "link_out.onnx", "loop.onnx", "dir_link/image.onnx", "sub",
                "missing.onnx", "x" * 300, "manifest.json"]
LINKS = {"link_in.onnx": "image.onnx", "link_out.onnx": "../outside.onnx",
         "loop.onnx": "loop.onnx", "dir_link": ".."}

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                      st.floats(allow_nan=True), st.text(max_size=12),
                      st.sampled_from(TRICKY_NAMES))
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.text(max_size=8),
                                                      st.sampled_from(TRICKY_NAMES)),
                                            inner, max_size=4)),
    max_leaves=12)
name = st.one_of(st.sampled_from(TRICKY_NAMES), st.text(max_size=20))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, dict, dict]:
    """A valid artifact to copy, its manifest, and true entries for every file and link (so a
    mutation that adds a name gets a matching checksum and only the path rules can refuse it)."""
    root = tmp_path_factory.mktemp("fuzz")
    art = make_artifact(root / "art")
    shutil.copy(art / "image.onnx", root / "outside.onnx")
    entries = file_entries(art, FILES)
    for link in ("link_in.onnx", "link_out.onnx"):
        entries[link] = entries["image.onnx"]
    return art, json.loads((art / MANIFEST_NAME).read_text()), entries


def _set_path(data: dict, keys: list[str], value) -> None:
    target = data
    for k in keys[:-1]:
        if not isinstance(target, dict):
            return
        target = target.setdefault(k, {})
    if isinstance(target, dict):
        target[keys[-1]] = value


FIELDS = [["files"], ["image"], ["text"], ["tokenizer"], ["golden"], ["preprocess"], ["logits"],
          ["source"], ["family"], ["embed_dim"], ["precision"], ["gates"], ["graph"],
          ["format"], ["format_version"], ["image", "file"], ["text", "file"],
          ["tokenizer", "file"], ["golden", "file"], ["image", "shape"], ["image", "input"],
          ["text", "inputs"], ["text", "output"], ["image", "dtype"],
          ["files", "image.onnx"], ["files", "image.onnx", "bytes"],
          ["files", "image.onnx", "sha256"], ["files", "text.onnx"]]


@st.composite
def mutation(draw, entries: dict):
    kind = draw(st.sampled_from(["value", "delete", "name", "listed_name", "rename_key"]))
    keys = draw(st.sampled_from(FIELDS))
    if kind == "value":
        return ("set", keys, draw(json_value))
    if kind == "delete":
        return ("delete", keys, None)
    ref = draw(st.sampled_from([["image", "file"], ["text", "file"], ["tokenizer", "file"],
                                ["golden", "file"]]))
    value = draw(name)
    if kind == "name":
        return ("set", ref, value)
    if kind == "listed_name":  # the name is also listed, with the checksum of a real file
        return ("list", ref, value)
    return ("rename", ["files", draw(st.sampled_from(FILES))], value)


def _apply(data: dict, change, entries: dict) -> None:
    op, keys, value = change
    if op == "set":
        _set_path(data, keys, value)
    elif op == "delete":
        target = data
        for k in keys[:-1]:
            target = target.get(k) if isinstance(target, dict) else None
        if isinstance(target, dict):
            target.pop(keys[-1], None)
    elif op == "list":
        _set_path(data, keys, value)
        if isinstance(data.get("files"), dict) and isinstance(value, str):
            data["files"][value] = entries.get(value, entries["image.onnx"])
    elif op == "rename" and isinstance(data.get("files"), dict):
        entry = data["files"].pop(keys[1], None)
        if entry is not None and isinstance(value, str):
            data["files"][value] = entry


def _check(art: Path, raw: bytes) -> None:
    (art / MANIFEST_NAME).write_bytes(raw)
    try:
        m = load_manifest(art)
    except ArtifactError:
        return
    # loaded: every referenced file is listed and inside the directory, and the gate agrees
    root = Path(os.path.realpath(art))
    spec = m.spec
    refs = [spec.image.file, spec.text.file, spec.tokenizer.file]
    if spec.golden is not None:
        refs.append(spec.golden.file)
    for ref in [*refs, *spec.files]:
        p = m.path(ref)
        assert p.is_relative_to(root) and p.is_file()
    # and the typed spec writes back exactly the JSON it was read from
    assert json.dumps(spec.to_dict(), indent=2) == json.dumps(json.loads(raw), indent=2)


def _fresh_copy(art: Path, where: str) -> Path:
    dst = Path(where) / "art"
    shutil.copytree(art, dst, symlinks=True)
    shutil.copy(art.parent / "outside.onnx", Path(where) / "outside.onnx")
    for link, target in LINKS.items():
        (dst / link).symlink_to(target)
    (dst / "sub").mkdir()
    return dst


_SETTINGS = settings(max_examples=250, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture,
                                            HealthCheck.too_slow])


@_SETTINGS
@given(data=st.data())
def test_mutated_manifests_load_or_raise_artifact_error(base, data):
    art, manifest, entries = base
    changes = data.draw(st.lists(mutation(entries), min_size=1, max_size=4))
    doc = copy.deepcopy(manifest)
    for change in changes:
        _apply(doc, change, entries)
    try:
        raw = json.dumps(doc).encode()
    except (ValueError, TypeError):
        return
    with tempfile.TemporaryDirectory() as where:
        _check(_fresh_copy(art, where), raw)


@_SETTINGS
@given(doc=json_value, raw=st.binary(max_size=64))
def test_arbitrary_json_or_bytes_raise_artifact_error(base, doc, raw):
    art = base[0]
    with tempfile.TemporaryDirectory() as where:
        dst = _fresh_copy(art, where)
        for blob in (json.dumps(doc).encode(), raw, json.dumps(
                {"format": "clipfast-artifact", "format_version": 1, **(
                    doc if isinstance(doc, dict) else {"files": doc})}).encode()):
            with pytest.raises(ArtifactError):
                _check_raises(dst, blob)


def _check_raises(art: Path, raw: bytes) -> None:
    (art / MANIFEST_NAME).write_bytes(raw)
    load_manifest(art)


def test_a_valid_manifest_with_inside_links_loads(base):
    """The generator's baseline: the unmutated manifest, and one listing a link that stays
    inside, load; the same link pointing outside does not."""
    art, manifest, entries = base
    with tempfile.TemporaryDirectory() as where:
        dst = _fresh_copy(art, where)
        _check(dst, json.dumps(manifest).encode())
        load_manifest(dst)
        doc = copy.deepcopy(manifest)
        doc["image"]["file"] = "link_in.onnx"
        doc["files"]["link_in.onnx"] = entries["link_in.onnx"]
        (dst / MANIFEST_NAME).write_text(json.dumps(doc))
        assert load_manifest(dst).path("link_in.onnx") == (dst / "image.onnx").resolve()
        doc["image"]["file"] = "link_out.onnx"
        doc["files"]["link_out.onnx"] = entries["link_out.onnx"]
        (dst / MANIFEST_NAME).write_text(json.dumps(doc))
        with pytest.raises(ArtifactError, match="outside the artifact directory"):
            load_manifest(dst)
