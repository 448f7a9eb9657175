"""Precision plumbing: options and CLI flags, manifest contents, int8 integration with the
quantizer contract (calibration feeds, per-tower guard, refusal), ORT session settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clipfast
from clipfast.artifact.fidelity import GATES
from clipfast.errors import ClipfastError, ExportError, FidelityError


def _opts(tmp_path, **kw):
    from clipfast.export.pipeline import ExportOptions

    return ExportOptions(model="ViT-B-32", out=tmp_path / "a", **kw)


def test_options_refuse_bad_combinations(tmp_path):
    for kw, needle in (({"precision": "fp32", "io": "fp16"}, "--io fp16 needs --precision fp16"),
                       ({"precision": "int8", "io": "fp16"}, "--io fp16"),
                       ({"io": "bf16"}, "--io 'bf16'"),
                       ({"precision": "fp16", "calibration_images": tmp_path},
                        "only applies to --precision int8"),
                       ({"precision": "int8", "calibration_images": tmp_path / "nope"},
                        "not a directory"),
                       ({"precision": "int8", "int8_method": "weights"}, "--int8-method"),
                       ({"precision": "fp16", "int8_method": "dynamic"},
                        "only applies to --precision int8")):
        with pytest.raises(ExportError, match=needle):
            _opts(tmp_path, **kw).validate()
    _opts(tmp_path, precision="fp16", io="fp16").validate()


def test_cli_export_flags_reach_the_options(tmp_path, monkeypatch):
    import clipfast.export.pipeline as pipeline
    from clipfast.cli import main

    seen = {}

    def fake_run_export(options):
        seen["options"] = options
        raise ClipfastError("stop here")

    monkeypatch.setattr(pipeline, "run_export", fake_run_export)
    rc = main(["export", "--model", "ViT-B-32", "--pretrained", "none", "--precision", "int8",
               "--calibration-images", str(tmp_path), "--no-fuse", "--out", str(tmp_path / "o")])
    o = seen["options"]
    assert rc == 1 and o.precision == "int8" and o.io == "fp32" and o.fuse is False
    assert o.calibration_images == tmp_path and o.int8_method == "static"
    main(["export", "--model", "M", "--precision", "int8", "--int8-method", "dynamic",
          "--out", "x"])
    assert seen["options"].int8_method == "dynamic"
    main(["export", "--model", "M", "--precision", "fp16", "--io", "fp16", "--out", "x"])
    assert (seen["options"].precision, seen["options"].io, seen["options"].fuse) == (
        "fp16", "fp16", True)
    with pytest.raises(SystemExit):  # argparse refuses unknown precisions up front
        main(["export", "--model", "M", "--precision", "fp8", "--out", "x"])


def _graph_contrib_ops(path: Path) -> list[str]:
    """Op types of the graph at ``path`` outside the standard ONNX domain, read with onnx."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sorted({n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")})


def test_fp32_manifest_records_precision_graph_and_session(vitb32_artifact):
    m = json.loads((vitb32_artifact / "manifest.json").read_text())
    assert m["precision"] == "fp32" and m["io_dtype"] == "fp32" and m["gates"] == GATES["fp32"]
    assert set(m["graph"]) == {"image", "text"} and "quantization" not in m
    # the fused graphs' contrib operators, recorded so TensorRT's builder needs no onnx
    for tower in ("image", "text"):
        ops = m["graph"][tower]["contrib_ops"]
        assert "Attention" in ops and ops == _graph_contrib_ops(vitb32_artifact / f"{tower}.onnx")
    assert m["fidelity"]["retrieval_pairs"] == 24
    from clipfast.backends.onnxruntime import physical_cores

    engine = clipfast.Engine(vitb32_artifact, backend="onnxruntime")
    session = engine.describe()["session"]
    assert session["intra_op_threads"] == physical_cores() >= 1
    assert session["execution_mode"] == "sequential" and session["memory_arena"] is True


