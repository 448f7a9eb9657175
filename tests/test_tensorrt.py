"""TensorRT backend and engine builder: cache keys, engine lookup, planning, graph checks and the
install/fail-fast paths on CPU; engine builds against ONNX Runtime on a GPU with TensorRT."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from manifest_stub import stub_manifest

from clipfast.artifact.manifest import artifact_digest, load_manifest, write_manifest
from clipfast.backends.batching import BatchProfile, plan_rows
from clipfast.backends.tensorrt import backend as trt_backend
from clipfast.backends.tensorrt import build as tb
from clipfast.backends.tensorrt import cudart, graph_ops
from clipfast.errors import (
    ArtifactError,
    BackendUnavailable,
    ClipfastError,
    ExportError,
    InputError,
)

SHA = "ab" * 32
KEY = tb.EngineKey(tower="image", onnx_sha256=SHA, precision="fp16", io_dtype="fp32",
                   profile=BatchProfile(1, 64, 256), trt_version="10.8.0",
                   compute_capability=(8, 9))


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make ``import tensorrt`` fail as on a machine without it (whatever is installed)."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


# -- cache keys --------------------------------------------------------------------------------
def test_key_stem_names_every_field():
    stem = KEY.stem()
    assert stem == f"image.fp16-io32.b1-64-256.trt10.8.0.sm89.{SHA[:12]}"
    assert KEY.engine_name == stem + ".engine"
    assert KEY.sidecar_name == stem + ".json"
    assert tb.EngineKey.from_dict(KEY.as_dict()) == KEY
    assert KEY.as_dict()["compute_capability"] == "8.9"


@pytest.mark.parametrize("change", [
    {"trt_version": "10.9.0"}, {"compute_capability": (9, 0)}, {"precision": "int8"},
    {"profile": BatchProfile(1, 32, 256)}, {"profile": BatchProfile(2, 64, 256)},
    {"onnx_sha256": "cd" * 32}, {"tower": "text"}, {"io_dtype": "fp16"},
])
def test_key_differs_by_each_field(change):
    other = dataclasses.replace(KEY, **change)
    assert other.stem() != KEY.stem()
    assert other.engine_name != KEY.engine_name
    assert len(other.differences(KEY)) == 1


def test_engine_key_from_manifest_uses_tower_checksum():
    m = stub_manifest("/nonexistent", {
        "precision": "int8", "io_dtype": "fp32",
        "image": {"file": "image.onnx", "shape": [3, 8, 8]},
        "files": {"image.onnx": {"sha256": SHA, "bytes": 1}}})
    key = tb.engine_key(m, "image", BatchProfile(1, 8, 16), "11.1.0", (12, 0))
    assert key.onnx_sha256 == SHA and key.precision == "int8"
    assert key.stem() == f"image.int8-io32.b1-8-16.trt11.1.0.sm120.{SHA[:12]}"
    m.spec.files = {}
    with pytest.raises(ArtifactError, match="no checksum for image.onnx"):
        tb.engine_key(m, "image", BatchProfile(), "11.1.0", (12, 0))


def test_timing_cache_per_version_and_gpu(tmp_path):
    a = tb.timing_cache_path(tmp_path, "10.8.0", (8, 9))
    assert a.name == "timing.trt10.8.0.sm89.cache"
    assert a != tb.timing_cache_path(tmp_path, "10.8.0", (9, 0))
    assert a != tb.timing_cache_path(tmp_path, "11.0.0", (8, 9))


# -- engine lookup -----------------------------------------------------------------------------
def _write_engine(directory: Path, key: tb.EngineKey, data: bytes = b"plan", *,
                  sidecar_key: tb.EngineKey | None = None, size: int | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / key.engine_name).write_bytes(data)
    side = {"key": (sidecar_key or key).as_dict(), "engine": key.engine_name,
            "engine_bytes": len(data) if size is None else size}
    (directory / key.sidecar_name).write_text(json.dumps(side))
    return directory / key.engine_name


def test_sidecar_from_another_gpu_and_version_is_rejected_naming_both_values():
    other = dataclasses.replace(KEY, trt_version="10.3.0", compute_capability=(8, 0))
    reason = tb.check_sidecar({"key": other.as_dict()}, KEY)
    assert reason is not None
    assert "TensorRT version: engine has 10.3.0, wanted 10.8.0" in reason
    assert "GPU compute capability: engine has 8.0, wanted 8.9" in reason
    assert tb.check_sidecar({"key": KEY.as_dict()}, KEY) is None


def test_find_engine_exact_match(tmp_path):
    path = _write_engine(tmp_path, KEY)
    lookup = tb.find_engine(tmp_path, KEY)
    assert lookup.path == path and lookup.reason is None


def test_find_engine_reports_engines_built_elsewhere(tmp_path):
    elsewhere = dataclasses.replace(KEY, compute_capability=(8, 0), trt_version="10.3.0")
    _write_engine(tmp_path, elsewhere)
    lookup = tb.find_engine(tmp_path, KEY)
    assert lookup.path is None
    assert KEY.engine_name in lookup.reason
    [(stem, why)] = lookup.found
    assert stem == elsewhere.stem()
    assert "engine has 8.0, wanted 8.9" in why and "engine has 10.3.0, wanted 10.8.0" in why


def test_find_engine_rejects_a_renamed_foreign_engine(tmp_path):
    # a plan copied under this machine's file name: the sidecar still tells where it was built
    foreign = dataclasses.replace(KEY, compute_capability=(7, 5))
    _write_engine(tmp_path, KEY, sidecar_key=foreign)
    lookup = tb.find_engine(tmp_path, KEY)
    assert lookup.path is None
    assert "GPU compute capability: engine has 7.5, wanted 8.9" in lookup.reason


def test_find_engine_rejects_truncated_or_orphan_engines(tmp_path):
    _write_engine(tmp_path, KEY, b"plan", size=1000)
    assert "truncated or replaced" in tb.find_engine(tmp_path, KEY).reason
    (tmp_path / KEY.sidecar_name).unlink()
    assert "no readable sidecar" in tb.find_engine(tmp_path, KEY).reason
    assert "no engine" in tb.find_engine(tmp_path / "empty", KEY).reason


# -- cache location and manifest record --------------------------------------------------------
def _fake_artifact(directory: Path, *, contrib: bool = False,
                   graph: dict | None = None) -> Path:
    """A loadable artifact whose towers are tiny ONNX graphs (no export needed); ``graph`` is
    its manifest's ``graph`` section (none recorded by default, as an older export)."""
    directory.mkdir(parents=True)
    _tiny_graph(directory / "image.onnx", contrib=contrib)
    _tiny_graph(directory / "text.onnx")
    (directory / "tokenizer.json").write_text("{}")
    data = {"source": {"model": "tiny"}, "family": "clip", "embed_dim": 4, "precision": "fp32",
            "io_dtype": "fp32",
            "image": {"file": "image.onnx", "input": "x", "output": "y", "shape": [4],
                      "dtype": "float32"},
            "text": {"file": "text.onnx", "inputs": ["x"], "output": "y", "dtype": "int32"},
            "preprocess": {"image_size": [2, 2]},
            "tokenizer": {"kind": "hf", "context_length": 4},
            "logits": {"kind": "softmax", "scale": 1.0},
            "graph": graph or {}}
    write_manifest(directory, data, ["image.onnx", "text.onnx", "tokenizer.json"])
    return directory


