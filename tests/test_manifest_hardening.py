"""The manifest's file checks (clipfast/artifact/manifest.py): every file the runtime opens
(towers, their
external data, tokenizer, golden outputs) is listed in ``files``, resolves inside the artifact
directory (symbolic links included) and matches its sha256; a malformed manifest is an
ArtifactError naming the field. Artifacts here are tiny hand-built ONNX graphs (no export)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from clipfast.artifact.manifest import (
    MANIFEST_NAME,
    file_entries,
    load_manifest,
    write_manifest,
)
from clipfast.artifact.onnx_proto import onnx_external_data
from clipfast.errors import ArtifactError

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

FILES = ["golden.npz", "image.onnx", "text.onnx", "tokenizer.json"]


def tiny_graph(path: Path, *, external: str | None = None) -> Path:
    """y = x @ W (4x4) as an ONNX file; with ``external`` W lives in that external-data file."""
    w = np.arange(16, dtype=np.float32).reshape(4, 4)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if external is None:
        onnx.save(model, str(path))
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, location=external,
                        size_threshold=0)
    return path


def base_data() -> dict:
    return {"source": {"model": "tiny"}, "family": "clip", "embed_dim": 4, "precision": "fp32",
            "io_dtype": "fp32",
            "image": {"file": "image.onnx", "input": "x", "output": "y", "shape": [4],
                      "dtype": "float32"},
            "text": {"file": "text.onnx", "inputs": ["x"], "output": "y", "dtype": "int32"},
            "preprocess": {"image_size": [2, 2]},
            "tokenizer": {"kind": "hf", "context_length": 4, "file": "tokenizer.json"},
            "logits": {"kind": "softmax", "scale": 1.0}, "graph": {},
            "golden": {"file": "golden.npz"}}


def make_artifact(directory: Path) -> Path:
    """A loadable artifact: two tiny towers, a tokenizer file and a golden file, all listed."""
    directory.mkdir(parents=True)
    tiny_graph(directory / "image.onnx")
    tiny_graph(directory / "text.onnx")
    (directory / "tokenizer.json").write_text("{}")
    np.savez(directory / "golden.npz", a=np.zeros(2))
    write_manifest(directory, base_data(), FILES)
    return directory


def rewrite(directory: Path, edit) -> None:
    """Apply ``edit`` to the manifest JSON and write it back as is (no checksums recomputed)."""
    path = directory / MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.fixture
def art(tmp_path) -> Path:
    return make_artifact(tmp_path / "art")


def test_a_fresh_artifact_loads(art):
    m = load_manifest(art)
    assert m.path("image.onnx") == (art / "image.onnx").resolve()
    assert m.path("./image.onnx") == m.path("image.onnx")


# -- references outside the directory or not listed ----------------------------------------------
@pytest.mark.parametrize("field", ["image", "text", "tokenizer", "golden"])
@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_a_referenced_file_outside_the_directory_is_refused(art, tmp_path, field, how):
    # the real file, with a valid checksum, sits next to the artifact; the reference points at it
    name = base_data()[field]["file"]
    shutil.copy(art / name, tmp_path / name)
    ref = f"../{name}" if how == "dotdot" else str(tmp_path / name)
    rewrite(art, lambda d: d[field].update(file=ref))
    with pytest.raises(ArtifactError, match=f"{field}.file"):
        load_manifest(art)


@pytest.mark.parametrize("field", ["image", "text", "tokenizer", "golden"])
def test_a_referenced_file_must_be_listed(art, field):
    name = base_data()[field]["file"]
    shutil.copy(art / name, art / f"other-{name}")
    rewrite(art, lambda d: d[field].update(file=f"other-{name}"))
    with pytest.raises(ArtifactError, match=f"{field}.file 'other-{name}' is not listed"):
        load_manifest(art)


def test_empty_files_verifies_nothing_so_it_is_refused(art):
    rewrite(art, lambda d: d.update(files={}))
    for verify in (True, False):
        with pytest.raises(ArtifactError, match="image.file 'image.onnx' is not listed"):
            load_manifest(art, verify_checksums=verify)


@pytest.mark.parametrize("name", ["../outside.onnx", "/abs/outside.onnx"])
def test_a_listed_file_outside_the_directory_is_refused(art, tmp_path, name):
    outside = tmp_path / "outside.onnx"
    shutil.copy(art / "image.onnx", outside)
    key = name if name.startswith("..") else str(outside)
    entry = file_entries(art, ["image.onnx"])["image.onnx"]  # size and sha256 do match

    def edit(d):
        d["files"][key] = entry
        d["image"]["file"] = key

    rewrite(art, edit)
    with pytest.raises(ArtifactError, match="leaves the artifact directory|absolute path"):
        load_manifest(art)


def test_a_symlink_leaving_the_directory_is_refused(art, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    tiny_graph(outside)
    (art / "image.onnx").unlink()
    (art / "image.onnx").symlink_to(outside)
    write_manifest(art, base_data(), FILES)  # checksums of the link target: they match
    with pytest.raises(ArtifactError, match="outside the artifact directory"):
        load_manifest(art)


def test_a_symlinked_artifact_directory_and_inside_links_are_fine(art, tmp_path):
    (art / "sub").mkdir()
    (art / "image.onnx").rename(art / "sub" / "real.onnx")
    (art / "image.onnx").symlink_to(Path("sub") / "real.onnx")
    write_manifest(art, base_data(), FILES)
    (tmp_path / "link").symlink_to(art)
    m = load_manifest(tmp_path / "link")
    assert m.path("image.onnx") == (art / "sub" / "real.onnx").resolve()


def test_manifest_path_is_the_checked_gate(art, tmp_path):
    (tmp_path / "secret").write_text("x")
    m = load_manifest(art)
    for name in ("../secret", str(tmp_path / "secret"), "unlisted.onnx", "", "a\\..\\b"):
        with pytest.raises(ArtifactError):
            m.path(name)
    # a link swapped in after load is still caught at the gate
    (art / "tokenizer.json").unlink()
    (art / "tokenizer.json").symlink_to(tmp_path / "secret")
    with pytest.raises(ArtifactError, match="outside the artifact directory"):
        m.path("tokenizer.json")


def test_golden_outputs_are_read_through_the_gate(art, tmp_path):
    from clipfast.artifact.selfcheck import load_golden

    m = load_manifest(art)
    m.spec.golden.file = "../golden.npz"
    np.savez(tmp_path / "golden.npz", a=np.zeros(2))
    with pytest.raises(ArtifactError, match="leaves the artifact directory"):
        load_golden(m)


# -- malformed manifests -------------------------------------------------------------------------
def _del(*keys):
    def edit(d):
        target = d
        for k in keys[:-1]:
            target = target[k]
        del target[keys[-1]]
    return edit


def _set(value, *keys):
    def edit(d):
        target = d
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
    return edit


@pytest.mark.parametrize("edit, match", [
    (_set(["image.onnx"], "files"), "'files' must be an object"),
    (_set(None, "files"), "'files' must be an object"),
    (_del("files", "image.onnx", "bytes"), r"files\['image.onnx'\] lacks 'bytes'"),
    (_del("files", "text.onnx", "sha256"), r"files\['text.onnx'\] lacks 'sha256'"),
    (_set("12", "files", "image.onnx", "bytes"), r"files\['image.onnx'\].bytes"),
    (_set(True, "files", "image.onnx", "bytes"), r"files\['image.onnx'\].bytes"),
    (_set(7, "files", "image.onnx", "sha256"), r"files\['image.onnx'\].sha256"),
    (_set("abc", "files", "image.onnx"), r"files\['image.onnx'\] must be an object"),
    (_del("image", "file"), "'image' section lacks 'file'"),
    (_del("text", "file"), "'text' section lacks 'file'"),
    (_set(3, "text", "file"), "text.file must be a string"),
    (_set(["image.onnx"], "image", "file"), "image.file must be a string"),
    (_set("image.onnx", "image"), "'image' must be an object"),
    (_set([], "tokenizer"), "'tokenizer' must be an object"),
    (_set(5, "tokenizer", "file"), "tokenizer.file must be a string"),
    (_set("x", "embed_dim"), "'embed_dim' must be a positive integer"),
    (_set(None, "precision"), "'precision' must be a string"),
    (_set("4", "image", "shape"), "image.shape"),
    (_set("x", "text", "inputs"), "text.inputs"),
    (_set(["x", 1], "golden"), "'golden' must be an object"),
    (_set({"images": 8}, "golden"), "'golden' must be an object with a 'file'"),
    (_set([], "gates"), "'gates' must be an object"),
    (_del("logits"), "missing keys"),
    (_set(2, "format_version"), "format_version"),
])
def test_a_malformed_manifest_names_the_field(art, edit, match):
    rewrite(art, edit)
    with pytest.raises(ArtifactError, match=match):
        load_manifest(art)


def test_the_cli_reports_a_malformed_manifest_without_a_traceback(art, capsys):
    from clipfast.cli import main

    rewrite(art, _set(["image.onnx"], "files"))
    assert main(["info", str(art)]) == 1
    assert "'files' must be an object" in capsys.readouterr().err


# -- external data of the tower graphs -----------------------------------------------------------
def _external_artifact(art: Path) -> Path:
    (art / "image.onnx").unlink()
    tiny_graph(art / "image.onnx", external="image.onnx.data")
    assert (art / "image.onnx.data").is_file()
    return art


def test_listed_external_data_loads_and_runs(art):
    import onnxruntime as ort

    write_manifest(_external_artifact(art), base_data(), [*FILES, "image.onnx.data"])
    m = load_manifest(art)
    session = ort.InferenceSession(str(m.path("image.onnx")), providers=["CPUExecutionProvider"])
    x = np.ones((1, 4), np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0],
                               x @ np.arange(16, dtype=np.float32).reshape(4, 4))


def test_unlisted_external_data_is_refused(art):
    write_manifest(_external_artifact(art), base_data(), FILES)
    with pytest.raises(ArtifactError, match="image graph external data 'image.onnx.data' is not "
                                            "listed"):
        load_manifest(art, verify_checksums=False)


def _relocate(onnx_path: Path, location: str) -> None:
    """Point every external-data reference of the graph at ``location`` (bytes edited in place,
    no data written)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    onnx_path.write_bytes(model.SerializeToString())


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_external_data_outside_the_directory_is_refused(art, tmp_path, how):
    _external_artifact(art)
    outside = tmp_path / "stolen.data"
    shutil.move(art / "image.onnx.data", outside)
    if how == "symlink":
        (art / "image.onnx.data").symlink_to(outside)
    else:
        _relocate(art / "image.onnx", "../stolen.data" if how == "dotdot" else str(outside))
    write_manifest(art, base_data(), FILES)
    with pytest.raises(ArtifactError, match="outside the artifact directory|absolute path"):
        load_manifest(art)