def _at_the_limit(gates: dict) -> dict:
    """Figures that meet every gate of ``gates`` exactly (the least that passes)."""
    figures = {}
    for key, limit in gates.items():
        if key.endswith(("_max", "_min")):
            figures[key[:-4]] = limit
        elif key == "pixel_max_levels":
            figures["pixel_levels"] = limit
        elif key == "token_ids_identical":
            figures[key] = True
        else:
            raise AssertionError(f"gate {key!r}: check_gates has no rule for it")
    return figures


@pytest.mark.parametrize("precision", sorted(GATES))
def test_every_declared_gate_is_enforced(precision):
    from clipfast.artifact.fidelity import check_gates

    gates = GATES[precision]
    passing = _at_the_limit(gates)
    assert check_gates(passing, gates) == []
    for key, limit in gates.items():
        figures = dict(passing)
        if key == "token_ids_identical":
            name, figures[key] = key, False
        else:
            name = "pixel_levels" if key == "pixel_max_levels" else key[:-4]
            step = abs(limit) * 1e-3 + 1e-9
            figures[name] = limit - step if key.endswith("_min") else limit + step
        failures = check_gates(figures, gates)
        assert len(failures) == 1, (key, failures)
        assert (name if name != "token_ids_identical" else "token ids") in failures[0]
        del figures[name]  # a figure that was not measured fails its gate too
        assert len(check_gates(figures, gates)) == 1, key


def test_gates_loosen_with_the_arithmetic():
    # whatever passes fp32's gates passes fp16's, and whatever passes fp16's passes int8's
    from clipfast.artifact.fidelity import check_gates

    for strict, loose in (("fp32", "fp16"), ("fp16", "int8")):
        shared = {k: GATES[strict][k] for k in GATES[loose] if k in GATES[strict]}
        assert check_gates(_at_the_limit(shared), {k: GATES[loose][k] for k in shared}) == []
    # the fp16 and int8 figures are not free to drift up to fp32 levels either
    assert GATES["fp32"]["image_centred_rel_error_max"] < GATES["fp16"][
        "image_centred_rel_error_max"] < GATES["int8"]["image_centred_rel_error_max"]


def _export_measuring_worse(monkeypatch, model: str, out: Path, gate: bool) -> Path:
    """An fp32 export whose measured image error is twice its gate."""
    import clipfast.export.verify as verify
    from clipfast.export.pipeline import ExportOptions, run_export

    real = verify.measure

    def measure(*args, **kwargs):
        figures = real(*args, **kwargs)
        figures["image_centred_rel_error"] = 2 * GATES["fp32"]["image_centred_rel_error_max"]
        return figures

    monkeypatch.setattr(verify, "measure", measure)
    return run_export(ExportOptions(model=model, out=out, gate=gate, progress=False))


def test_an_export_measuring_past_its_gate_is_refused(clip_small, tmp_path, monkeypatch):
    out = tmp_path / "a"
    with pytest.raises(FidelityError, match="image_centred_rel_error .* exceeds the gate"):
        _export_measuring_worse(monkeypatch, f"transformers:{clip_small}", out, gate=True)
    assert not out.exists()
    # --no-gate writes it, marked as failed
    art = _export_measuring_worse(monkeypatch, f"transformers:{clip_small}", out, gate=False)
    m = json.loads((art / "manifest.json").read_text())
    assert m["fidelity"]["passed"] is False


@pytest.fixture(scope="module")
def clip_small(tmp_path_factory):
    from hf_models import save_clip

    return save_clip(tmp_path_factory.mktemp("clip") / "clip-small", "small")


