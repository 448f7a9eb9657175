"""GPU paths of the onnxruntime and torch backends.

CPU tests (always run): batch planning and padding, graph bookkeeping, option checks, provider
planning, session settings, describe(), and the errors a CPU-only machine gives for
device="cuda". GPU tests (``gpu`` marker; skipped with the reason without a CUDA device or the
provider): every GPU backend against the fp32 PyTorch source with the fp16 gates of
clipfast.artifact.fidelity.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from manifest_stub import stub_manifest

from clipfast.artifact.cache import artifact_cache_dir
from clipfast.artifact.fidelity import GATES, centred_relative_error, check_gates, cosine
from clipfast.artifact.manifest import artifact_digest
from clipfast.backends import onnxruntime as ort_backend
from clipfast.backends import torch as torch_backend
from clipfast.backends.batching import BatchProfile, plan_rows
from clipfast.backends.torch import (
    GraphCache,
    GraphEntry,
    attention_request,
    fill_static,
    parse_options,
)
from clipfast.errors import BackendUnavailable, ClipfastError, InputError

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


# ------------------------------------------------------------------------------ planning (CPU)
def plan_batches(n, buckets, max_batch=None):
    """The batch planner as the torch backend calls it, as ``(start, stop, rows run)``."""
    return [(c.start, c.stop, c.bucket) for c in plan_rows(n, max_batch, buckets)]


def test_plan_pads_each_chunk_to_the_smallest_bucket():
    buckets = BatchProfile(1, 4, 16).buckets()
    assert buckets == (1, 2, 4, 8, 16)
    assert plan_batches(0, buckets) == []
    assert plan_batches(1, buckets) == [(0, 1, 1)]
    assert plan_batches(5, buckets) == [(0, 5, 8)]
    assert plan_batches(16, buckets) == [(0, 16, 16)]
    assert plan_batches(37, buckets) == [(0, 16, 16), (16, 32, 16), (32, 37, 8)]
    # Odd profile values are buckets too.
    assert plan_batches(3, BatchProfile(3, 5, 12).buckets()) == [(0, 3, 3)]
    assert plan_batches(11, BatchProfile(3, 5, 12).buckets()) == [(0, 11, 12)]


def test_plan_without_buckets_chunks_without_padding():
    assert plan_batches(37, None, 16) == [(0, 16, 16), (16, 32, 16), (32, 37, 5)]
    assert plan_batches(37, None) == [(0, 37, 37)]
    with pytest.raises(ClipfastError, match="largest bucket"):
        plan_batches(37, (1, 2, 4), max_batch=8)


def test_fill_static_copies_rows_and_zeroes_padding():
    static = torch.full((8, 3), 7.0)
    chunk = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    fill_static(static, chunk)
    assert torch.equal(static[:5], chunk)
    assert torch.count_nonzero(static[5:]) == 0
    fill_static(static, torch.ones(8, 3))
    assert torch.equal(static, torch.ones(8, 3))


class _FakeGraph:
    def __init__(self, name: str):
        self.name = name

    def pool(self) -> str:
        return f"pool-of-{self.name}"


def test_graph_cache_captures_once_per_key_and_shares_the_first_pool():
    cache = GraphCache()
    pools_seen = []

    def capture(name):
        def fn(pool):
            pools_seen.append(pool)
            return GraphEntry(_FakeGraph(name), (name,), name)
        return fn

    a = cache.get_or_capture(("image", 8, (3, 4, 4)), capture("a"))
    assert cache.get_or_capture(("image", 8, (3, 4, 4)), capture("again")) is a
    cache.get_or_capture(("image", 16, (3, 4, 4)), capture("b"))
    cache.get_or_capture(("text", 8, (6,)), capture("c"))
    assert pools_seen == [None, "pool-of-a", "pool-of-a"]
    assert cache.describe() == {"captured": [["image", 8], ["image", 16], ["text", 8]],
                                "disabled": {}}
    cache.disable("image", "capture failed: boom")
    assert cache.disabled("image") == "capture failed: boom" and cache.disabled("text") is None
    assert set(cache.entries) == {("text", 8, (6,))}
    assert cache.describe()["disabled"] == {"image": "capture failed: boom"}


# ------------------------------------------------------------------------ torch options (CPU)
def test_torch_options_resolve_per_device():
    cpu = parse_options("cpu", environ={})
    assert (cpu.dtype, cpu.cuda_graphs, cpu.compile, cpu.attention) == ("fp32", False, False,
                                                                        "auto")
    cuda = parse_options("cuda", environ={})
    assert (cuda.dtype, cuda.cuda_graphs, cuda.profile) == ("fp16", True, BatchProfile(1, 64, 256))
    custom = parse_options("cuda", dtype="bf16", cuda_graphs=False, compile=True,
                           profile={"min": 1, "opt": 8, "max": 32}, environ={})
    assert (custom.dtype, custom.cuda_graphs, custom.compile) == ("bf16", False, True)
    assert custom.profile == BatchProfile(1, 8, 32)
    assert parse_options("cuda", profile=(2, 4, 8), environ={}).profile == BatchProfile(2, 4, 8)


@pytest.mark.parametrize("kwargs, match", [
    ({"dtype": "fp8"}, "dtype='fp8'.*auto, fp32, fp16, bf16"),
    ({"dtype": "float16"}, "dtype='float16'"),
    ({"cuda_graphs": "yes"}, "cuda_graphs='yes'.*True or False"),
    ({"compile": 1}, "compile=1"),
    ({"attention": "flash"}, "attention='flash'.*auto, sdpa, kernel"),
    ({"profile": (8, 4, 1)}, "profile=.*min <= opt <= max"),
    ({"profile": "big"}, "profile='big'"),
    ({"device_id": -1}, "device_id=-1"),
])
def test_torch_bad_options_name_the_option(kwargs, match):
    with pytest.raises(InputError, match=match):
        parse_options("cuda", environ={}, **kwargs)


def test_torch_cpu_skips_on_cuda_only_options():
    # BackendUnavailable: the auto chain's CPU fallback skips with this reason instead of
    # aborting the whole chain.
    with pytest.raises(BackendUnavailable, match="dtype='fp16' needs device='cuda'"):
        parse_options("cpu", dtype="fp16", environ={})
    with pytest.raises(BackendUnavailable, match="cuda_graphs=True needs device='cuda'"):
        parse_options("cpu", cuda_graphs=True, environ={})
    with pytest.raises(BackendUnavailable, match="compile=True needs device='cuda'"):
        parse_options("cpu", compile=True, environ={})
    assert parse_options("cpu", dtype="fp32", cuda_graphs=False, environ={}).dtype == "fp32"


def test_attention_env_overrides_the_option():
    assert attention_request("auto", {}) == ("auto", "option")
    assert attention_request("kernel", {"CLIPFAST_TORCH_ATTENTION": "sdpa"}) == (
        "sdpa", "CLIPFAST_TORCH_ATTENTION=sdpa")
    assert attention_request("sdpa", {"CLIPFAST_TORCH_ATTENTION": " Kernel "})[0] == "kernel"
    with pytest.raises(InputError, match="CLIPFAST_TORCH_ATTENTION='fast'"):
        attention_request("auto", {"CLIPFAST_TORCH_ATTENTION": "fast"})


def test_kernel_self_check_rule():
    from clipfast.backends.torch_attention import CHECK_FLOOR, SelfCheck, check_passes

    assert check_passes(1e-3, 1e-3) and check_passes(2e-3, 1e-3)
    assert not check_passes(2.1e-3, 1e-3)
    assert check_passes(CHECK_FLOOR, 1e-6)  # a near-exact reference does not fail on noise
    assert not check_passes(float("nan"), 1e-3)
    assert "limit 4.00e-03" in SelfCheck(3e-3, 2e-3).summary() and SelfCheck(3e-3, 2e-3).passed


def _tiny_open_clip(head_width: int):
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    # as the open_clip source loader does (export/sources_openclip.py): the decomposed attention
    torch.backends.mha.set_fastpath_enabled(False)
    vision = CLIPVisionCfg(layers=2, width=2 * head_width, head_width=head_width, image_size=32,
                           patch_size=8)
    text = CLIPTextCfg(context_length=16, vocab_size=100, width=2 * head_width, heads=2,
                       layers=2)
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text).eval()


def test_kernel_tower_refuses_unsupported_head_dims_and_self_check_measures():
    from clipfast.backends.torch_attention import kernel_attention_tower, self_check
    from clipfast.export.sources_openclip import OpenClipImageTower

    tower, reason = kernel_attention_tower(OpenClipImageTower(_tiny_open_clip(32)), "image")
    assert reason and "head dim 32" in reason and "64, 80, 128" in reason
    source = OpenClipImageTower(_tiny_open_clip(64))
    kernel, reason = kernel_attention_tower(source, "image")
    assert reason is None and kernel is not source
    x = torch.nn.functional.interpolate(torch.randn(6, 3, 4, 4), size=(32, 32), mode="bilinear")
    with torch.no_grad():
        ref = source(x).numpy()
    check = self_check(kernel, source, (x,), ref)  # CPU: the dispatcher's torch reference
    assert check.passed and check.kernel_error < 1e-4 and check.source_error == 0.0

    class Broken(torch.nn.Module):
        def forward(self, x):
            return source(x) * 1.1

    assert not self_check(Broken(), source, (x,), ref).passed


# ----------------------------------------------------------------- onnxruntime planning (CPU)
def test_cpu_sessions_disable_skip_layer_norm_fusion_only():
    providers, disabled = ort_backend.plan_providers("cpu", [CPU])
    assert providers == [(CPU, {})] and disabled == ("SkipLayerNormFusion",)
    providers, disabled = ort_backend.plan_providers("cuda", [CUDA, CPU], device_id=1)
    assert disabled == ()
    assert [n for n, _ in providers] == [CUDA, CPU]
    assert providers[0][1] == {"device_id": 1, "arena_extend_strategy": "kSameAsRequested",
                               "cudnn_conv_algo_search": "EXHAUSTIVE",
                               "do_copy_in_default_stream": True}


def test_provider_planning_errors_say_what_to_install(tmp_path):
    with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
        ort_backend.plan_providers("cuda", [CPU])
    with pytest.raises(BackendUnavailable, match="TensorrtExecutionProvider.*tensorrt"):
        ort_backend.plan_providers("cuda", [CUDA, CPU], tensorrt=True, cache_dir=tmp_path)
    with pytest.raises(BackendUnavailable, match="ort_tensorrt=True needs device='cuda'"):
        ort_backend.plan_providers("cpu", [TRT, CUDA, CPU], tensorrt=True)


def test_tensorrt_ep_goes_first_with_its_caches(tmp_path):
    providers, _ = ort_backend.plan_providers("cuda", [TRT, CUDA, CPU], tensorrt=True,
                                              cache_dir=tmp_path, trt_fp16=False)
    assert [n for n, _ in providers] == [TRT, CUDA, CPU]
    trt = providers[0][1]
    assert trt["trt_engine_cache_enable"] and trt["trt_timing_cache_enable"]
    assert trt["trt_engine_cache_path"] == trt["trt_timing_cache_path"] == str(tmp_path)
    assert trt["trt_fp16_enable"] is False and trt["trt_int8_enable"] is False
    providers, _ = ort_backend.plan_providers("cuda", [TRT, CUDA, CPU], tensorrt=True,
                                              cache_dir=tmp_path, trt_fp16=True, trt_int8=True)
    assert providers[0][1]["trt_fp16_enable"] and providers[0][1]["trt_int8_enable"]


# ------------------------------------------------------------ a tiny ONNX artifact (CPU tests)
@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """Two linear 'towers' as ONNX graphs and a Manifest naming them (no export pipeline):
    image (N, 3, 4, 4) -> Flatten @ W + b -> (N, 8); text int32 (N, 6) -> float @ V -> (N, 8)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    d = tmp_path_factory.mktemp("tiny-onnx")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 8)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    v = rng.standard_normal((6, 8)).astype(np.float32)
    image = helper.make_graph(
        [helper.make_node("Flatten", ["pixel_values"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "W"], ["mm"]),
         helper.make_node("Add", ["mm", "b"], ["image_embeds"])],
        "image", [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT,
                                                ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    text = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("MatMul", ["f", "V"], ["text_embeds"])],
        "text", [helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["N", 6])],
        [helper.make_tensor_value_info("text_embeds", TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(v, "V")])
    for name, graph in (("image.onnx", image), ("text.onnx", text)):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.save(model, str(d / name))
    data = {"image": {"file": "image.onnx", "input": "pixel_values", "shape": [3, 4, 4]},
            "text": {"file": "text.onnx", "inputs": ["input_ids"]},
            "tokenizer": {"kind": "hf", "context_length": 6},
            "files": {"image.onnx": {"sha256": "a" * 64}, "text.onnx": {"sha256": "b" * 64}}}
    return stub_manifest(d, data), (w, b, v)


