"""open_clip sources (OpenCLIP, MetaCLIP v1 QuickGELU): export, manifest, parity with PyTorch."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from PIL import Image

import clipfast
from clipfast.artifact.fidelity import GATES, centred_relative_error, check_gates
from clipfast.artifact.manifest import load_manifest
from clipfast.errors import ExportError

FP32 = GATES["fp32"]


def _awkward_images() -> list:
    rng = np.random.default_rng(3)
    return [
        rng.integers(0, 256, size=(1, 1, 3), dtype=np.uint8),
        rng.integers(0, 256, size=(7, 5, 3), dtype=np.uint8),
        rng.integers(0, 256, size=(30, 2000, 3), dtype=np.uint8),
        rng.integers(0, 256, size=(225, 226), dtype=np.uint8),
        Image.fromarray(rng.integers(0, 256, size=(300, 301, 4), dtype=np.uint8), "RGBA"),
        Image.fromarray(rng.integers(0, 256, size=(97, 301, 3), dtype=np.uint8)).convert("P"),
    ]


@pytest.fixture(scope="module")
def vitb32_source(vitb32_artifact):
    from clipfast.export.sources import load_source_from_spec

    return load_source_from_spec(load_manifest(vitb32_artifact).spec.source)


def test_manifest_records_everything(vitb32_artifact):
    m = load_manifest(vitb32_artifact)
    d = m.spec.to_dict()
    assert d["format_version"] == 1 and d["precision"] == "fp32" and d["embed_dim"] == 512
    assert d["random_weights"] is True and d["source"]["pretrained"] == "none"
    assert set(d["files"]) == {"image.onnx", "text.onnx", "tokenizer.json", "golden.npz"}
    assert all(len(f["sha256"]) == 64 for f in d["files"].values())
    pp = d["preprocess"]
    assert pp["resize_mode"] == "shortest" and pp["interpolation"] == "bicubic"
    assert list(pp["image_size"]) == [224, 224]
    np.testing.assert_allclose(pp["mean"], [0.48145466, 0.4578275, 0.40821073])
    assert d["tokenizer"]["context_length"] == 77
    assert d["logits"]["kind"] == "softmax" and d["logits"]["scale"] == pytest.approx(1 / 0.07)
    assert d["gates"] == FP32
    fid = d["fidelity"]
    assert fid["passed"] is True and not check_gates(fid, FP32), fid
    assert d["export_seconds"] > 0


def test_onnx_graphs_have_dynamic_batch_and_int32_argmax(vitb32_artifact):
    for name, inputs in (("image.onnx", ["pixel_values"]), ("text.onnx", ["input_ids"])):
        g = onnx.load(str(vitb32_artifact / name), load_external_data=False)
        assert max(o.version for o in g.opset_import if o.domain in ("", "ai.onnx")) >= 17
        assert [i.name for i in g.graph.input] == inputs
        dim0 = g.graph.input[0].type.tensor_type.shape.dim[0]
        assert dim0.dim_param == "batch", f"{name}: batch axis is not dynamic"
    text = onnx.load(str(vitb32_artifact / "text.onnx"), load_external_data=False)
    assert text.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT32
    assert any(n.op_type == "ArgMax" for n in text.graph.node), "EOT pooling lost in export"


def test_vitb32_parity_on_photos_and_awkward_images(vitb32_source, vitb32_engine, photos):
    from clipfast.export.verify import measure

    images = list(photos.values()) + _awkward_images()
    texts = ["a photo of an astronaut", "a cat", "a cup of coffee", "a rocket launch",
             "a man with a camera", "", "😀 emoji & &amp;amp; html", "中文 字符",
             "x" * 10_000, "control\x00\x1bchars\t\n", "Mixed CASE text", "a" ]
    fig = measure(vitb32_source, vitb32_engine, images=images, texts=texts)
    # NOTE: random weights, seed 0 (the shared fixture; an export takes about a minute). fp32
    # round-off hardly depends on the weights: seed 1 measured 2.2e-6 (image) and 3.1e-6 (text)
    # centred error on these photos through `clipfast verify`, 300x under these bounds.
    assert fig["images"] == len(images) and fig["images_skipped"] == 0
    assert fig["pixel_levels"] <= FP32["pixel_max_levels"], fig
    assert fig["token_ids_identical"] is True
    assert fig["image_centred_rel_error"] <= 1e-3, fig
    assert fig["text_centred_rel_error"] <= 1e-3, fig
    assert fig["image_cosine"] >= 0.99999 and fig["text_cosine"] >= 0.99999
    assert fig["top1_agreement"] >= 0.95


@pytest.mark.slow
def test_metaclip_quickgelu_export_and_gelu_mixup_detected(tmp_path, export_fn):
    """MetaCLIP v1 weights run on -quickgelu towers: the export keeps QuickGELU (no Erf), and
    running the same weights with GELU is caught by the centred error, not by cosine."""
    import torch

    from clipfast.export.sources import load_source_from_spec

    art = export_fn("ViT-B-32-quickgelu", tmp_path / "mc")
    m = load_manifest(art).spec
    assert m.fidelity["passed"] and m.architecture["quick_gelu"] is True
    g = onnx.load(str(art / "image.onnx"))
    ops = {n.op_type for n in g.graph.node}
    # x*sigmoid(1.702x), or ORT's fused QuickGelu operator made from it
    assert "Erf" not in ops and ops & {"Sigmoid", "QuickGelu"}, "QuickGELU lost in export"

    quick = load_source_from_spec(m.source)
    import open_clip

    gelu = open_clip.create_model("ViT-B-32", pretrained=None)
    gelu.load_state_dict(quick.image_tower.model.state_dict())
    gelu.eval()
    arrays = _awkward_images()[:4] + [np.full((64, 64, 3), 9, np.uint8)]
    x = torch.from_numpy(np.stack([quick.reference_transform(Image.fromarray(a)) for a in arrays]))
    with torch.no_grad():
        a = quick.image_tower(x).numpy()
        b = gelu.encode_image(x).numpy()
    err = centred_relative_error(b, a).max()
    assert err > 10 * FP32["image_centred_rel_error_max"], err


def test_unknown_precision_fails_clearly(tmp_path):
    from clipfast.export.pipeline import ExportOptions

    for precision, needle in (("fp64", "expected one of"), ("bf16", "expected one of")):
        with pytest.raises(ExportError, match=needle):
            ExportOptions(model="ViT-B-32", out=tmp_path / "x", precision=precision).validate()


def test_refuses_non_empty_out_without_overwrite(tmp_path):
    from clipfast.export.pipeline import ExportOptions

    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(ExportError, match="--overwrite"):
        ExportOptions(model="ViT-B-32", out=tmp_path).validate()
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_unknown_model_and_tag_list_known_ones():
    from clipfast.export.sources import load_source

    with pytest.raises(ExportError, match="ViT-B-32"):
        load_source("ViT-Nonexistent-7", "none")
    with pytest.raises(ExportError, match="metaclip_400m"):
        load_source("ViT-B-32-quickgelu", "no_such_tag")
    with pytest.raises(ExportError, match="not found"):
        load_source("ViT-B-32", "/nonexistent/ckpt.pt")
    # Hub loading is real code; offline (tests set HF_HUB_OFFLINE) it fails fast and clearly.
    with pytest.raises(ExportError, match="could not load hf-hub:clipfast-tests/absent"):
        load_source("hf-hub:clipfast-tests/absent")


def test_checkpoint_file_loads_the_same_weights(tmp_path):
    """--pretrained FILE: the real loading path, on a local checkpoint."""
    import open_clip
    import torch

    from clipfast.export.source import weights_fingerprint
    from clipfast.export.sources import load_source

    torch.manual_seed(123)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    src = load_source("ViT-B-32", str(ckpt))
    assert src.spec["pretrained"] == str(ckpt.resolve()) and not src.random_weights
    with torch.no_grad():
        x = torch.randn(2, 3, 224, 224)
        np.testing.assert_allclose(src.image_tower(x).numpy(), model.eval().encode_image(x).numpy(),
                                   rtol=0, atol=1e-5)
    assert src.spec["weights_sha256"] == weights_fingerprint(src)


def test_artifact_is_self_describing_json(vitb32_artifact):
    data = json.loads((vitb32_artifact / "manifest.json").read_text())
    assert data["clipfast_version"] == clipfast.__version__
    assert data["text"]["inputs"] == ["input_ids"]
    assert data["image"]["shape"] == [3, 224, 224]


def test_open_clip_hub_format_directory(tmp_path):
    """hf-hub:ORG/NAME repos hold open_clip_config.json + open_clip_model.safetensors; the same
    loader reads that layout from a local directory (local-dir:), so the real path is tested
    offline. The repo's preprocess_cfg travels into the manifest."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from clipfast.export.sources import load_source

    torch.manual_seed(7)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    repo = tmp_path / "repo"
    repo.mkdir()
    cfg = {"model_cfg": open_clip.get_model_config("ViT-B-32"),
           "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                              "interpolation": "bilinear", "resize_mode": "squash"}}
    (repo / "open_clip_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              repo / "open_clip_model.safetensors")
    src = load_source(f"local-dir:{repo}")
    assert src.spec["model"] == f"local-dir:{repo.resolve()}"
    pp = src.preprocess
    assert pp.resize_mode == "squash" and pp.interpolation == "bilinear" and pp.mean == (0.5,) * 3
    with torch.no_grad():
        x = torch.randn(2, 3, 224, 224)
        np.testing.assert_allclose(src.image_tower(x).numpy(), model.encode_image(x).numpy(),
                                   atol=1e-5)
    assert src.tokenizer.context_length == 77