def test_calibration_inputs_from_a_directory_and_built_in(clip_small, tmp_path):
    from clipfast.export.pipeline import calibration_inputs
    from clipfast.export.sources import load_source

    source = load_source(f"transformers:{clip_small}")
    d = tmp_path / "cal"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(11):
        Image.fromarray(rng.integers(0, 256, (40 + i, 70, 3), dtype=np.uint8)).save(d / f"{i}.png")
    (d / "broken.jpg").write_bytes(b"not a jpeg")
    images, texts, info = calibration_inputs(source, d, batch=4)
    assert [f["pixel_values"].shape for f in images] == [(4, 3, 64, 64)] * 2 + [(3, 3, 64, 64)]
    assert all(f["pixel_values"].dtype == np.float32 for f in images)
    assert info["images"] == 11 and info["images_from"] == str(d)  # the broken file is skipped
    assert all(set(f) == {"input_ids"} and f["input_ids"].dtype == np.int32 for f in texts)
    assert sum(len(f["input_ids"]) for f in texts) == info["texts"] >= 24
    images, _, info = calibration_inputs(source)
    assert info["images"] == 32 and "built-in" in info["images_from"]


def _stub_quantizer(monkeypatch, calls, fail_tower=None):
    """Stand-ins for the quantizer's entry points honouring their contract: copy the fp32 graph,
    measure it once, and report (or refuse for ``fail_tower``, with its attempt records)."""
    import clipfast.export.quantize as mod

    def quantize_tower(fp32_path, out_path, calibration, *, options):
        shutil.copy(fp32_path, out_path)
        return {"method": "copy", "quantized_total": 0}

    def guarded_quantize(fp32_path, out_path, calibration, measure, gates, options):
        shutil.copy(fp32_path, out_path)
        figures = measure(Path(out_path))
        calls.append({"fp32": Path(fp32_path).name, "calibration": calibration,
                      "figures": figures, "gates": gates, "options": options})
        if fail_tower and Path(fp32_path).name.startswith(fail_tower):
            error = FidelityError("no configuration reached the gate")
            error.attempts = [{"attempt": 1, "config": options.describe(), "why": "requested",
                               "failures": ["image_cosine = 0.5 is below the gate 0.99"],
                               "options": options.to_dict(), "passed": False}]
            raise error
        return {"method": "copy", "quantized_total": 0, "attempts": [{"figures": figures}]}

    monkeypatch.setattr(mod, "quantize_tower", quantize_tower)
    monkeypatch.setattr(mod, "guarded_quantize", guarded_quantize)


@pytest.mark.parametrize("method, graphs", [("static", ("fp32", "fused")),
                                            ("dynamic", ("fused", "fused"))])
def test_int8_pipeline_follows_the_quantizer_contract(clip_small, tmp_path, monkeypatch,
                                                      method, graphs):
    from clipfast.export.pipeline import ExportOptions, run_export

    calls: list[dict] = []
    _stub_quantizer(monkeypatch, calls)
    art = run_export(ExportOptions(model=f"transformers:{clip_small}", out=tmp_path / "i8",
                                   precision="int8", int8_method=method, progress=False))
    m = json.loads((art / "manifest.json").read_text())
    assert m["precision"] == "int8" and m["gates"] == GATES["int8"]
    q = m["quantization"]
    assert q["image"]["method"] == "copy" and q["calibration"]["images"] == 32
    assert q["int8_method"] == method
    kinds = {"fp32": "plain", "fused": "fused"}
    assert (q["image_graph"], q["text_graph"]) == tuple(kinds[g] for g in graphs)
    image, text = calls
    # the portable int8 format: u8 activations, 7-bit weights (the same integers on every CPU)
    assert image["options"].int8_format == text["options"].int8_format == "portable"
    # static QDQ quantizes the plain fp32 image graph (a fused Attention has no static int8
    # form) and the fused text graph; dynamic the fused ones (QAttention)
    assert (image["fp32"], text["fp32"]) == (f"image.{graphs[0]}.onnx", f"text.{graphs[1]}.onnx")
    assert image["calibration"][0]["pixel_values"].shape[1:] == (3, 64, 64)
    assert text["calibration"][0]["input_ids"].dtype == np.int32
    # each tower is measured against the fp32 source on its own gates, with >= 20 pairs
    assert set(image["gates"]) == {"image_centred_rel_error_max", "image_cosine_min",
                                   "top1_agreement_min", "retrieval_pairs_min"}
    assert set(text["gates"]) == {"text_centred_rel_error_max", "text_cosine_min",
                                  "top1_agreement_min", "retrieval_pairs_min"}
    assert image["figures"]["retrieval_pairs"] == 24
    assert image["figures"]["image_centred_rel_error"] < 1e-4  # an fp32 copy: ~round-off
    assert text["figures"]["top1_agreement"] == 1.0
    assert m["fidelity"]["passed"] and m["fidelity"]["retrieval_pairs"] == 24
    for tower, kind in (("image", q["image_graph"]), ("text", q["text_graph"])):
        ops = m["graph"][tower]["contrib_ops"]
        assert ops == _graph_contrib_ops(art / f"{tower}.onnx")
        assert ("Attention" in ops) == (kind == "fused"), (tower, ops)


