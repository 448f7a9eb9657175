"""fp16 graphs: overflow-prone operators stay fp32, fidelity gates on ViT-B-32 and ALIGN against
the PyTorch source through the Engine, `--io fp16`, and `clipfast verify` on an fp16 artifact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import clipfast
from clipfast.artifact.fidelity import (
    GATES,
    centred_relative_error,
    check_gates,
    cosine,
    l2_normalize,
)
from clipfast.errors import FidelityError

FP16 = GATES["fp16"]
# the embedding gates (pixels, token ids and rankings are what `measure` adds)
FP16_EMBED = {k: v for k, v in FP16.items() if k.startswith(("image_", "text_"))}


class _TwoNorms(torch.nn.Module):
    """One fp16 tensor read by two LayerNorms and a Softmax: the case where ORT's converter
    emits two identical Cast nodes (same name) unless they are de-duplicated."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)
        self.ln1 = torch.nn.LayerNorm(16)
        self.ln2 = torch.nn.LayerNorm(16)

    def forward(self, x):
        y = self.lin(x) * 300.0  # activations whose squares overflow fp16 (> 65504)
        return self.ln1(y) + self.ln2(y) + torch.softmax(y, dim=-1)


def _two_norms_graph(tmp_path):
    """``(module, input, path of its fp32 graph)`` for _TwoNorms."""
    torch.manual_seed(0)
    module = _TwoNorms().eval()
    x = torch.randn(3, 5, 16)
    src = tmp_path / "m.onnx"
    torch.onnx.export(module, (x,), str(src), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False)
    return module, x, src


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript")
@pytest.mark.parametrize("io", ["fp32", "fp16"])
def test_convert_keeps_norms_fp32_and_runs_on_cpu(tmp_path, io):
    import onnxruntime as ort

    from clipfast.export.fp16 import convert_to_fp16

    module, x, src = _two_norms_graph(tmp_path)
    report = convert_to_fp16(src, tmp_path / "m16.onnx", io=io)
    assert report["io_dtype"] == io and {"LayerNormalization", "Softmax"} <= set(report["fp32_ops"])
    model = onnx.load(str(tmp_path / "m16.onnx"))
    names = [n.name for n in model.graph.node]
    assert len(names) == len(set(names))
    elem = onnx.TensorProto.FLOAT16 if io == "fp16" else onnx.TensorProto.FLOAT
    assert model.graph.input[0].type.tensor_type.elem_type == elem
    # the LayerNorm scales stayed fp32: the norm is computed in fp32
    inits = {t.name: t.data_type for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "LayerNormalization":
            assert inits.get(node.input[1], onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT
    sess = ort.InferenceSession(str(tmp_path / "m16.onnx"), providers=["CPUExecutionProvider"])
    feed = x.numpy().astype(np.float16 if io == "fp16" else np.float32)
    got = sess.run(None, {"x": feed})[0].astype(np.float32)
    with torch.no_grad():
        ref = module(x).numpy()
    assert np.isfinite(got).all()  # an fp16 LayerNorm would give inf / NaN here
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()


def test_model_bytes_stands_in_for_protos_protobuf_cannot_size():
    """protobuf raises EncodeError sizing a message past 2 GiB; the initializers' payload stands in
    then. It is what dominates a tower's size, and never more than the serialised size."""
    from onnx import helper, numpy_helper

    from clipfast.export.onnx_files import model_bytes, payload_bytes

    w = numpy_helper.from_array(np.ones((256, 256), np.float32), "w")
    b = helper.make_tensor("b", onnx.TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])
    x, y = (helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 256]) for n in "xy")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y],
                              [w, b])
    model = helper.make_model(graph)
    assert model_bytes(model) == model.ByteSize()
    payload = payload_bytes(model)
    assert payload == 256 * 256 * 4 + 16 and payload <= model.ByteSize() < 1.01 * payload


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript")
def test_convert_past_the_protobuf_limit_types_through_files(tmp_path, monkeypatch):
    """A graph over the 2 GiB limit (a 250k-token multilingual embedding): onnx's in-memory
    shape inference cannot serialise it, so the types come from the path-based inference. The limit
    is lowered so a small graph takes that path, and the in-memory inference is made to fail."""
    import onnxruntime as ort
    import onnxruntime.transformers.float16 as ort_float16

    from clipfast.export import fp16 as fp16_mod

    module, x, src = _two_norms_graph(tmp_path)
    reference = tmp_path / "ref16.onnx"
    fp16_mod.convert_to_fp16(src, reference)

    def refuse(*_a, **_k):
        raise ValueError("Failed to serialize proto")  # what onnx says past 2 GiB

    monkeypatch.setattr(ort_float16, "infer_shapes", refuse)
    monkeypatch.setattr(fp16_mod, "PROTOBUF_LIMIT", 1024)
    out = tmp_path / "big16.onnx"
    report = fp16_mod.convert_to_fp16(src, out)
    assert {"LayerNormalization", "Softmax"} <= set(report["fp32_ops"])
    assert not list(tmp_path.glob("*.typed.onnx"))  # the typed copy is removed
    feed = {"x": x.numpy()}
    got, want = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feed)[0]
                 for p in (out, reference))
    np.testing.assert_array_equal(got, want)


