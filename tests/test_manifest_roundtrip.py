"""The typed manifest (clipfast.artifact.spec) is the only schema: a manifest read and written
back is byte-identical, whatever sections it has or lacks; fields of a newer minor version are
kept at every level; optional sections take their declared defaults; errors name the field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_manifest_hardening import make_artifact, rewrite

from clipfast.artifact.manifest import MANIFEST_NAME, load_manifest, write_manifest
from clipfast.artifact.sections import Gates, GraphSection, TensorRTSection
from clipfast.artifact.spec import ArtifactSpec
from clipfast.errors import ArtifactError


def _rewritten(art: Path) -> bytes:
    """The manifest after a read and a rewrite through the spec (as build-engines does)."""
    m = load_manifest(art)
    write_manifest(art, m.spec, list(m.spec.files))
    return (art / MANIFEST_NAME).read_bytes()


def test_an_exported_manifest_is_rewritten_byte_identical(small_clip_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(small_clip_artifact, art)
    before = (art / MANIFEST_NAME).read_bytes()
    assert _rewritten(art) == before
    spec = load_manifest(art).spec
    # the export's own records, typed
    assert spec.graph.image is not None and spec.graph.text is not None
    assert isinstance(spec.graph.image.contrib_ops, list)
    assert spec.gates.image_centred_rel_error_max == 1e-3
    assert spec.precision_gates["bf16"].image_centred_rel_error_max == 0.08
    assert spec.quantization is None and spec.tensorrt is None


@pytest.fixture
def art(tmp_path) -> Path:
    return make_artifact(tmp_path / "art")


def _edit(**changes):
    def edit(d):
        for key, value in changes.items():
            if value is None:
                d.pop(key, None)
            else:
                d[key] = value
    return edit


def _reversed(d: dict) -> None:
    items = list(d.items())
    d.clear()
    d.update(reversed(items))


@pytest.mark.parametrize("edit", [
    # an artifact from before the optional sections existed (old code wrote "graph": {} etc.)
    _edit(graph=None, gates=None, golden=None),
    # nulls stay null, key order stays the file's
    _edit(io_dtype=None, fidelity=None, exported_on=None),
    lambda d: d.update({"io_dtype": None, "graph": None}),
    _reversed,
    # a newer minor version's fields, at the top level and inside sections
    lambda d: d.update(future={"x": [1, 2.5, None]}),
    lambda d: d["image"].update(layout_hint="nchw"),
    lambda d: d["tokenizer"].pop("file"),
    lambda d: d.update(graph={"image": {"fused": None, "fusion": "off", "new": 1}, "other": 2}),
    lambda d: d.update(gates={"image_cosine_min": 0.99, "audio_cosine_min": 0.9}),
    lambda d: d.update(quantization={"int8_method": "static", "image": {"a": 1}, "z": 0}),
    lambda d: d.update(tensorrt={"profile": {"min": 1}, "cache": "t", "engines": {
        "image": {"key": "k", "tensorrt": "10", "compute_capability": "8.9", "new": 1}}}),
])
def test_a_read_manifest_is_written_back_unchanged(art, edit):
    rewrite(art, edit)
    raw = json.loads((art / MANIFEST_NAME).read_text())
    spec = load_manifest(art).spec
    assert json.dumps(spec.to_dict()) == json.dumps(raw)
    (art / MANIFEST_NAME).write_text(json.dumps(raw, indent=2) + "\n")
    before = (art / MANIFEST_NAME).read_bytes()
    assert _rewritten(art) == before


def test_missing_optional_sections_take_the_declared_defaults(art):
    rewrite(art, _edit(graph=None, gates=None, golden=None, io_dtype=None))
    spec = load_manifest(art).spec
    assert spec.graph == GraphSection() and spec.graph.contrib_ops("image") is None
    assert spec.gates == Gates() and spec.gates.as_dict() == {}
    assert spec.golden is None and spec.io_dtype == "fp32" and spec.precision_gates == {}
    assert spec.quantization is None and spec.tensorrt is None
    assert spec.text.sequence == "fixed" and spec.tokenizer.file == "tokenizer.json"


def test_unknown_fields_are_kept_in_extra(art):
    rewrite(art, lambda d: d.update(future=1, gates={"image_cosine_min": 0.9, "new_max": 2}))
    spec = load_manifest(art).spec
    assert spec.extra == {"future": 1}
    assert spec.gates.extra == {"new_max": 2}
    assert spec.gates.as_dict() == {"image_cosine_min": 0.9, "new_max": 2}


def test_a_section_set_after_reading_goes_where_the_spec_declares_it(art):
    m = load_manifest(art)
    m.spec.tensorrt = TensorRTSection(profile={"min": 1}, cache="tensorrt")
    keys = list(m.spec.to_dict())
    assert keys.index("tensorrt") == keys.index("golden") + 1
    assert keys[-3:] == ["format", "format_version", "files"]


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(gates={"image_cosine_min": "high"}), "gates.image_cosine_min must be a "
                                                             "number"),
    (lambda d: d.update(gates={"token_ids_identical": 1}), "gates.token_ids_identical"),
    (lambda d: d.update(graph={"text": []}), "graph.text must be an object"),
    (lambda d: d.update(graph={"text": {"layers": 1.5}}), "graph.text.layers must be an integer"),
    (lambda d: d.update(quantization={"image": 3}), "quantization.image must be an object"),
    (lambda d: d.update(quantization=[]), "'quantization' must be an object"),
    (lambda d: d.update(tensorrt={"cache": "t"}), "'tensorrt' section lacks 'profile'"),
    (lambda d: d.update(tensorrt={"profile": {}, "cache": "t", "engines": {"image": {}}}),
     "'tensorrt.engines.image' section lacks 'key'"),
    (lambda d: d.update(precision_gates={"bf16": 1}), "precision_gates.bf16 must be an object"),
    (lambda d: d.update(random_weights="yes"), "'random_weights' must be true or false"),
    (lambda d: d.update(io_dtype=16), "'io_dtype' must be a string"),
    (lambda d: d["image"].update(dtype=32), "image.dtype must be a string"),
    (lambda d: d["golden"].update(figures_at_export=[]), "golden.figures_at_export must be an "
                                                         "object"),
])
def test_a_malformed_section_names_the_field(art, edit, match):
    rewrite(art, edit)
    with pytest.raises(ArtifactError, match=match):
        load_manifest(art)


def test_a_spec_built_in_code_writes_its_declared_order():
    raw = json.loads(json.dumps({
        "source": {}, "family": "clip", "embed_dim": 4, "precision": "fp32",
        "image": {"file": "i", "shape": [4]}, "text": {"file": "t", "inputs": ["x"]},
        "preprocess": {"image_size": [2, 2]}, "tokenizer": {"kind": "hf", "context_length": 4},
        "logits": {"kind": "softmax", "scale": 1.0}, "files": {}}))
    spec = ArtifactSpec.from_dict(raw)
    spec.layout = None  # as if the export had built it
    out = spec.to_dict()
    assert list(out)[:3] == ["clipfast_version", "created", "source"]
    assert out["graph"] == {} and out["gates"] == {} and "files" not in out
    assert "quantization" not in out and "tensorrt" not in out