def test_onnxruntime_cpu_session_settings_and_results(tiny_onnx, monkeypatch):
    import onnxruntime as ort

    manifest, (w, b, v) = tiny_onnx
    created = []

    class Recording(ort.InferenceSession):
        def __init__(self, *args, **kwargs):
            created.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", Recording)
    backend = ort_backend.load(manifest, "cpu", threads=1)
    # The setting reaches ORT, for both towers, and describe() says so.
    assert [k["disabled_optimizers"] for k in created] == [["SkipLayerNormFusion"]] * 2
    desc = backend.describe()
    assert desc["device"] == "cpu" and desc["providers"] == [CPU]
    assert desc["session"]["disabled_optimizers"] == ["SkipLayerNormFusion"]
    assert desc["session"]["intra_op_threads"] == 1 and desc["profile"] is None
    assert backend.max_batch is None
    x = np.random.default_rng(1).standard_normal((5, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(backend.run_image(x), x.reshape(5, -1) @ w + b, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(backend.run_image(torch.from_numpy(x)), x.reshape(5, -1) @ w + b,
                               rtol=1e-5, atol=1e-5)
    ids = np.arange(12, dtype=np.int64).reshape(2, 6)
    np.testing.assert_allclose(backend.run_text({"input_ids": ids}), ids @ v, rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"ort_cudnn_conv_algo_search": "FAST"}, "ort_cudnn_conv_algo_search='FAST'.*EXHAUSTIVE"),
    ({"ort_arena_extend_strategy": "grow"}, "ort_arena_extend_strategy='grow'"),
    ({"ort_tensorrt": "yes"}, "ort_tensorrt='yes'.*True or False"),
    ({"profile": (8, 4, 1)}, "profile="),
    ({"device_id": "0"}, "device_id='0'"),
])
def test_onnxruntime_bad_options_name_the_option(tiny_onnx, kwargs, match):
    with pytest.raises(InputError, match=match):
        ort_backend.load(tiny_onnx[0], "cpu", **kwargs)