def test_int8_refusal_names_the_tower_and_leaves_nothing(clip_small, tmp_path, monkeypatch):
    from clipfast.export.pipeline import ExportOptions, run_export

    _stub_quantizer(monkeypatch, [], fail_tower="image")
    with pytest.raises(FidelityError, match="image tower") as info:
        run_export(ExportOptions(model=f"transformers:{clip_small}", out=tmp_path / "i8",
                                 precision="int8", progress=False))
    assert list(tmp_path.iterdir()) == []  # no artifact, no temporary directory left
    lines = str(info.value).splitlines()
    # readable: a header naming the host's CPU, one line per attempt (both graphs), advice
    assert "CPU" in lines[0] or "flags" in lines[0]
    attempts = [ln for ln in lines if ln.lstrip().startswith(("plain graph", "fused graph",
                                                              "attempt"))]
    assert len(attempts) == 2 and all("image_cosine = 0.5" in ln for ln in attempts)
    assert lines[-1].startswith("advice: ") and "fp16" in lines[-1]
    assert all(len(ln) < 400 for ln in lines)


def test_int8_export_with_the_real_quantizer(tmp_path):
    from hf_models import save_clip

    from clipfast.export.pipeline import ExportOptions, run_export

    # seed 1 here, seed 0 in test_int8_portable.py: the gate holds for more than one lucky seed
    src = save_clip(tmp_path / "clip-int8", "int8", seed=1)
    art = run_export(ExportOptions(model=f"transformers:{src}", out=tmp_path / "i8",
                                   precision="int8", progress=False))
    engine = clipfast.Engine(art, backend="onnxruntime")
    m = engine.manifest.spec
    assert m.fidelity["passed"] and m.fidelity["retrieval_pairs"] >= 20
    for tower in ("image", "text"):
        report = m.quantization.report(tower)
        assert report["attempts"][-1]["passed"] is True
        # the portable format, checked on the written weights
        assert report["int8_format"]["saturation_safe"] is True
    assert engine.self_check_figures["passed"] is True
    assert m.exported_on["isa"]
    assert engine.encode_texts(["a cat"]).shape == (1, engine.embed_dim)


def test_place_graph_keeps_external_weights_beside_the_graph(tmp_path):
    """Towers over 2 GiB carry external weights: moving one renames its data file with it."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from clipfast.export.pipeline import _place_graph

    w = np.arange(3 * 1024, dtype=np.float32).reshape(3, 1024)  # above onnx's 1 KiB threshold
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1024])],
        [numpy_helper.from_array(w, "w")])
    build = tmp_path / ".build"
    build.mkdir()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save_model(model,
                    str(build / "image.fused.onnx"), save_as_external_data=True,
                    location="image.fused.onnx.data", size_threshold=0)
    _place_graph(build / "image.fused.onnx", tmp_path / "image.onnx")
    shutil.rmtree(build)
    assert (tmp_path / "image.onnx.data").is_file()
    sess = ort.InferenceSession(str(tmp_path / "image.onnx"), providers=["CPUExecutionProvider"])
    x = np.ones((1, 3), np.float32)
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], x @ w)