def test_cache_dir_inside_a_writable_artifact(tmp_path):
    m = load_manifest(_fake_artifact(tmp_path / "art"))
    assert tb.engine_cache_dir(m) == tmp_path / "art" / "tensorrt"
    assert tb.engine_cache_dir(m, tmp_path / "mine") == tmp_path / "mine"


def test_cache_dir_of_a_read_only_artifact(tmp_path, monkeypatch):
    art = _fake_artifact(tmp_path / "art")
    m = load_manifest(art)
    real_access = os.access
    # os.access, not chmod: the tests may run as root, for whom nothing is read-only
    monkeypatch.setattr(tb.os, "access",
                        lambda p, mode: False if str(p).startswith(str(art)) else
                        real_access(p, mode))
    monkeypatch.setenv("CLIPFAST_CACHE_DIR", str(tmp_path / "cache"))
    where = tb.engine_cache_dir(m)
    # one rule with the ONNX Runtime TensorRT EP cache: <root>/<artifact digest>/<purpose>
    assert where == tmp_path / "cache" / artifact_digest(m) / "tensorrt"
    assert where.is_dir() and len(artifact_digest(m)) == 16
    monkeypatch.delenv("CLIPFAST_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tb.engine_cache_dir(m) == (tmp_path / "home" / ".cache" / "clipfast"
                                      / artifact_digest(m) / "tensorrt")
    monkeypatch.setenv("CLIPFAST_CACHE_DIR", "/proc/no-such-dir")
    with pytest.raises(ClipfastError, match="no writable tensorrt cache.*CLIPFAST_CACHE_DIR.*"
                                            "--cache-dir"):
        tb.engine_cache_dir(m)


def test_record_in_manifest_keeps_files_and_checksums(tmp_path):
    art = _fake_artifact(tmp_path / "art")
    raw = json.loads((art / "manifest.json").read_text())
    section = tb.tensorrt_section(BatchProfile(1, 8, 16), art / "tensorrt", art, {"image": KEY})
    assert tb.record_in_manifest(art, section)
    m = load_manifest(art)  # checksums still verify
    assert m.spec.files == raw["files"]
    assert m.spec.tensorrt.profile == {"min": 1, "opt": 8, "max": 16}
    assert m.spec.tensorrt.cache == "tensorrt"
    assert m.spec.tensorrt.engines["image"].key == KEY.stem()
    # the rewrite adds the section and changes nothing else
    after = json.loads((art / "manifest.json").read_text())
    assert after.pop("tensorrt") == section and after == raw