def test_onnxruntime_on_cuda_without_the_gpu_package_says_what_to_install(tiny_onnx):
    import onnxruntime as ort

    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider: the error path does not apply")
    with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
        ort_backend.load(tiny_onnx[0], "cuda")


def test_tensorrt_cache_dir_and_profile_shapes(tiny_onnx, monkeypatch, tmp_path):
    manifest = tiny_onnx[0]
    profile = BatchProfile(1, 4, 8)
    monkeypatch.setenv("CLIPFAST_CACHE_DIR", str(tmp_path))
    # a writable artifact keeps its cache inside, whatever CLIPFAST_CACHE_DIR says
    local = ort_backend.tensorrt_cache_dir(manifest, profile, "1.31.1")
    assert local == manifest.directory / "ort-tensorrt" / "ort1.31.1-b1-4-8"
    # a read-only one: <CLIPFAST_CACHE_DIR>/<artifact digest>/ort-tensorrt, as the engine cache
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).startswith(
        str(manifest.directory)) else real_access(p, mode))
    shared = ort_backend.tensorrt_cache_dir(manifest, profile, "1.31.1")
    assert shared == tmp_path / artifact_digest(manifest) / "ort-tensorrt" / "ort1.31.1-b1-4-8"
    assert shared.parent == artifact_cache_dir(manifest, "ort-tensorrt")
    other = copy.deepcopy(manifest)
    other.spec.files = {"image.onnx": {"sha256": "c" * 64}, "text.onnx": {"sha256": "b" * 64}}
    assert ort_backend.tensorrt_cache_dir(other, profile, "1.31.1") != shared
    monkeypatch.setenv("CLIPFAST_CACHE_DIR", "/proc/no-such-dir")
    with pytest.raises(BackendUnavailable, match="TensorRT EP needs a cache directory.*"
                                                 "CLIPFAST_CACHE_DIR"):
        ort_backend.tensorrt_cache_dir(manifest, profile, "1.31.1")
    shapes = ort_backend.trt_profile_shapes(manifest, profile)
    assert shapes["image"] == {"trt_profile_min_shapes": "pixel_values:1x3x4x4",
                               "trt_profile_opt_shapes": "pixel_values:4x3x4x4",
                               "trt_profile_max_shapes": "pixel_values:8x3x4x4"}
    assert shapes["text"]["trt_profile_max_shapes"] == "input_ids:8x6"


