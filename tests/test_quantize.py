"""int8 quantization (export/quantize.py): QDQ graph facts, calibration feeds, dynamic mode,
and the fidelity guard on a tower with injected outlier channels.

The towers are small open_clip CLIP configurations with random weights (4 blocks, width 128,
64x64 images, 16x16 patches), exported with the same exporter settings as the pipeline, so the
graphs have the real nn.MultiheadAttention / LayerNorm / GELU structure at a fraction of the cost.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
ort = pytest.importorskip("onnxruntime")

from clipfast.artifact.fidelity import (  # noqa: E402
    centred_relative_error,
    check_gates,
    cosine,
    top1_agreement,
)
from clipfast.artifact.samples import sample_captions, sample_images  # noqa: E402
from clipfast.errors import ExportError, FidelityError  # noqa: E402
from clipfast.export.quantize import (  # noqa: E402
    QuantOptions,
    TowerCalibrationReader,
    activation_channel_stats,
    channel_ratio,
    guarded_quantize,
    quantize_tower,
    smooth_layernorm_outliers,
)

# The int8 gates of the precision issue: centred error <= 0.15, cosine >= 0.99, top-1 image->text
# agreement with fp32 PyTorch >= 95% (here on 29 image-caption pairs).
INT8_GATES = {"image_centred_rel_error_max": 0.15, "image_cosine_min": 0.99,
              "top1_agreement_min": 0.95}
IMAGE_SIZE = 64
# Residual-stream channels made into outliers, and by how much (trained CLIP: 50-100x).
OUTLIER_CHANNELS = (5, 77)
OUTLIER_FACTOR = 80.0
OUTLIER_GAIN = 3.0


def _tiny_clip(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    torch.backends.mha.set_fastpath_enabled(False)
    return open_clip.CLIP(
        embed_dim=64,
        vision_cfg={"image_size": IMAGE_SIZE, "layers": 4, "width": 128, "head_width": 64,
                    "patch_size": 16},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2,
                  "layers": 2},
    ).eval()


def _export(module: torch.nn.Module, args: tuple, path: Path, names: list[str], out: str) -> Path:
    # The pipeline's exporter settings (TorchScript exporter, opset 17, dynamic batch).
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=names, output_names=[out],
                          dynamic_axes={n: {0: "batch"} for n in [*names, out]},
                          opset_version=17, do_constant_folding=True, dynamo=False)
    return path


def _pixels(images: list[np.ndarray]) -> np.ndarray:
    from PIL import Image

    tf = open_clip.image_transform(IMAGE_SIZE, is_train=False)
    return np.stack([tf(Image.fromarray(im).convert("RGB")).numpy() for im in images]
                    ).astype(np.float32)


def _block_outputs(model, pixels: np.ndarray) -> list[torch.Tensor]:
    acts: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, o: acts.append(o.detach()))
             for b in model.visual.transformer.resblocks]
    with torch.no_grad():
        model.encode_image(torch.from_numpy(pixels))
    for h in hooks:
        h.remove()
    return acts


def _residual_ratios(model, pixels: np.ndarray) -> list[float]:
    """max / median of the per-channel max |x| of each block's output (the residual stream)."""
    return [channel_ratio(a.abs().reshape(-1, a.shape[-1]).amax(0).numpy())
            for a in _block_outputs(model, pixels)]


def _inject_outliers(model, pixels: np.ndarray) -> None:
    """The trained-CLIP phenomenon, put into a random tower: block 0's MLP output projection
    writes a near-constant value, OUTLIER_FACTOR x the median channel magnitude, into a few
    residual-stream channels (massive activations), and every LayerNorm's gain on those channels
    is OUTLIER_GAIN, so the normalised inputs of the attention and MLP matmuls keep them too."""
    first = _block_outputs(model, pixels)[0]
    median = float(first.abs().reshape(-1, first.shape[-1]).amax(0).median())
    with torch.no_grad():
        for c in OUTLIER_CHANNELS:
            model.visual.transformer.resblocks[0].mlp.c_proj.bias[c] += OUTLIER_FACTOR * median
            for block in model.visual.transformer.resblocks:
                block.ln_1.weight[c] *= OUTLIER_GAIN
                block.ln_2.weight[c] *= OUTLIER_GAIN