# -- profiles and options ----------------------------------------------------------------------
def test_profile_validation():
    assert tb.profile_from(None) == BatchProfile(1, 64, 256)
    assert tb.profile_from({"min": 2, "opt": 4, "max": 8}) == BatchProfile(2, 4, 8)
    with pytest.raises(ClipfastError, match="min <= opt <= max"):
        tb.profile_from({"min": 8, "opt": 4, "max": 16})
    with pytest.raises(ClipfastError, match="--max-batch 0 must be an integer of at least 1"):
        tb.profile_from({"min": 1, "opt": 1, "max": 0})
    with pytest.raises(ClipfastError, match=r"unknown keys \['maximum'\]"):
        tb.profile_from({"min": 1, "opt": 1, "maximum": 4})
    assert tb.profile_from([1, 2, 3]) == BatchProfile(1, 2, 3)
    with pytest.raises(ClipfastError, match="expected a BatchProfile"):
        tb.profile_from("1,2,3")


def test_backend_option_validation():
    profile, cache, build, graphs = trt_backend.parse_options(
        profile={"min": 1, "opt": 2, "max": 4}, cache_dir="/tmp/x", build="never",
        cuda_graphs=False)
    assert profile == BatchProfile(1, 2, 4) and cache == Path("/tmp/x")
    assert (build, graphs) == ("never", False)
    assert trt_backend.parse_options() == (BatchProfile(), None, "missing", True)
    assert trt_backend.parse_options(cuda_graphs=None)[3] is True  # the default, as for torch
    with pytest.raises(ClipfastError, match="build='always'"):
        trt_backend.parse_options(build="always")
    with pytest.raises(ClipfastError, match="cuda_graphs='yes'"):
        trt_backend.parse_options(cuda_graphs="yes")
    with pytest.raises(InputError, match=r"cache_dir=5: expected a folder path"):
        trt_backend.parse_options(cache_dir=5)
    with pytest.raises(InputError, match=r"backend option profile=\(4, 2, 1\)"):
        trt_backend.parse_options(profile=(4, 2, 1))


# -- planning ----------------------------------------------------------------------------------
def _plan(n, profile):
    """The batch planner as the TensorRT pipeline calls it."""
    return plan_rows(n, profile.max, profile.buckets())


def test_plan_chunks_splits_at_max_and_pads_to_buckets():
    p = BatchProfile(1, 64, 256)
    plan = _plan(300, p)
    assert [(c.start, c.stop, c.bucket) for c in plan] == [(0, 256, 256), (256, 300, 64)]
    assert [c.bucket for c in _plan(5, p)] == [8]
    assert [c.bucket for c in _plan(1, p)] == [1]
    assert _plan(0, p) == []
    # min above 1: small requests pad to min; a non-power-of-two opt is a bucket of its own
    assert [c.bucket for c in _plan(3, BatchProfile(8, 48, 100))] == [8]
    assert [c.bucket for c in _plan(40, BatchProfile(8, 48, 100))] == [48]
    assert [c.bucket for c in _plan(250, BatchProfile(8, 48, 100))] == [
        100, 100, 64]


@pytest.mark.parametrize("n", [1, 2, 7, 63, 64, 65, 255, 256, 257, 769, 1000])
def test_plan_chunks_cover_every_row_once(n):
    p = BatchProfile(1, 64, 256)
    plan = _plan(n, p)
    rows = np.concatenate([np.arange(c.start, c.stop) for c in plan])
    assert np.array_equal(rows, np.arange(n))
    for c in plan:
        assert c.rows <= c.bucket <= p.max and c.bucket in p.buckets()
        assert c.bucket < 2 * c.rows or c.bucket == p.min  # at most 2x padding


def test_stage_rows_pads_with_zeros_in_place():
    dst = np.full((8, 3, 2), 7.0, dtype=np.float16)
    src = np.arange(18, dtype=np.float32).reshape(3, 3, 2)
    staged = trt_backend.stage_rows(dst, src, 4)
    assert staged.shape == (4, 3, 2) and np.shares_memory(staged, dst)
    assert np.array_equal(staged[:3], src.astype(np.float16))
    assert not staged[3].any()
    assert (dst[4:] == 7).all()  # rows past the bucket are not touched
    with pytest.raises(ClipfastError, match="cannot stage 3 rows as a batch of 2"):
        trt_backend.stage_rows(dst, src, 2)
    with pytest.raises(ClipfastError, match="do not fit"):
        trt_backend.stage_rows(dst, np.zeros((2, 4, 2), np.float32), 2)