# ------------------------------------------------------------------------ torch backend (CPU)
@pytest.fixture(scope="module")
def vits32_manifest(tmp_path_factory):
    """A manifest with only what the torch backend reads: the source spec (open_clip ViT-S-32,
    random weights, seed 0) and the text input names."""
    d = tmp_path_factory.mktemp("vits32-src")
    return stub_manifest(d, {"source": {"loader": "open_clip", "model": "ViT-S-32",
                                   "pretrained": "none", "seed": 0},
                        "text": {"file": "text.onnx", "inputs": ["input_ids"]}})


def test_torch_backend_cpu_is_the_fp32_reference(vits32_manifest):
    backend = torch_backend.load(vits32_manifest, "cpu")
    desc = backend.describe()
    assert desc["device"] == "cpu" and desc["dtype"] == "fp32"
    assert desc["cuda_graphs"] is False and desc["compile"] == "off"
    assert set(desc["attention"]) == {"image", "text"}
    assert backend.max_batch is None
    x = torch.nn.functional.interpolate(torch.randn(3, 3, 7, 7), size=(224, 224),
                                        mode="bilinear")
    with torch.no_grad():
        ref = backend.source.image_tower(x).numpy()
    got = backend.run_image(x.numpy())
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(backend.run_image(x), ref)  # torch tensor input
    assert backend.run_image(np.zeros((0, 3, 224, 224), np.float32)).shape == (0, 384)