class _Tower:
    """An exported tiny image tower, its calibration feeds, and a measure() against PyTorch."""

    def __init__(self, model, directory: Path):
        from clipfast.export.sources_openclip import OpenClipImageTower, OpenClipTextTower

        self.model = model
        self.path = _export(OpenClipImageTower(model), (torch.zeros(2, 3, IMAGE_SIZE,
                                                                    IMAGE_SIZE),),
                            directory / "image.onnx", ["pixel_values"], "image_embeds")
        self.calibration = [{"pixel_values": CALIB_PIXELS}]
        captions = sample_captions(len(EVAL_PIXELS))
        ids = open_clip.get_tokenizer("ViT-B-32")(captions).numpy().astype(np.int32)
        with torch.inference_mode():
            self.ref_img = model.encode_image(torch.from_numpy(EVAL_PIXELS)).numpy()
            self.ref_txt = OpenClipTextTower(model)(torch.from_numpy(ids)).numpy()

    def measure(self, path: Path) -> dict:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        img = sess.run(None, {"pixel_values": EVAL_PIXELS})[0]
        return {
            "image_centred_rel_error": float(centred_relative_error(img, self.ref_img).max()),
            "image_cosine": float(cosine(img, self.ref_img).min()),
            "top1_agreement": top1_agreement(img, self.ref_txt, self.ref_img, self.ref_txt),
        }


CALIB_PIXELS = _pixels(sample_images(16, seed=1))


def _eval_images() -> list[np.ndarray]:
    from skimage import data

    photos = [getattr(data, n)() for n in ("astronaut", "chelsea", "coffee", "rocket", "camera")]
    return sample_images(24, seed=0) + photos


EVAL_PIXELS = _pixels(_eval_images())