def _engine_figures(engine, source, photos, texts):
    from clipfast.inputs.preprocess import load_image

    rgb = [load_image(p) for p in photos]
    pixels = np.stack([np.asarray(source.reference_transform(im), dtype=np.float32)
                       for im in rgb])
    tokens = source.reference_tokenize(texts)
    with torch.inference_mode():
        ref_img = source.image_tower(torch.from_numpy(pixels)).numpy()
        ref_txt = source.text_tower(*[torch.from_numpy(np.asarray(tokens[k], dtype=np.int32))
                                      for k in source.text_inputs]).numpy()
    img = engine.run_image_tower(pixels)
    txt = engine.run_text_tower(engine.tokenize(texts))
    img, txt, ref_img, ref_txt = map(l2_normalize, (img, txt, ref_img, ref_txt))
    return {
        "image_centred_rel_error": float(centred_relative_error(img, ref_img).max()),
        "image_cosine": float(cosine(img, ref_img).min()),
        "text_centred_rel_error": float(centred_relative_error(txt, ref_txt).max()),
        "text_cosine": float(cosine(txt, ref_txt).min()),
    }


_TEXTS = ["a photo of an astronaut", "a cat", "a cup of coffee", "a rocket launch",
          "a man with a camera", "", "中文 字符", "x" * 500]


# NOTE: ViT-B-32 exports take about a minute each, so these run on weight seed 0 only. Seeds 0-2
# measured alike: through `clipfast verify` on the photos, image centred error 1.3e-3 to 1.6e-3 and
# text 2.5e-3 to 2.6e-3 against the 1e-2 gates, cosines >= 0.9999996, top-1 agreement 1.0.
@pytest.fixture(scope="module")
def vitb32_fp16(tmp_path_factory):
    from clipfast.export.pipeline import ExportOptions, run_export

    out = tmp_path_factory.mktemp("fp16") / "vit-b-32-fp16"
    return run_export(ExportOptions(model="ViT-B-32", pretrained="none", out=out,
                                    precision="fp16", progress=False))


@pytest.mark.slow
def test_vitb32_fp16_manifest_and_graph(vitb32_fp16):
    m = json.loads((vitb32_fp16 / "manifest.json").read_text())
    assert m["precision"] == "fp16" and m["io_dtype"] == "fp32" and m["gates"] == FP16
    assert m["image"]["dtype"] == "float32" and m["text"]["output_dtype"] == "float32"
    fid = m["fidelity"]
    assert fid["passed"] is True and not check_gates(fid, FP16), fid
    assert fid["image_centred_rel_error"] > 1e-5  # it really is fp16 arithmetic
    for tower in ("image", "text"):
        g = m["graph"][tower]
        assert g["fused"]["Attention"] == 12  # fp16 is converted from the fused graph
        assert g["fp16"]["fp32_ops"] == ["LayerNormalization", "SkipLayerNormalization"]
        model = onnx.load(str(vitb32_fp16 / f"{tower}.onnx"), load_external_data=False)
        kinds = {t.data_type for t in model.graph.initializer if len(t.dims) == 2}
        assert onnx.TensorProto.FLOAT16 in kinds  # the weight matrices are fp16
    size16 = m["files"]["image.onnx"]["bytes"]
    assert size16 < 0.6 * 88e6 * 4  # half of the ~88M fp32 parameters' bytes, plus a little