def test_torch_backend_falls_back_to_eager_when_compile_or_capture_fails(vits32_manifest,
                                                                         caplog):
    backend = torch_backend.load(vits32_manifest, "cpu")
    x = torch.nn.functional.interpolate(torch.randn(5, 3, 7, 7), size=(224, 224),
                                        mode="bilinear")
    with torch.no_grad():
        ref = backend.source.image_tower(x).numpy()

    def broken_compiled(*_):
        raise RuntimeError("inductor exploded\nlong traceback")

    backend._compiled = {"image": broken_compiled}
    np.testing.assert_array_equal(backend.run_image(x), ref)
    assert backend.compile_status == ("failed, eager towers used (RuntimeError: inductor "
                                      "exploded)")
    assert "torch.compile failed" in caplog.text

    def broken_capture(*_):
        raise RuntimeError("operation not permitted when stream is capturing")

    backend.buckets, backend.max_batch = (1, 2, 4), 4
    backend._capture = broken_capture
    # Chunks of 4 + 1 rows: GEMMs of another shape, so fp32 rounding differs slightly.
    np.testing.assert_allclose(backend.run_image(x), ref, rtol=1e-4, atol=1e-5)
    assert backend._graphs.disabled("image") == ("capture failed: operation not permitted when "
                                                 "stream is capturing")
    assert "CUDA graphs off for the image tower" in caplog.text

    # an error replaying a captured graph is not a capture failure: it is raised, not hidden
    def broken_graph(*_):
        class Entry:
            inputs = (torch.zeros(4, 3, 224, 224),)

            class graph:  # noqa: N801 - stands in for torch.cuda.CUDAGraph
                @staticmethod
                def pool():
                    return "pool"

                @staticmethod
                def replay():
                    raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return Entry()

    backend._graphs = torch_backend.GraphCache()
    backend._capture = broken_graph
    with pytest.raises(RuntimeError, match="illegal memory access"):
        backend.run_image(x)