@pytest.fixture(scope="module")
def tower(tmp_path_factory) -> _Tower:
    return _Tower(_tiny_clip(), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def outlier_tower(tmp_path_factory) -> _Tower:
    model = _tiny_clip()
    _inject_outliers(model, CALIB_PIXELS)
    return _Tower(model, tmp_path_factory.mktemp("outliers"))


def _graph(path: Path):
    return onnx.load(str(path), load_external_data=False)


def _producers(model) -> dict:
    return {o: n for n in model.graph.node for o in n.output}


def test_static_qdq_graph_is_per_channel_and_keeps_excluded_ops_float(tower, tmp_path):
    out = tmp_path / "image.int8.onnx"
    report = quantize_tower(tower.path, out, tower.calibration,
                            options=QuantOptions(method="static_qdq"))

    assert report["method"] == "static_qdq" and report["activation_dtype"] == "uint8"
    assert report["per_channel"] is True and report["calibration"]["rows"] == len(CALIB_PIXELS)
    # 4 blocks: in-projection + MLP fc1 + fc2 MatMuls, out-projection Gemm; the patch Conv and the
    # final projection stay float.
    assert report["quantized"] == {"MatMul": 12, "Gemm": 4, "Conv": 0, "Attention": 0}
    assert sorted(report["excluded_nodes"].values()) == ["final projection", "patch embedding"]
    assert {"LayerNormalization", "Softmax"} <= set(report["excluded_op_types"])

    g = _graph(out)
    prod = _producers(g)
    inits = {t.name: t for t in g.graph.initializer}
    ops = {n.op_type for n in g.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weight_dq = [n for n in g.graph.node if n.op_type == "DequantizeLinear"
                 and n.input[0] in inits and inits[n.input[0]].data_type == onnx.TensorProto.INT8]
    assert len(weight_dq) == 16
    for dq in weight_dq:
        axis = next(a.i for a in dq.attribute if a.name == "axis")
        w, scale = inits[dq.input[0]], inits[dq.input[1]]
        # One scale per output channel, zero-points 0 (symmetric).
        assert scale.dims[0] == w.dims[axis] > 1, dq.name
        zp = onnx.numpy_helper.to_array(inits[dq.input[2]])
        assert not zp.any(), dq.name

    by_name = {n.name: n for n in g.graph.node}
    for name in report["excluded_nodes"]:
        node = by_name[name]
        assert node.input[1] in inits, f"{name} weight is not a float initializer"
        assert inits[node.input[1]].data_type == onnx.TensorProto.FLOAT
        assert node.input[0] not in prod or prod[node.input[0]].op_type != "DequantizeLinear"
    for node in g.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert prod.get(node.input[0]) is None or \
                prod[node.input[0]].op_type != "DequantizeLinear", node.name
        if node.op_type == "Softmax":
            consumers = [c for c in g.graph.node if node.output[0] in c.input]
            assert all(c.op_type != "QuantizeLinear" for c in consumers), node.name

    # What ONNX Runtime actually runs: no int8 softmax or layer norm after its QDQ fusions.
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    run_ops = {n.op_type for n in _graph(tmp_path / "optimized.onnx").graph.node}
    assert not run_ops & {"QLinearSoftmax", "QLinearLayerNormalization"}, run_ops

    figures = tower.measure(out)
    assert not check_gates(figures, INT8_GATES), figures


def test_calibration_reader_feeds_the_graph_inputs(tower, tmp_path, monkeypatch):
    from clipfast.export.sources_openclip import OpenClipTextTower

    reader = TowerCalibrationReader([{"pixel_values": CALIB_PIXELS[:11]},
                                     {"pixel_values": CALIB_PIXELS[11:]}], batch=4)
    batches = list(iter(reader.get_next, None))
    assert [b["pixel_values"].shape[0] for b in batches] == [4, 4, 3, 4, 1]
    np.testing.assert_array_equal(np.concatenate([b["pixel_values"] for b in batches]),
                                  CALIB_PIXELS)

    # Text tower: int64 ids (what open_clip's tokenizer returns) are cast to the graph's int32.
    text = _export(OpenClipTextTower(tower.model),
                   (torch.zeros(2, 77, dtype=torch.int32),), tmp_path / "text.onnx",
                   ["input_ids"], "text_embeds")
    ids = open_clip.get_tokenizer("ViT-B-32")(sample_captions(12)).numpy()
    seen = []
    original = TowerCalibrationReader.get_next

    def spy(self):
        item = original(self)
        if item is not None:
            seen.append({k: (v.dtype, v.shape) for k, v in item.items()})
        return item

    monkeypatch.setattr(TowerCalibrationReader, "get_next", spy)
    out = tmp_path / "text.int8.onnx"
    report = quantize_tower(text, out, [{"input_ids": ids}],
                            options=QuantOptions(calibration_batch=5))
    assert seen and all(set(s) == {"input_ids"} for s in seen)
    assert all(s["input_ids"][0] == np.int32 and s["input_ids"][1][0] <= 5 for s in seen)
    assert report["quantized"]["MatMul"] > 0 and report["calibration"]["rows"] == 12
    # The text projection (x @ text_projection after the EOT gather) is the final projection.
    assert list(report["excluded_nodes"].values()) == ["final projection"]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        ref = OpenClipTextTower(tower.model)(torch.from_numpy(ids.astype(np.int32))).numpy()
    got = sess.run(None, {"input_ids": ids.astype(np.int32)})[0]
    assert cosine(got, ref).min() > 0.99

    with pytest.raises(ExportError, match="pixel_values"):
        quantize_tower(tower.path, tmp_path / "bad.onnx", [{"input_ids": ids}])
    with pytest.raises(ExportError, match="non-empty"):
        quantize_tower(tower.path, tmp_path / "bad.onnx", [])


def test_dynamic_mode(tower, tmp_path):
    out = tmp_path / "image.dyn.onnx"
    report = quantize_tower(tower.path, out, tower.calibration,
                            options=QuantOptions(method="dynamic"))
    assert report["method"] == "dynamic" and report["per_channel"] is True
    assert report["quantized"]["MatMul"] + report["quantized"]["Gemm"] == 16
    ops = {n.op_type for n in _graph(out).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops and "QuantizeLinear" not in ops
    figures = tower.measure(out)
    assert not check_gates(figures, INT8_GATES), figures


@pytest.fixture(scope="module")
def fused_graph(tower, tmp_path_factory) -> Path:
    """The tiny tower through export/fusion.py: fused Attention, SkipLayerNorm, BiasGelu."""
    from clipfast.export.fusion import fusable_tower, optimize
    from clipfast.export.sources_openclip import OpenClipImageTower

    d = tmp_path_factory.mktemp("fused")
    module, reason = fusable_tower(OpenClipImageTower(tower.model), "image")
    assert reason is None, reason
    raw = _export(module, (torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE),), d / "raw.onnx",
                  ["pixel_values"], "image_embeds")
    counts = optimize(raw, d / "image.onnx", "clip", num_heads=2, hidden_size=128)
    assert counts["Attention"] == 4 and counts["SkipLayerNormalization"] > 0, counts
    return d / "image.onnx"


def test_fused_graph(tower, fused_graph, tmp_path):
    dyn = tmp_path / "dyn.onnx"
    report = quantize_tower(fused_graph, dyn, tower.calibration,
                            options=QuantOptions(method="dynamic"))
    # Dynamic mode quantizes the fused attention's QKV projection too (QAttention).
    assert report["quantized"] == {"MatMul": 12, "Gemm": 0, "Conv": 0, "Attention": 4}
    ops = {n.op_type for n in _graph(dyn).graph.node}
    assert "QAttention" in ops and "SkipLayerNormalization" not in ops
    assert "split into Add + LayerNormalization" in report["preprocess"]
    # NOTE: the embedding gates, and top-1 agreement at 90% (_near_gates): the rankings of this
    # random 128-wide tower's fused graph are near ties, and int8 flips 2 of its 29 whatever the
    # weight format (27/29 measured with 7-bit and with 8-bit u8 weights, static and dynamic);
    # the full gate is asserted on towers that rank (test_pipeline_precision, test_int8_portable)
    _near_gates(tower.measure(dyn))

    qdq = tmp_path / "qdq.onnx"
    report = quantize_tower(fused_graph, qdq, tower.calibration,
                            options=QuantOptions(method="static_qdq"))
    assert report["quantized"]["Attention"] == 0 and len(report["not_quantizable"]) == 4
    _near_gates(tower.measure(qdq))


def _near_gates(figures: dict) -> None:
    assert not check_gates(figures, {k: v for k, v in INT8_GATES.items() if "top1" not in k})
    assert figures["top1_agreement"] >= 0.9


def test_smoothquant_is_exact_in_fp32_and_flattens_outliers(outlier_tower, tmp_path):
    model = onnx.load(str(outlier_tower.path))
    inputs = [n.input[0] for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    stats = activation_channel_stats(outlier_tower.path, inputs, outlier_tower.calibration)
    smoothed = smooth_layernorm_outliers(model, stats, alpha=0.5)
    assert len(smoothed) == 8  # ln_1 and ln_2 of 4 blocks
    path = tmp_path / "smoothed.onnx"
    onnx.save(model, str(path))
    run = {p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
           .run(None, {"pixel_values": EVAL_PIXELS})[0] for p in (outlier_tower.path, path)}
    np.testing.assert_allclose(run[path], run[outlier_tower.path], rtol=1e-4, atol=1e-4)
    after = activation_channel_stats(path, inputs, outlier_tower.calibration)
    # The LayerNorm outputs with outlier channels (blocks 1-3; block 0 reads the clean stream).
    hit = [t for t in stats if "resblocks" in t and channel_ratio(stats[t]) > 50]
    assert len(hit) == 6
    for t in hit:
        assert channel_ratio(after[t]) < channel_ratio(stats[t]) / 5, (t, channel_ratio(after[t]))


@pytest.mark.parametrize("method", ["static_qdq", "dynamic"])
def test_outlier_channels_fail_naive_int8_and_the_guard_recovers(outlier_tower, tower, tmp_path,
                                                                 method):
    ratios = _residual_ratios(outlier_tower.model, CALIB_PIXELS)
    assert all(50 <= r <= 100 for r in ratios), ratios  # the trained-CLIP range
    options = QuantOptions(method=method)

    naive = tmp_path / "naive.onnx"
    quantize_tower(outlier_tower.path, naive, outlier_tower.calibration, options=options)
    naive_figures = outlier_tower.measure(naive)
    # Cosine still looks fine (> 0.999); the centred error is what exposes the damage.
    assert naive_figures["image_centred_rel_error"] > 0.2, naive_figures
    assert check_gates(naive_figures, INT8_GATES)

    out = tmp_path / "guarded.onnx"
    report = guarded_quantize(outlier_tower.path, out, outlier_tower.calibration,
                              outlier_tower.measure, INT8_GATES, options)
    attempts = report["attempts"]
    assert attempts[0]["passed"] is False and attempts[0]["failures"]
    assert attempts[-1]["passed"] is True and len(attempts) >= 2
    assert report["method"] == method
    final = outlier_tower.measure(out)
    assert not check_gates(final, INT8_GATES)
    assert final["image_centred_rel_error"] < 0.12, final
    # The guard found the outlier inputs from calibration statistics and says why each node it
    # keeps in float is kept; what is left is still int8.
    assert report["outlier_inputs"][0]["ratio"] >= 50
    kept = report["excluded_nodes"]
    assert any(r.startswith("outlier input channels") for r in kept.values()), kept
    assert report["quantized_total"] > 0

    # Without outliers the requested configuration passes at once.
    report = guarded_quantize(tower.path, tmp_path / "clean.onnx", tower.calibration,
                              tower.measure, INT8_GATES, options)
    assert [a["passed"] for a in report["attempts"]] == [True]


def test_fidelity_error_when_no_configuration_passes(tower, tmp_path):
    out = tmp_path / "never.onnx"
    impossible = {"image_centred_rel_error_max": 0.0}
    with pytest.raises(FidelityError) as info:
        guarded_quantize(tower.path, out, tower.calibration, tower.measure, impossible,
                         QuantOptions())
    message = str(info.value)
    attempts = info.value.attempts
    assert len(attempts) >= 3 and not any(a["passed"] for a in attempts)
    lines = message.splitlines()
    # one line per attempt, between the headline and the advice
    assert [ln.strip().split(":")[0] for ln in lines[1:-1]] == [
        f"attempt {a['attempt']}" for a in attempts]
    assert lines[-1].startswith("advice: ")
    # the portable formats come right after the requested one
    assert [a["options"]["weight_type"] for a in attempts[:2]] == ["s8", "u8"]
    assert "image_centred_rel_error" in message and "exceeds the gate 0.0" in message
    assert not out.exists()


def test_options_are_validated(tower, tmp_path):
    for bad in (dict(method="weird"), dict(calibration="mse"), dict(activation_type="u4"),
                dict(percentile=10.0)):
        with pytest.raises(ExportError):
            quantize_tower(tower.path, tmp_path / "x.onnx", tower.calibration,
                           options=QuantOptions(**bad))
    with pytest.raises(ExportError, match="nothing is left to quantize"):
        quantize_tower(tower.path, tmp_path / "x.onnx", tower.calibration,
                       options=QuantOptions(exclude_op_types=("MatMul", "Gemm", "Conv")))


def test_quantization_preprocessing_leaves_nothing_in_the_working_directory(
        small_clip_artifact, tmp_path, monkeypatch):
    """Where ONNX Runtime's symbolic shape inference gives up (the dynamic-length text graph),
    it saves its partial graph in the working directory; the export runs it elsewhere."""
    from clipfast.export.quant_graph import preprocess_graph

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for tower in ("image", "text"):
        out = tmp_path / f"{tower}-pre.onnx"
        preprocess_graph(small_clip_artifact / f"{tower}.onnx", out)
        assert out.is_file()
    assert sorted(p.name for p in cwd.iterdir()) == []
    assert Path.cwd() == cwd
