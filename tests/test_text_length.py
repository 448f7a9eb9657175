"""Text towers on the dynamic sequence path: the export gives padding-independent towers a
dynamic sequence axis (and records it), padding-dependent ones keep their fixed length; the
runtime pads each batch only to its longest text, grouped by length, results in input order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

import clipfast
from clipfast.fidelity import GATES, centred_relative_error

# 1 token of content up to past the context (truncated): every length bucket of the runtime.
LENGTH_TEXTS = [
    "", "a", "a cat", "a photo of a dog", "two dogs playing in the snow on a sunny day",
    " ".join(["a long caption about many small things"] * 3),
    " ".join(["a long caption about many small things"] * 6),
    " ".join(["a long caption about many small things"] * 30),
]


def _edit_tiny_vit(cfg: dict[str, Any]) -> None:
    cfg["vision_cfg"].update(layers=1, width=32, head_width=16, patch_size=16, image_size=32)
    cfg["text_cfg"].update(width=32, heads=2, layers=2)
    cfg["embed_dim"] = 32


def _export_tiny(tmp: Path, precision: str = "fp32", base: str = "ViT-B-32") -> Path:
    from clipfast.export.families.offline import register_offline_config
    from clipfast.export.pipeline import ExportOptions, run_export

    oc = register_offline_config(base, tmp / "cfg", None, edit=_edit_tiny_vit,
                                 suffix="@textlen")
    return run_export(ExportOptions(model=oc.name, out=tmp / f"art-{precision}",
                                    pretrained="none", precision=precision, progress=False))


@pytest.fixture(scope="module")
def tiny_openclip(tmp_path_factory) -> Path:
    """A tiny open_clip ViT-B-32-shaped CLIP (1 + 2 layers, width 32), random weights, fp32."""
    return _export_tiny(tmp_path_factory.mktemp("textlen"))


def _reference(artifact: Path, texts: list[str]) -> np.ndarray:
    """The fp32 source tower on ``texts`` padded to the full context (the reference)."""
    from clipfast.export.sources import load_source_from_spec

    m = json.loads((artifact / "manifest.json").read_text())
    source = load_source_from_spec(m["source"])
    ids = source.reference_tokenize(texts)
    with torch.no_grad():
        out = source.text_tower(*(torch.from_numpy(np.asarray(ids[n], dtype=np.int32))
                                  for n in source.text_inputs)).float().numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_openclip_text_graph_has_a_dynamic_sequence_axis(tiny_openclip):
    m = json.loads((tiny_openclip / "manifest.json").read_text())
    assert m["text"]["sequence"] == "dynamic", m["text"]
    assert "causal" in m["text"]["sequence_reason"]
    g = onnx.load(str(tiny_openclip / "text.onnx"), load_external_data=False)
    dims = g.graph.input[0].type.tensor_type.shape.dim
    assert (dims[0].dim_param, dims[1].dim_param) == ("batch", "sequence")
    # the positional embedding is sliced to the input's length, not added whole
    assert not any(d.dim_value == 77 for o in g.graph.output
                   for d in o.type.tensor_type.shape.dim)
    # ORT's attention fusion still matches the dynamic graph: one Attention per layer
    assert m["graph"]["text"]["fusion"] == "ok", m["graph"]["text"]
    assert m["graph"]["text"]["fused"]["Attention"] == 2


def test_dynamic_graph_matches_the_source_at_every_length(tiny_openclip):
    import onnxruntime as ort

    engine = clipfast.Engine(tiny_openclip, backend="onnxruntime")
    ids, lengths = engine.tokenizer.encode(LENGTH_TEXTS)
    assert sorted(set(lengths.tolist()))[0] == 2 and lengths.max() == 77
    ref = _reference(tiny_openclip, LENGTH_TEXTS)
    session = ort.InferenceSession(str(tiny_openclip / "text.onnx"),
                                   providers=["CPUExecutionProvider"])
    for i, length in enumerate(lengths):
        out = session.run(None, {"input_ids": ids["input_ids"][i:i + 1, :length]
                                 .astype(np.int32)})[0]
        out = out / np.linalg.norm(out)
        np.testing.assert_allclose(out[0], ref[i], atol=1e-5)
    got = engine.encode_texts(LENGTH_TEXTS)
    err = centred_relative_error(got, ref)
    assert float(np.max(err)) <= GATES["fp32"]["text_centred_rel_error_max"]