# -- graphs TensorRT cannot parse --------------------------------------------------------------
def _tiny_graph(path: Path, *, contrib: bool = False, nested: bool = False) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    if contrib:
        bias = helper.make_tensor("b", TensorProto.FLOAT, [4], [0.0] * 4)
        node = helper.make_node("BiasGelu", ["x", "b"], ["y"], domain="com.microsoft")
        graph = helper.make_graph([node], "g", [x], [y], [bias])
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    elif nested:
        inner_out = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4])
        inner = helper.make_graph(
            [helper.make_node("QuickGelu", ["x"], ["z"], domain="com.microsoft")], "then", [],
            [inner_out])
        plain = helper.make_graph([helper.make_node("Relu", ["x"], ["z"])], "else", [],
                                  [inner_out])
        cond = helper.make_tensor("c", TensorProto.BOOL, [], [True])
        node = helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=plain)
        graph = helper.make_graph([node], "g", [x], [y], [cond])
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    else:
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
        opsets = [helper.make_opsetid("", 17)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def test_has_contrib_ops(tmp_path):
    plain = _tiny_graph(tmp_path / "plain.onnx")
    fused = _tiny_graph(tmp_path / "fused.onnx", contrib=True)
    nested = _tiny_graph(tmp_path / "nested.onnx", nested=True)
    assert graph_ops.has_contrib_ops(plain) is False and graph_ops.contrib_ops(plain) == []
    assert graph_ops.has_contrib_ops(fused) is True
    assert graph_ops.contrib_ops(fused) == ["com.microsoft:BiasGelu"]
    assert graph_ops.contrib_ops(nested) == ["com.microsoft:QuickGelu"]  # inside an If branch
    msg = graph_ops.contrib_ops_message("image", fused, graph_ops.contrib_ops(fused))
    assert "com.microsoft:BiasGelu" in msg and "--tensorrt" in msg and "--no-fuse" in msg
    with pytest.raises(ArtifactError, match="not found"):
        graph_ops.contrib_ops(tmp_path / "missing.onnx")


@pytest.fixture
def no_gpu_build(monkeypatch, tmp_path):
    """``ensure_engine`` without TensorRT or a GPU: stand-ins for the tensorrt module, the CUDA
    device queries and the builder; returns the list of builds asked for."""
    builds = []

    def build_engine(onnx_path, key, cache_dir, **_):
        builds.append(key.tower)
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        path = Path(cache_dir) / key.engine_name
        path.write_bytes(b"plan")
        return path

    monkeypatch.setattr(tb, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.8.0"))
    monkeypatch.setattr(tb, "build_engine", build_engine)
    monkeypatch.setattr(cudart, "no_device_reason", lambda: None)
    monkeypatch.setattr(cudart, "compute_capability", lambda device=None: (8, 9))
    monkeypatch.setattr(cudart, "device_name", lambda device=None: "stand-in GPU")
    return builds


def test_builder_reads_contrib_ops_from_the_manifest_without_onnx(tmp_path, monkeypatch,
                                                                   no_gpu_build):
    art = _fake_artifact(tmp_path / "art", contrib=True, graph={
        "image": {"contrib_ops": ["BiasGelu"]}, "text": {"contrib_ops": []}})
    m = load_manifest(art)
    monkeypatch.setitem(sys.modules, "onnx", None)  # a clipfast[tensorrt] install has no onnx
    assert tb.tower_contrib_ops(m, "image") == ["BiasGelu"]
    with pytest.raises(BackendUnavailable, match=r"BiasGelu.*--tensorrt"):
        tb.ensure_engine(m, "image", BatchProfile(1, 2, 4), tmp_path / "engines")
    path, key, built = tb.ensure_engine(m, "text", BatchProfile(1, 2, 4), tmp_path / "engines")
    assert built and path.name == key.engine_name and no_gpu_build == ["text"]


def test_builder_reads_an_older_manifests_graph_with_onnx(tmp_path, no_gpu_build):
    m = load_manifest(_fake_artifact(tmp_path / "art", contrib=True))
    assert graph_ops.recorded_contrib_ops(m, "image") is None
    with pytest.raises(BackendUnavailable, match="com.microsoft:BiasGelu"):
        tb.ensure_engine(m, "image", BatchProfile(1, 2, 4), tmp_path / "engines")
    tb.ensure_engine(m, "text", BatchProfile(1, 2, 4), tmp_path / "engines")
    assert no_gpu_build == ["text"]


def test_builder_without_the_record_or_onnx_says_to_re_export(tmp_path, monkeypatch,
                                                             no_gpu_build):
    m = load_manifest(_fake_artifact(tmp_path / "art"))
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(BackendUnavailable, match=r"graph\.text\.contrib_ops.*re-export the "
                                                 r"artifact"):
        tb.ensure_engine(m, "text", BatchProfile(1, 2, 4), tmp_path / "engines")
    assert no_gpu_build == []


def test_a_malformed_contrib_ops_record_is_an_artifact_error(tmp_path):
    # refused when the manifest loads, before any backend reads the record
    art = _fake_artifact(tmp_path / "art", graph={"image": {"contrib_ops": "BiasGelu"}})
    with pytest.raises(ArtifactError, match="graph.image.contrib_ops must be a list"):
        load_manifest(art)


# -- TensorRT API glue, with stand-ins for the tensorrt module ---------------------------------
def test_network_flags_by_tensorrt_version():
    made = []
    builder = types.SimpleNamespace(create_network=lambda flags: made.append(flags) or flags)
    flag_enum = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt10 = types.SimpleNamespace(__version__="10.8.0.43", NetworkDefinitionCreationFlag=flag_enum)
    trt11 = types.SimpleNamespace(__version__="11.1.0", NetworkDefinitionCreationFlag=flag_enum)
    tb.create_network(trt10, builder)
    tb.create_network(trt11, builder)
    assert made == [1 << 1, 0]  # 10: opt in to strong typing; 11: always on, flag ignored


def test_logger_keeps_errors_for_the_build_message():
    class ILogger:
        def __init__(self):
            pass

    logger = tb.capturing_logger(types.SimpleNamespace(ILogger=ILogger))
    logger.log(1, "[graphShapeAnalyzer] /visual/blocks.3/MatMul: dimensions mismatch")
    logger.log(2, "weights are not fp16-representable")
    logger.log(3, "some info")
    assert logger.errors() == ["[graphShapeAnalyzer] /visual/blocks.3/MatMul: dimensions mismatch"]
    assert len(logger.messages) == 2
    since = logger.mark()
    logger.log(0, "Error Code 10: could not find any implementation for node /text/Gather_2")
    assert logger.errors(since) == [
        "Error Code 10: could not find any implementation for node /text/Gather_2"]


def test_parser_errors_name_the_node():
    err = types.SimpleNamespace(node=lambda: 12, node_name=lambda: "/visual/Attention_3",
                                node_operator=lambda: "Attention",
                                desc=lambda: "No importer registered for op: Attention",
                                code=lambda: "UNSUPPORTED_NODE")
    parser = types.SimpleNamespace(num_errors=1, get_error=lambda i: err)
    text = tb.parser_errors(parser)
    assert text == ("node 12 '/visual/Attention_3' (Attention): No importer registered for op: "
                    "Attention [UNSUPPORTED_NODE]")


# -- without TensorRT / cuda-python ------------------------------------------------------------
def test_load_without_tensorrt_says_how_to_install(no_tensorrt):
    with pytest.raises(BackendUnavailable, match=r"pip install clipfast\[tensorrt\]"):
        trt_backend.load(stub_manifest("/nonexistent", {}), device="cuda")
    assert "TensorRT is not importable" in tb.unavailable_reason()


def test_cudart_without_cuda_python(monkeypatch):
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(cudart, "_runtime", None)
    with pytest.raises(BackendUnavailable, match=r"cuda-python.*pip install clipfast\[tensorrt\]"):
        cudart.runtime()


def test_export_tensorrt_fails_fast_without_creating_anything(tmp_path, no_tensorrt):
    from clipfast.export.pipeline import ExportOptions, run_export

    out = tmp_path / "art"
    with pytest.raises(ExportError, match=r"--tensorrt .*pip install clipfast\[tensorrt\]"):
        run_export(ExportOptions(model="ViT-B-32", pretrained="none", out=out, tensorrt=True,
                                 progress=False))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no half-written work directory either


def test_export_options_tensorrt_rules():
    from clipfast.export.pipeline import ExportOptions

    opts = ExportOptions(model="m", out=Path("o"), tensorrt=True)
    assert opts.fuse and not opts.fuse_graphs
    with pytest.raises(ExportError, match="only applies with --tensorrt"):
        ExportOptions(model="m", out=Path("o"), batch_profile=BatchProfile()).validate()
    with pytest.raises(ExportError, match="--int8-method static"):
        ExportOptions(model="m", out=Path("o"), precision="int8", int8_method="dynamic",
                      tensorrt=True).validate()


# -- command line ------------------------------------------------------------------------------
def test_cli_accepts_the_tensorrt_flags():
    from clipfast.cli import _batch_profile, build_parser

    args = build_parser().parse_args(["export", "--model", "ViT-B-32", "--out", "o",
                                      "--tensorrt", "--min-batch", "2", "--opt-batch", "8",
                                      "--max-batch", "32"])
    assert args.tensorrt and _batch_profile(args, True) == BatchProfile(2, 8, 32)
    args = build_parser().parse_args(["build-engines", "art", "--max-batch", "512",
                                      "--cache-dir", "c", "--rebuild"])
    assert (args.artifact, args.cache_dir, args.rebuild) == ("art", "c", True)
    assert _batch_profile(args, True) == BatchProfile(1, 64, 512)
    args = build_parser().parse_args(["export", "--model", "m", "--out", "o"])
    assert not args.tensorrt and _batch_profile(args, False) is None


def test_cli_export_tensorrt_fails_fast(tmp_path, capsys, no_tensorrt):
    from clipfast.cli import main

    out = tmp_path / "art"
    rc = main(["export", "--model", "ViT-B-32", "--pretrained", "none", "--out", str(out),
               "--tensorrt", "--quiet"])
    assert rc == 1
    assert "pip install clipfast[tensorrt]" in capsys.readouterr().err
    assert not out.exists()


def test_cli_profile_errors(tmp_path, capsys):
    from clipfast.cli import main

    rc = main(["export", "--model", "m", "--out", str(tmp_path / "o"), "--max-batch", "8"])
    assert rc == 1 and "only apply with --tensorrt" in capsys.readouterr().err
    rc = main(["export", "--model", "m", "--out", str(tmp_path / "o"), "--tensorrt",
               "--min-batch", "16", "--max-batch", "8"])
    assert rc == 1 and "min <= opt <= max" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_build_engines_without_tensorrt(tmp_path, capsys, no_tensorrt):
    from clipfast.cli import main

    art = _fake_artifact(tmp_path / "art")
    assert main(["build-engines", str(art)]) == 1
    err = capsys.readouterr().err
    assert "clipfast build-engines: error:" in err and "pip install clipfast[tensorrt]" in err
    assert not (art / "tensorrt").exists()
    assert main(["build-engines", str(tmp_path / "nothing")]) == 1
    assert "does not exist" in capsys.readouterr().err


# -- on a GPU with TensorRT --------------------------------------------------------------------
def _gpu_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT not installed"
    try:
        reason = cudart.no_device_reason()
    except BackendUnavailable:
        return "cuda-python not installed"
    return "no CUDA device" if reason else None


@pytest.fixture(scope="module")
def trt_artifact(tmp_path_factory):
    reason = _gpu_reason()
    if reason:
        pytest.skip(reason)
    from hf_models import save_clip

    from clipfast.export.pipeline import ExportOptions, run_export

    root = tmp_path_factory.mktemp("trt")
    src = save_clip(root / "src", size="small")
    return run_export(ExportOptions(model=f"transformers:{src}", pretrained=None,
                                    out=root / "art", tensorrt=True,
                                    batch_profile=BatchProfile(1, 4, 8), progress=False))


def _ort(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)[0].astype(np.float32)


@pytest.mark.gpu
def test_engine_matches_onnxruntime_within_the_gates(trt_artifact):
    from clipfast.artifact.fidelity import centred_relative_error, cosine

    m = load_manifest(trt_artifact)
    spec = m.spec
    assert spec.graph.image.fusion == graph_ops.FUSION_OFF_NOTE
    assert set(spec.tensorrt.engines) == {"image", "text"}
    assert not graph_ops.has_contrib_ops(m.path(spec.image.file))
    backend = trt_backend.load(m, device="cuda", profile={"min": 1, "opt": 4, "max": 8})
    gates = spec.gates.as_dict()
    rng = np.random.default_rng(0)
    # 13 rows: chunks of 8 and 5 (bucket 8), both slots of the pipeline in use
    pixels = rng.standard_normal((13, *spec.image.shape)).astype(np.float32)
    ref = _ort(m.path(spec.image.file), {spec.image.input: pixels})
    got = backend.run_image(pixels)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert centred_relative_error(got, ref).max() <= gates["image_centred_rel_error_max"]
    assert cosine(got, ref).min() >= gates["image_cosine_min"]
    # batches through one pipeline equal one call per batch; bucket replays equal first runs
    parts = backend.run_image_batches([pixels[:3], pixels[3:]])
    np.testing.assert_allclose(np.concatenate(parts), got, rtol=1e-5, atol=1e-5)
    length = spec.tokenizer.context_length
    ids = rng.integers(1, 1000, size=(11, length)).astype(np.int32)
    feed = {n: np.ones_like(ids) if "mask" in n else ids for n in spec.text.inputs}
    ref_t = _ort(m.path(spec.text.file), feed)
    got_t = backend.run_text(feed)
    assert centred_relative_error(got_t, ref_t).max() <= gates["text_centred_rel_error_max"]
    info = backend.describe()
    assert info["backend"] == "tensorrt" and info["profile"] == {"min": 1, "opt": 4, "max": 8}
    # one graph per bucket used: image 13 rows -> 8 + 5 (bucket 8), then 3 (4), 10 -> 8 + 2 (2);
    # text 11 rows -> 8 + 3 (4). Plain engines capture: a failure here is a regression.
    assert info["cuda_graphs"] == {
        "image": {"enabled": True, "captured_buckets": [2, 4, 8], "failures": {}},
        "text": {"enabled": True, "captured_buckets": [4, 8], "failures": {}}}
    backend.close()


@pytest.mark.gpu
def test_cached_engines_are_reused_and_never_mode_lists_keys(trt_artifact):
    m = load_manifest(trt_artifact)
    backend = trt_backend.load(m, device="cuda", profile={"min": 1, "opt": 4, "max": 8},
                               build="never", cuda_graphs=False)
    assert not any(e["built_now"] for e in backend.describe()["engines"].values())
    backend.close()
    with pytest.raises(BackendUnavailable, match=r"build='never'.*b1-4-16.*engines found: "
                                                 r".*b1-4-8"):
        trt_backend.load(m, device="cuda", profile={"min": 1, "opt": 4, "max": 16},
                         build="never")


# -- the two-slot pipeline, on CPU stand-ins for tensorrt and cudart ---------------------------
class _HostMem:
    """Device/pinned buffer stand-in: numpy memory, so every copy is a ctypes.memmove."""

    def __init__(self, nbytes):
        self._a = np.zeros(max(int(nbytes), 1), np.uint8)
        self.nbytes, self.ptr = int(nbytes), self._a.ctypes.data

    def array(self, dtype, shape):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return self._a[:n].view(dtype).reshape(shape)

    def close(self):
        pass


class _FakeCuda:
    """The subset of clipfast.backends.tensorrt.cudart the tower uses, asynchronous as a GPU is.

    Copies, memsets, engine runs and graph launches are queued on their stream, in order, and run
    only when the host waits: ``Stream.synchronize``, or ``Event.synchronize`` for the work
    queued before the event's ``record`` (``Stream.wait(event)`` queues that wait on another
    stream). So a host read that misses its wait sees stale memory, and a copy reads its source
    when it runs, not when it is queued (a staging buffer refilled too early is what gets sent).
    A capture records the stream's work into the graph instead of queueing it.
    ``event_waits=False`` makes ``Event.synchronize`` return at once: a removed wait.
    """

    def __init__(self, capture_fails=False, event_waits=True):
        import ctypes
        import itertools

        self.ctypes, self.capture_fails, self.event_waits = ctypes, capture_fails, event_waits
        self.launches = 0
        self.streams: dict[int, object] = {}
        handles = itertools.count(1)
        cuda = self

        class Stream:
            def __init__(self):
                self.handle = next(handles)
                self.queue: list = []
                self.queued = self.ran = 0
                self.capture: list | None = None
                cuda.streams[self.handle] = self

            def enqueue(self, fn):
                if self.capture is not None:
                    self.capture.append(fn)
                    return
                self.queue.append(fn)
                self.queued += 1

            def run_until(self, mark):
                while self.ran < mark:
                    fn = self.queue.pop(0)
                    self.ran += 1
                    fn()

            def synchronize(self):
                if self.capture is not None:
                    raise ClipfastError("cudaStreamSynchronize on a capturing stream")
                self.run_until(self.queued)

            def wait(self, event):
                stream, mark = event.stream, event.mark
                if stream is not None:
                    self.enqueue(lambda: stream.run_until(mark))

            def close(self):
                pass

        class Event:
            def __init__(self):
                self.stream, self.mark = None, 0

            def record(self, stream):
                self.stream, self.mark = stream, stream.queued

            def synchronize(self):
                if cuda.event_waits and self.stream is not None:
                    self.stream.run_until(self.mark)

            def close(self):
                pass

        class GraphExec:
            def __init__(self, graph):
                self.graph = graph

            def launch(self, stream):
                cuda.launches += 1
                for fn in self.graph:
                    stream.enqueue(fn)

            def close(self):
                pass

        self.Stream, self.Event, self.GraphExec = Stream, Event, GraphExec
        self.DeviceBuffer = self.PinnedBuffer = _HostMem

    def memcpy_htod_async(self, dst, src, n, stream):
        stream.enqueue(lambda: self.ctypes.memmove(dst, src, n))

    memcpy_dtoh_async = memcpy_dtod_async = memcpy_htod_async

    def memset_async(self, ptr, value, n, stream):
        stream.enqueue(lambda: self.ctypes.memset(ptr, value, n))

    def begin_capture(self, stream):
        stream.capture = []

    def end_capture(self, stream):
        graph, stream.capture = stream.capture, None
        if self.capture_fails:
            raise ClipfastError("cudaStreamEndCapture failed: operation not permitted")
        return graph

    def abort_capture(self, stream):
        stream.capture = None


def test_the_cuda_stand_in_runs_work_only_when_the_host_waits():
    cuda = _FakeCuda()
    a, b = cuda.Stream(), cuda.Stream()
    host, dev, back = _HostMem(8), _HostMem(8), _HostMem(8)
    host.array(np.float32, (2,))[:] = (1, 2)
    cuda.memcpy_htod_async(dev.ptr, host.ptr, 8, a)
    done = cuda.Event()
    done.record(a)
    host.array(np.float32, (2,))[:] = (3, 4)  # before the copy ran: the copy sends this
    cuda.memcpy_htod_async(dev.ptr, host.ptr, 4, a)  # queued after the record
    assert dev.array(np.float32, (2,)).tolist() == [0, 0]  # nothing ran yet
    done.synchronize()
    assert dev.array(np.float32, (2,)).tolist() == [3, 4] and a.queue  # the later copy waits
    b.wait(done)
    cuda.memcpy_dtoh_async(back.ptr, dev.ptr, 8, b)
    b.synchronize()
    assert back.array(np.float32, (2,)).tolist() == [3, 4]
    a.synchronize()
    assert not a.queue and not b.queue
    cuda.begin_capture(a)
    cuda.memset_async(dev.ptr, 0, 8, a)
    with pytest.raises(ClipfastError, match="capturing"):
        a.synchronize()
    graph = cuda.end_capture(a)
    assert len(graph) == 1 and dev.array(np.float32, (2,)).tolist() == [3, 4]
    cuda.GraphExec(graph).launch(a)
    a.synchronize()
    assert dev.array(np.float32, (2,)).tolist() == [0, 0] and cuda.launches == 1


def _fake_trt(cuda, dim_in=6, dim_out=3):
    """An engine whose output row is ``W @ input row``: any mix-up of rows, padding or
    addresses shows in the result."""
    import ctypes

    weights = np.arange(dim_out * dim_in, dtype=np.float32).reshape(dim_out, dim_in) / 10

    class Context:
        def __init__(self):
            self.addr, self.shape, self.runs = {}, None, 0

        def set_device_memory(self, ptr, size):
            self.memory = ptr

        def set_input_shape(self, name, shape):
            self.shape = shape
            return shape[0] <= 8

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr
            return True

        def _run(self):
            b = self.shape[0]
            x = np.ctypeslib.as_array(ctypes.cast(self.addr["x"], ctypes.POINTER(ctypes.c_float)),
                                      (b, dim_in))
            y = np.ctypeslib.as_array(ctypes.cast(self.addr["y"], ctypes.POINTER(ctypes.c_float)),
                                      (b, dim_out))
            y[:] = x @ weights.T
            self.runs += 1

        def execute_async_v3(self, stream_handle):
            cuda.streams[stream_handle].enqueue(self._run)  # captured while capturing
            return True

    class Engine:
        num_io_tensors = 2
        device_memory_size_v2 = 64

        def get_tensor_name(self, i):
            return ["x", "y"][i]

        def get_tensor_mode(self, name):
            return "in" if name == "x" else "out"

        def get_tensor_dtype(self, name):
            return np.float32

        def get_tensor_profile_shape(self, name, profile):
            return [(1, dim_in), (4, dim_in), (8, dim_in)]

        def get_tensor_shape(self, name):
            return (-1, dim_out)

        def create_execution_context(self, strategy):
            return Context()

    trt = types.SimpleNamespace(nptype=lambda t: t, TensorIOMode=types.SimpleNamespace(INPUT="in"),
                                ExecutionContextAllocationStrategy=types.SimpleNamespace(
                                    USER_MANAGED=2))
    runtime = types.SimpleNamespace(deserialize_cuda_engine=lambda data: Engine())
    return trt, runtime, weights


class _NoLog:
    def mark(self):
        return 0

    def errors(self, since=0):
        return []


def _run_pipeline(cuda, graphs):
    """Five requests (13, 3, 8, 1, 5 rows) and the first again through one tower on ``cuda``,
    each output checked against the engine's arithmetic; returns the tower."""
    trt, runtime, w = _fake_trt(cuda)
    tower = trt_backend.TowerRunner(trt, cuda, runtime, _NoLog(), b"plan", "image", ["x"], "y",
                                    BatchProfile(1, 4, 8), graphs)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, 6)).astype(np.float32) for n in (13, 3, 8, 1, 5)]
    outs = tower.run([{"x": b} for b in batches])
    for b, out in zip(batches, outs):
        assert out.dtype == np.float32 and out.shape == (len(b), 3)
        np.testing.assert_allclose(out, b @ w.T, rtol=1e-6)
    again = tower.run([{"x": batches[0]}])[0]  # every bucket now replays (or runs plainly)
    np.testing.assert_allclose(again, batches[0] @ w.T, rtol=1e-6)
    return tower