def test_external_data_reader_finds_every_tensor_kind(tmp_path):
    """Initializers, sparse initializers, node attribute tensors, subgraphs and functions: the
    wire-format reader finds the same locations as the onnx package does."""
    from onnx.external_data_helper import _get_all_tensors

    def ext(t, location):
        t.data_location = TensorProto.EXTERNAL
        t.ClearField("raw_data")
        for k, v in (("location", location), ("offset", "0"), ("length", "64")):
            e = t.external_data.add()
            e.key, e.value = k, v
        return t

    ones = np.ones((4, 4), np.float32)
    then = helper.make_graph([helper.make_node("Identity", ["S"], ["o"])], "then", [],
                             [helper.make_tensor_value_info("o", TensorProto.FLOAT, [4, 4])],
                             [ext(numpy_helper.from_array(ones, "S"), "sub.data")])
    const = helper.make_node("Constant", [], ["c"],
                             value=ext(numpy_helper.from_array(ones, "C"), "attr.data"))
    cond = helper.make_node("If", ["b"], ["r"], then_branch=then, else_branch=then)
    sparse = helper.make_sparse_tensor(
        ext(numpy_helper.from_array(np.ones(2, np.float32), "sv"), "sparse.data"),
        numpy_helper.from_array(np.array([0, 1], np.int64), "si"), [4])
    graph = helper.make_graph(
        [const, cond], "g", [helper.make_tensor_value_info("b", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, [4, 4])],
        [ext(numpy_helper.from_array(ones, "W"), "init.data")], sparse_initializer=[sparse])
    fn_node = helper.make_node("Constant", [], ["k"],
                               value=ext(numpy_helper.from_array(ones, "K"), "function.data"))
    fn = helper.make_function("custom", "F", [], ["k"], [fn_node],
                              [helper.make_opsetid("", 17)])
    model = helper.make_model(graph, functions=[fn], opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    found = onnx_external_data(path)
    assert found == ["attr.data", "function.data", "init.data", "sparse.data", "sub.data"]
    by_onnx = {e.value for t in _get_all_tensors(model) for e in t.external_data
               if e.key == "location"}
    assert by_onnx <= set(found)


def test_a_tower_that_is_not_onnx_is_an_artifact_error(art):
    (art / "image.onnx").write_bytes(b"\xff" * 64)
    write_manifest(art, base_data(), FILES)
    with pytest.raises(ArtifactError, match="not a readable ONNX model"):
        load_manifest(art)


def test_a_fifo_or_directory_listed_as_a_file_is_refused(art):
    (art / "image.onnx").unlink()
    (art / "image.onnx").mkdir()
    rewrite(art, lambda d: None)
    with pytest.raises(ArtifactError, match="missing"):
        load_manifest(art)
    if hasattr(os, "mkfifo"):
        (art / "image.onnx").rmdir()
        os.mkfifo(art / "image.onnx")
        with pytest.raises(ArtifactError, match="missing"):
            load_manifest(art)