@pytest.mark.slow
def test_vitb32_fp16_gates_on_photos_via_clipfast_verify(vitb32_fp16, photos, tmp_path):
    """Real photos (not the built-in set the export measured on): `clipfast verify` runs them
    through the Engine (onnxruntime, fp16 graphs) and the fp32 PyTorch source, and checks every
    fp16 gate stated in the manifest."""
    d = tmp_path / "photos"
    d.mkdir()
    for name, arr in photos.items():
        Image.fromarray(arr).save(d / f"{name}.png")
    r = subprocess.run([sys.executable, "-m", "clipfast.cli", "verify", str(vitb32_fp16),
                        "--images", str(d)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "precision fp16" in r.stdout and f"all {len(FP16)} gates passed" in r.stdout
    figures = dict(line.split(None, 1) for line in r.stdout.splitlines()[1:]
                   if line.startswith("  "))
    assert figures["images"].strip() == str(len(photos))
    assert 1e-5 < float(figures["image_centred_rel_error"]) <= FP16_EMBED[
        "image_centred_rel_error_max"]


@pytest.fixture(scope="module")
def align_tiny_seeded(tmp_path_factory):
    """Tiny random-weight ALIGN checkpoints by weight seed, each built once per module."""
    from hf_models import save_align

    made = {}

    def make(seed: int = 0):
        if seed not in made:
            made[seed] = save_align(tmp_path_factory.mktemp("align") / f"align-tiny-{seed}",
                                    full=False, seed=seed)
        return made[seed]

    return make


@pytest.fixture(scope="module")
def align_tiny(align_tiny_seeded):
    return align_tiny_seeded(0)


# NOTE: each case runs on other random weights (seed), so the gate is shown on more than one
# seed at no extra cost. Over weight seeds 0-15 the image centred error on these photos measures
# 1.3e-3 to 2.6e-3 and the text one 1.4e-3 to 2.9e-3 (gate 1e-2 each; no seed needed the
# mixed-precision fallback; see hf_models._calibrate_efficientnet).
@pytest.mark.parametrize(("io", "seed"), [("fp32", 0), ("fp16", 1)])
def test_align_tiny_fp16_gates_via_engine(align_tiny_seeded, photos, tmp_path, io, seed):
    from clipfast.export.pipeline import ExportOptions, run_export
    from clipfast.export.sources import load_source_from_spec

    src = align_tiny_seeded(seed)
    art = run_export(ExportOptions(model=f"transformers:{src}", out=tmp_path / "a",
                                   precision="fp16", io=io, progress=False))
    engine = clipfast.Engine(art, backend="onnxruntime")
    m = engine.manifest.spec
    want = "float16" if io == "fp16" else "float32"
    assert m.io_dtype == io and m.image.dtype == want
    assert engine.describe()["image_input_dtype"] == want
    assert m.graph.text.fused["Attention"] == 2
    source = load_source_from_spec(m.source)
    fig = _engine_figures(engine, source, list(photos.values()), _TEXTS)
    assert not check_gates(fig, FP16_EMBED), fig
    # a torch tensor input takes the IO-binding path: same numbers as the numpy path
    pixels = engine.preprocess(list(photos.values())[:2])
    a = engine.run_image_tower(pixels)
    b = engine._backend.run_image(torch.from_numpy(pixels))
    np.testing.assert_array_equal(a, b)


class _Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(8)])
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, pixel_values):
        return self.norm(self.layers(pixel_values))


class _FakeFidelity:
    """Figures that improve with the share of fp32 weight MatMuls: 2% error when all are fp16."""

    def image(self, path):
        kinds = _matmul_weight_types(path)
        fp32 = kinds.count(onnx.TensorProto.FLOAT)
        return {"image_centred_rel_error": 0.02 * (1 - fp32 / len(kinds)), "image_cosine": 1.0}