@pytest.mark.parametrize("graphs,capture_fails", [(True, False), (True, True), (False, False)])
def test_pipeline_chunks_pads_and_replays(graphs, capture_fails):
    cuda = _FakeCuda(capture_fails)
    tower = _run_pipeline(cuda, graphs)
    assert all(not slot.stream.queue for slot in tower.slots)  # every chunk was waited for
    # chunks in order: 8 + 5 (bucket 8), 3 (4), 8 (8), 1 (1), 5 (8); then 8 + 5 (8, 8) again,
    # alternating between the slots
    used = {(s, b) for s, slot in enumerate(tower.slots) for b in slot.contexts}
    assert used == {(0, 8), (0, 4), (0, 1), (1, 8)}
    captured = {(s, b) for s, slot in enumerate(tower.slots) for b, g in slot.graphs.items()
                if g is not None}
    if graphs and not capture_fails:
        assert captured == used and not tower.graph_failures
        # slot 1 replays bucket 8 twice in the first run, each slot once in the second
        assert cuda.launches == 4
    elif graphs:
        assert captured == set() and cuda.launches == 0
        assert sorted(tower.graph_failures) == [1, 4, 8]
        assert all(r.startswith(f"CUDA graph capture failed for batch {b}: ")
                   for b, r in tower.graph_failures.items())
    else:
        assert captured == set() and cuda.launches == 0 and not tower.graph_failures
    with pytest.raises(ClipfastError, match="do not fit"):
        tower.run([{"x": np.zeros((2, 5), np.float32)}])
    assert all(slot.pending is None for slot in tower.slots)


@pytest.mark.parametrize("graphs", [True, False])
def test_the_pipeline_test_catches_a_missing_wait(graphs):
    """Without the wait on a slot's completion event before its output is read (and its staging
    buffer refilled), the stand-in hands back stale rows and the pipeline test fails."""
    with pytest.raises(AssertionError):
        _run_pipeline(_FakeCuda(event_waits=False), graphs)
