"""TensorRT's int8 without TensorRT: an export with --tensorrt quantizes to s8 Q/DQ throughout
(symmetric, zero point 0, int8 weights), in its requested configuration and in every one the
fidelity guard falls back to."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from clipfast.errors import FidelityError  # noqa: E402
from clipfast.export.pipeline import ExportOptions  # noqa: E402
from clipfast.export.precision import int8_format, int8_options  # noqa: E402
from clipfast.export.quantize import guarded_quantize, quantize_tower  # noqa: E402

WIDTH = 64


def _export_options(tmp_path: Path, **kw) -> ExportOptions:
    # not validated: ExportOptions.validate refuses --tensorrt on a machine without TensorRT
    return ExportOptions(model="ViT-B-32", out=tmp_path / "art", precision="int8", **kw)


def _mlp(path: Path, seed: int = 0) -> tuple[Path, list[dict[str, np.ndarray]]]:
    """x -> MatMul -> Relu -> MatMul -> Relu -> MatMul (the last kept float as the final
    projection), with calibration feeds whose activations are not centred on zero."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = [(rng.standard_normal((WIDTH, WIDTH)) * 0.1).astype(np.float32) for _ in range(3)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"], name="fc0"),
             helper.make_node("Relu", ["h0"], ["r0"], name="act0"),
             helper.make_node("MatMul", ["r0", "w1"], ["h1"], name="fc1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="act1"),
             helper.make_node("MatMul", ["r1", "w2"], ["y"], name="proj")]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])],
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, str(path))
    x = (rng.standard_normal((48, WIDTH)) + 0.5).astype(np.float32)
    return path, [{"x": x[i:i + 16]} for i in range(0, len(x), 16)]


def _s8_qdq_problems(path: Path) -> list[str]:
    """Every way the graph at ``path`` departs from TensorRT's int8: a Q/DQ node without an
    int8 zero point of 0, a quantized weight that is not int8, a uint8 initializer, or an
    ONNX Runtime integer operator (dynamic int8)."""
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    problems = []
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not qdq:
        problems.append("no QuantizeLinear/DequantizeLinear nodes")
    for n in qdq:
        # without a zero point, QuantizeLinear's output type defaults to uint8
        zp = inits.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zp is None:
            problems.append(f"{n.op_type} {n.name}: no zero point initializer")
            continue
        if zp.data_type != TensorProto.INT8:
            problems.append(f"{n.op_type} {n.name}: zero point type {zp.data_type}")
        if numpy_helper.to_array(zp).any():
            problems.append(f"{n.op_type} {n.name}: non-zero zero point")
        if n.op_type == "DequantizeLinear" and n.input[0] in inits \
                and inits[n.input[0]].data_type != TensorProto.INT8:
            problems.append(f"weight {n.input[0]} of {n.name} is not int8")
    problems += [f"uint8 initializer {t.name}" for t in model.graph.initializer
                 if t.data_type == TensorProto.UINT8]
    problems += [f"integer operator {n.op_type} {n.name}" for n in model.graph.node
                 if n.op_type in ("DynamicQuantizeLinear", "MatMulInteger",
                                  "DynamicQuantizeMatMul", "QAttention", "ConvInteger")]
    return problems


def test_the_pipeline_quantizes_to_the_tensorrt_format_with_tensorrt(tmp_path):
    trt = _export_options(tmp_path, tensorrt=True)
    assert int8_format(trt) == "tensorrt"
    opts = int8_options(trt)
    assert opts.int8_format == "tensorrt" and opts.method == "static_qdq"
    assert (opts.activation_type, opts.weight_type) == ("s8", "s8")
    assert opts.symmetric_weights and not opts.reduce_range
    # without --tensorrt: --int8-format, the portable format by default
    assert int8_options(_export_options(tmp_path)).int8_format == "portable"
    assert int8_format(_export_options(tmp_path, int8_format="full-range")) == "full-range"
    assert int8_options(_export_options(tmp_path, int8_method="dynamic")).method == "dynamic"


def test_tensorrt_int8_graph_is_s8_qdq_throughout(tmp_path):
    fp32, calib = _mlp(tmp_path / "mlp.onnx")
    out = tmp_path / "mlp.int8.onnx"
    report = quantize_tower(fp32, out, calib,
                            options=int8_options(_export_options(tmp_path, tensorrt=True)))
    assert report["quantized_total"] == 2 and report["excluded_nodes"] == {
        "proj": "final projection"}
    assert report["activation_dtype"] == "int8" and report["weight_dtype"] == "int8"
    rec = report["int8_format"]
    assert (rec["name"], rec["activations"], rec["weights"]) == ("tensorrt", "int8", "int8")
    assert _s8_qdq_problems(out) == []
    # both quantized matmuls read dequantized int8 weights and activations
    model = onnx.load(str(out))
    producer = {o: n for n in model.graph.node for o in n.output}
    for name in ("fc0", "fc1"):
        node = next(n for n in model.graph.node if n.name == name)
        assert [producer[i].op_type for i in node.input] == ["DequantizeLinear"] * 2, name


def test_every_guard_attempt_keeps_the_tensorrt_format(tmp_path):
    """The guard's fallbacks (7-bit weights, SmoothQuant, layers kept float) stay s8 Q/DQ, and
    it never falls back to dynamic int8, which TensorRT cannot build."""
    fp32, calib = _mlp(tmp_path / "mlp.onnx", seed=1)
    out = tmp_path / "mlp.int8.onnx"
    problems: list[list[str]] = []

    def measure(path: Path) -> dict:
        problems.append(_s8_qdq_problems(path))
        return {"image_cosine": 0.5}

    with pytest.raises(FidelityError) as info:
        guarded_quantize(fp32, out, calib, measure, {"image_cosine_min": 0.99},
                         int8_options(_export_options(tmp_path, tensorrt=True)))
    attempts = info.value.attempts
    assert len(attempts) >= 3 and not any(a.get("error") for a in attempts)
    assert len(problems) == len(attempts) and all(p == [] for p in problems), problems
    for a in attempts:
        o = a["options"]
        assert (o["method"], o["activation_type"], o["weight_type"]) == (
            "static_qdq", "s8", "s8"), a["config"]
    assert not out.exists()
