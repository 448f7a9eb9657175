"""transformers sources end to end: export -> artifact -> Engine, against the PyTorch source.

ALIGN runs at its released shapes (EfficientNet-B7 at 289 px, BERT-base, 640-d); CLIP, SigLIP
and MetaCLIP 2 use small configs to keep the suite fast.
"""

from __future__ import annotations

import hf_models
import numpy as np
import pytest

import clipfast
from clipfast.artifact.fidelity import GATES, check_gates
from clipfast.artifact.manifest import load_manifest

FP32 = GATES["fp32"]


@pytest.fixture(scope="module")
def align_artifact(tmp_path_factory, export_fn):
    d = tmp_path_factory.mktemp("align")
    hf_models.save_align(d / "src", full=True)
    return export_fn(f"transformers:{d / 'src'}", d / "art", pretrained=None)


def _parity(art, photos):
    from clipfast.export.sources import load_source_from_spec
    from clipfast.export.verify import measure

    engine = clipfast.Engine(art, backend="onnxruntime")
    source = load_source_from_spec(engine.manifest.spec.source)
    images = list(photos.values()) + [np.zeros((5, 7, 3), np.uint8),
                                      np.full((30, 900), 200, np.uint8)]
    texts = ["a photo of an astronaut", "a cat", "", "&amp; html entities",
             "漢字 and emoji 😀", "x" * 5000, "UPPER case", "a rocket"]
    return engine, measure(source, engine, images=images, texts=texts)


@pytest.mark.slow
def test_align_full_size(align_artifact, photos):
    m = load_manifest(align_artifact)
    d = m.spec.to_dict()
    assert d["family"] == "align" and d["embed_dim"] == 640
    assert d["text"]["inputs"] == ["input_ids", "attention_mask"]
    pp = d["preprocess"]
    assert list(pp["image_size"]) == [289, 289] and pp["interpolation"] == "bilinear"
    assert pp["rescale"] == pytest.approx(1 / 127.5) and pp["offset"] == -1.0
    assert pp["mean"] == [0.0, 0.0, 0.0] and pp["std"] == [1.0, 1.0, 1.0]
    assert d["tokenizer"]["context_length"] == 64
    temperature = d["logits"]["scale"]
    assert d["logits"]["kind"] == "softmax" and temperature > 0
    assert d["fidelity"]["passed"], d["fidelity"]

    engine, fig = _parity(align_artifact, photos)
    assert not check_gates(fig, FP32), fig
    probs = engine.classify([photos["chelsea"]], ["cat", "dog", "car"])
    assert probs.shape == (1, 3) and np.isclose(probs.sum(), 1.0, atol=1e-5)


@pytest.mark.parametrize("family", ["clip", "siglip", "metaclip2"])
def test_small_transformers_families(family, tmp_path, export_fn, photos):
    builder = {"clip": lambda p: hf_models.save_clip(p, size="small"),
               "siglip": hf_models.save_siglip, "metaclip2": hf_models.save_metaclip2}[family]
    builder(tmp_path / "src")
    art = export_fn(f"transformers:{tmp_path / 'src'}", tmp_path / "art", pretrained=None)
    m = load_manifest(art).spec.to_dict()
    assert m["fidelity"]["passed"], m["fidelity"]
    engine, fig = _parity(art, photos)
    assert not check_gates(fig, FP32), fig
    if family == "siglip":
        assert m["logits"]["kind"] == "sigmoid" and m["logits"]["bias"] is not None
        assert m["preprocess"]["resize_mode"] == "squash"
        probs = engine.classify([photos["coffee"]], ["coffee", "tea"])
        assert ((probs > 0) & (probs < 1)).all()  # independent sigmoids, not a distribution
    else:
        assert m["logits"]["kind"] == "softmax"