def test_torch_backend_on_cuda_without_a_gpu(vits32_manifest):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the error path does not apply")
    with pytest.raises(BackendUnavailable, match="no CUDA device"):
        torch_backend.load(vits32_manifest, "cuda")


# ------------------------------------------------------------------------------------- GPU
def _fp16_gate_failures(img, txt, img_ref, txt_ref) -> list[str]:
    """The fp16 gates of clipfast.artifact.fidelity on embeddings (pixels and token ids are not the
    backend's business; rankings on random weights are near ties, so not gated here)."""
    figures = {"image_centred_rel_error": float(centred_relative_error(img, img_ref).max()),
               "text_centred_rel_error": float(centred_relative_error(txt, txt_ref).max()),
               "image_cosine": float(cosine(img, img_ref).min()),
               "text_cosine": float(cosine(txt, txt_ref).min())}
    gates = {k: v for k, v in GATES["fp16"].items()
             if k.startswith(("image_", "text_"))}
    return check_gates(figures, gates)


@pytest.fixture(scope="module")
def gpu_case(tmp_path_factory, photos):
    """ViT-S-32 (random weights) exported fp32, inputs, and the fp32 PyTorch source's outputs."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible to PyTorch")
    import clipfast
    from clipfast.artifact.manifest import load_manifest
    from clipfast.export.pipeline import ExportOptions, run_export

    art = run_export(ExportOptions(model="ViT-S-32", pretrained="none", progress=False,
                                   out=tmp_path_factory.mktemp("gpu") / "vit-s-32"))
    engine = clipfast.Engine(art, backend="onnxruntime")
    smooth = torch.nn.functional.interpolate(
        torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.5,
        size=(224, 224), mode="bilinear").numpy()
    # 37 rows: chunks of 16, 16 and 5 (padded to 8) with the (1, 4, 16) profile below.
    pixels = np.concatenate([engine.preprocess(list(photos.values())), smooth])
    texts = ["a photo of an astronaut", "a cat", "a cup of coffee", "a rocket on a launch pad",
             "a man with a camera", "the moon", "a diagram", "two dogs"]
    tokens = engine.tokenize(texts)
    ref = torch_backend.load(load_manifest(art), "cpu")
    return load_manifest(art), pixels, tokens, ref.run_image(pixels), ref.run_text(tokens)


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [True, False], ids=["cuda-graphs", "eager"])
def test_torch_cuda_fp16_passes_the_fp16_gates(gpu_case, graphs):
    manifest, pixels, tokens, img_ref, txt_ref = gpu_case
    backend = torch_backend.load(manifest, "cuda", cuda_graphs=graphs, profile=(1, 4, 16))
    assert backend.device == "cuda" and backend.max_batch == 16
    img, txt = backend.run_image(pixels), backend.run_text(tokens)
    assert img.dtype == np.float32 and img.shape == img_ref.shape
    assert not _fp16_gate_failures(img, txt, img_ref, txt_ref)
    desc = backend.describe()
    assert desc["dtype"] == "fp16" and desc["cuda_graphs"] is graphs
    if graphs:
        captured = desc["graphs"]["captured"]
        assert ["image", 16] in captured and ["image", 8] in captured and ["text", 8] in captured
        assert not desc["graphs"]["disabled"]
        # Replays are deterministic and reuse the captured graphs.
        np.testing.assert_array_equal(backend.run_image(pixels), img)
        assert backend.describe()["graphs"]["captured"] == captured
    # A CUDA tensor (what GPU preprocessing hands over) gives what the numpy input gives.
    # (Same shape on both sides: another batch size may pick other GEMM kernels and round
    # differently, so only same-shape results can be compared bit for bit.)
    on_device = torch.from_numpy(pixels[:5]).cuda()
    np.testing.assert_array_equal(backend.run_image(on_device), backend.run_image(pixels[:5]))


@pytest.mark.gpu
def test_torch_cuda_attention_choice_is_recorded(gpu_case, monkeypatch):
    from clipfast.kernels import kernels_available

    manifest = gpu_case[0]
    backend = torch_backend.load(manifest, "cuda", profile=(1, 2, 4))
    attention = backend.describe()["attention"]
    ok, reason = kernels_available()
    if ok:
        assert attention["image"].startswith("kernel (self-check"), attention
    else:
        assert attention["image"].startswith("sdpa (kernel library unavailable")
    monkeypatch.setenv("CLIPFAST_TORCH_ATTENTION", "sdpa")
    forced = torch_backend.load(manifest, "cuda", profile=(1, 2, 4), attention="kernel")
    assert forced.describe()["attention"]["image"] == \
        "sdpa (chosen by CLIPFAST_TORCH_ATTENTION=sdpa)"


@pytest.mark.gpu
@pytest.mark.slow
def test_torch_cuda_compile_passes_the_fp16_gates(gpu_case):
    manifest, pixels, tokens, img_ref, txt_ref = gpu_case
    backend = torch_backend.load(manifest, "cuda", compile=True, profile=(1, 2, 2))
    img, txt = backend.run_image(pixels[:8]), backend.run_text(tokens)
    assert not _fp16_gate_failures(img, txt, img_ref[:8], txt_ref)
    status = backend.describe()["compile"]
    if status.startswith("failed"):  # the eager fallback passed the gates; compile itself broke
        pytest.fail(f"torch.compile did not run: {status}")
    assert status.startswith("torch.compile")


def _ort_cuda_or_skip(provider: str):
    import onnxruntime as ort

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    if provider not in ort.get_available_providers():
        pytest.skip(f"onnxruntime has no {provider} (providers: "
                    f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu")


@pytest.mark.gpu
def test_onnxruntime_cuda_passes_the_fp16_gates(gpu_case):
    _ort_cuda_or_skip(CUDA)
    manifest, pixels, tokens, img_ref, txt_ref = gpu_case
    backend = ort_backend.load(manifest, "cuda")
    assert backend.device == "cuda" and backend.providers[0] == CUDA
    assert backend.describe()["session"]["disabled_optimizers"] == []
    img, txt = backend.run_image(pixels), backend.run_text(tokens)
    assert not _fp16_gate_failures(img, txt, img_ref, txt_ref)
    # Calls of the same shapes refill the cached device inputs: other data, other rows out.
    rev = np.ascontiguousarray(pixels[::-1])
    np.testing.assert_allclose(backend.run_image(rev), img[::-1], rtol=1e-5, atol=1e-5)
    rev_tokens = {k: np.ascontiguousarray(v[::-1]) for k, v in tokens.items()}
    np.testing.assert_allclose(backend.run_text(rev_tokens), txt[::-1], rtol=1e-5, atol=1e-5)
    # another shape gets its own cached input
    np.testing.assert_allclose(backend.run_image(pixels[:5]), img[:5], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(backend.run_image(torch.from_numpy(pixels).cuda()), img,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_onnxruntime_tensorrt_ep_builds_into_the_cache(gpu_case):
    _ort_cuda_or_skip(TRT)
    manifest, pixels, tokens, img_ref, txt_ref = gpu_case
    try:
        backend = ort_backend.load(manifest, "cuda", ort_tensorrt=True, profile=(1, 8, 16))
    except BackendUnavailable as e:
        # only missing TensorRT libraries are a reason to skip; a rejected option is a failure
        if "libnvinfer" not in str(e) and "TensorRT" not in str(e).split(":")[0]:
            raise
        pytest.skip(f"TensorRT EP listed but its libraries are not usable here: {e}")
    assert backend.providers[0] == TRT and backend.max_batch == 16
    cache = Path(backend.describe()["provider_options"][TRT]["trt_engine_cache_path"])
    # the artifact is writable: its cache is inside it (clipfast.artifact.cache)
    assert cache.parent == manifest.directory / "ort-tensorrt"
    img = np.concatenate([backend.run_image(pixels[s:s + 16]) for s in range(0, 37, 16)])
    txt = backend.run_text(tokens)
    assert not _fp16_gate_failures(img, txt, img_ref, txt_ref)
    engines = [p for p in cache.rglob("*") if p.suffix == ".engine"]
    assert engines, "no engine cached"
    # explicit profile shapes: other batch sizes inside the profile build no new engine
    backend.run_image(pixels[:5])
    backend.run_image(pixels[:16])
    assert len([p for p in cache.rglob("*") if p.suffix == ".engine"]) == len(engines)