def _mlp_graphs(tmp_path) -> tuple[Path, Path]:
    """The 8-MatMul MLP's fp32 graph and its plain fp16 conversion."""
    from clipfast.export.fp16 import convert_to_fp16

    src = tmp_path / "mlp.onnx"
    torch.onnx.export(_Mlp().eval(), (torch.randn(2, 3, 16),), str(src), opset_version=17,
                      input_names=["pixel_values"], output_names=["e"], dynamo=False)
    out = tmp_path / "mlp16.onnx"
    convert_to_fp16(src, out)
    return src, out


def _matmul_weight_types(path) -> list[int]:
    model = onnx.load(str(path))
    inits = {t.name: t.data_type for t in model.graph.initializer}
    return [inits[n.input[1]] for n in model.graph.node if n.op_type == "MatMul"]


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript")
def test_fp16_fallback_keeps_late_weight_ops_fp32_until_the_gate_passes(tmp_path):
    from clipfast.export.pipeline import _fp16_fallback

    src, out = _mlp_graphs(tmp_path)
    gates = {"image_centred_rel_error_max": 0.012, "image_cosine_min": 0.99,
             "text_cosine_min": 0.99}
    report = _fp16_fallback("image", src, out, "fp32", gates, _FakeFidelity())
    # 0% fp32 -> 0.02, first 5% (1 of 8) -> 0.0175, last 25% (2 of 8) -> 0.015, first 25% ->
    # 0.015, last 50% (4 of 8) -> 0.01: passes
    assert [(a["fp32_weight_position"], a["fp32_weight_nodes"]) for a in report["attempts"]] == [
        (None, 0), ("first", 1), ("last", 2), ("first", 2), ("last", 4)]
    assert report["fp32_weight_fraction"] == 0.5 and report["attempts"][-1]["failures"] == []
    assert report["fp32_weight_position"] == "last"
    kinds = _matmul_weight_types(out)
    assert kinds == [onnx.TensorProto.FLOAT16] * 4 + [onnx.TensorProto.FLOAT] * 4  # the late ones

    gates["image_centred_rel_error_max"] = 0.001
    with pytest.raises(FidelityError, match="no 0%.*first 5%.*last 25%.*first 25%.*last 50%"):
        _fp16_fallback("image", src, out, "fp32", gates, _FakeFidelity())


class _EarlyFidelity(_FakeFidelity):
    """Figures set by the first MatMul alone: its rounding is amplified by every layer after it
    (what a ResNet stem does)."""

    def image(self, path):
        first = _matmul_weight_types(path)[0]
        return {"image_centred_rel_error": 0.005 if first == onnx.TensorProto.FLOAT else 0.02,
                "image_cosine": 1.0}


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript")
def test_fp16_fallback_tries_the_first_weight_ops_first(tmp_path):
    from clipfast.export.pipeline import _fp16_fallback

    src, out = _mlp_graphs(tmp_path)
    gates = {"image_centred_rel_error_max": 0.01, "image_cosine_min": 0.99}
    report = _fp16_fallback("image", src, out, "fp32", gates, _EarlyFidelity())
    assert report["fp32_weight_position"] == "first" and report["fp32_weight_nodes"] == 1
    assert _matmul_weight_types(out) == [onnx.TensorProto.FLOAT] + [onnx.TensorProto.FLOAT16] * 7


def test_fp16_export_below_the_gate_refuses_after_trying_mixed_precision(
        align_tiny, tmp_path, monkeypatch):
    from clipfast.export.pipeline import ExportOptions, run_export

    monkeypatch.setitem(GATES["fp16"], "image_centred_rel_error_max", 1e-9)
    with pytest.raises(FidelityError, match="fp16 image tower stays below the gate.*last 50%"):
        run_export(ExportOptions(model=f"transformers:{align_tiny}", out=tmp_path / "a",
                                 precision="fp16", progress=False))
    assert list(tmp_path.iterdir()) == []
