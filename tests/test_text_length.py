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
from clipfast.artifact.fidelity import GATES, centred_relative_error

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


def _export_tiny(tmp: Path, precision: str = "fp32", base: str = "ViT-B-32", *,
                 fuse: bool = True) -> Path:
    from offline_families import register_offline_config

    from clipfast.export.pipeline import ExportOptions, run_export

    oc = register_offline_config(base, tmp / "cfg", None, edit=_edit_tiny_vit,
                                 suffix="@textlen")
    return run_export(ExportOptions(model=oc.name, out=tmp / f"art-{precision}",
                                    pretrained="none", precision=precision, progress=False,
                                    fuse=fuse))


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


class _ShapeSpy:
    """Wraps a backend's ``run_text`` to record the shapes it is given."""

    def __init__(self, engine):
        self.shapes: list[tuple[int, ...]] = []
        backend = engine._backend
        original = backend.run_text

        def run_text(inputs):
            self.shapes.append(next(iter(inputs.values())).shape)
            return original(inputs)

        backend.run_text = run_text
        # the default run_text_batches calls run_text once per batch, so each shape is seen
        self._undo = lambda: setattr(backend, "run_text", original)

    def close(self) -> None:
        self._undo()


def test_runtime_pads_each_batch_to_its_longest_text_in_input_order(tiny_openclip):
    engine = clipfast.Engine(tiny_openclip, backend="onnxruntime", batch_size=4)
    rng = np.random.default_rng(0)
    texts = [LENGTH_TEXTS[i] for i in rng.integers(0, len(LENGTH_TEXTS), size=23)]
    full = engine.tokenize(texts)
    # reference: every row alone at the full context (the fixed path)
    ref = np.concatenate([engine._backend.run_text({k: v[i:i + 1] for k, v in full.items()})
                          for i in range(len(texts))])
    spy = _ShapeSpy(engine)
    try:
        got = engine.encode_texts(texts, normalize=False)
    finally:
        spy.close()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    _, lengths = engine.tokenizer.encode(texts)
    assert sum(s[0] for s in spy.shapes) == len(texts)
    assert all(s[0] <= 4 for s in spy.shapes)
    assert min(s[1] for s in spy.shapes) <= 4 and max(s[1] for s in spy.shapes) == 77
    # grouped by length: no batch of short texts is padded to the long one's length
    assert sum(s[0] * s[1] for s in spy.shapes) < len(texts) * 77 / 2
    # token ids are those of the fixed path
    ids, _ = engine.tokenizer.encode(texts)
    np.testing.assert_array_equal(ids["input_ids"], full["input_ids"])


def test_artifact_with_a_fixed_graph_and_no_sequence_field_keeps_padding_to_77(tiny_openclip,
                                                                              tmp_path):
    """Artifacts exported before the dynamic path: a [batch, 77] graph, no text.sequence."""
    import shutil

    from clipfast.artifact.manifest import write_manifest
    from clipfast.export.onnx_export import export_text_tower
    from clipfast.export.sources import load_source_from_spec

    art = tmp_path / "old"
    shutil.copytree(tiny_openclip, art)
    data = json.loads((art / "manifest.json").read_text())
    export_text_tower(load_source_from_spec(data["source"]), art / "text.onnx", fusable=False)
    g = onnx.load(str(art / "text.onnx"))
    assert g.graph.input[0].type.tensor_type.shape.dim[1].dim_value == 77
    for key in ("sequence", "sequence_reason"):
        del data["text"][key]
    write_manifest(art, data, list(data["files"]))
    engine = clipfast.Engine(art, backend="onnxruntime")  # self-check passes at 77
    assert not engine.text_dynamic
    spy = _ShapeSpy(engine)
    try:
        got = engine.encode_texts(LENGTH_TEXTS)
    finally:
        spy.close()
    assert {s[1] for s in spy.shapes} == {77}
    ref = _reference(tiny_openclip, LENGTH_TEXTS)
    assert float(centred_relative_error(got, ref).max()) <= \
        GATES["fp32"]["text_centred_rel_error_max"]


def test_plan_groups_by_length_and_covers_every_row_once():
    from clipfast.inputs.text_batching import length_buckets, plan_text_batches

    lengths = np.array([5] * 31 + [77])
    plan = plan_text_batches(lengths, 32, context=77)
    # the long text is not allowed to pad 31 short ones to 77
    assert sorted(b.length for b in plan) == [5, 77]
    rows = np.concatenate([b.rows for b in plan])
    assert sorted(rows.tolist()) == list(range(32))
    for b in plan:
        assert lengths[b.rows].max() <= b.length
    # a batch limit is respected, buckets round lengths up, the context caps them
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 78, size=300)
    buckets = length_buckets(77)
    assert buckets == (8, 16, 32, 48, 64, 77)
    plan = plan_text_batches(lengths, 16, context=77, allowed=buckets)
    assert all(len(b.rows) <= 16 and b.length in buckets for b in plan)
    assert all(lengths[b.rows].max() <= b.length for b in plan)
    assert sorted(np.concatenate([b.rows for b in plan]).tolist()) == list(range(300))
    # equal lengths: full batches, nothing split for nothing
    plan = plan_text_batches(np.full(64, 9), 32, context=77)
    assert [len(b.rows) for b in plan] == [32, 32]
    plan = plan_text_batches(np.full(3, 4), 2, context=77)  # remainder last, as chunking does
    assert [b.rows.tolist() for b in plan] == [[0, 1], [2]]
    assert plan_text_batches(np.zeros(0, dtype=np.int64), 8, context=77) == []


def test_row_lengths_from_ids_and_masks():
    from clipfast.inputs.text_batching import row_lengths

    ids = np.array([[49406, 320, 49407, 0, 0], [49406, 49407, 0, 0, 0], [1, 2, 3, 4, 5]])
    assert row_lengths({"input_ids": ids}, pad_id=0).tolist() == [3, 2, 5]
    # a pad token that is also the end token: one more position, capped at the width
    eos = np.array([[49406, 320, 49407, 49407, 49407], [49406, 1, 2, 3, 49407]])
    assert row_lengths({"input_ids": eos}, pad_id=49407, pad_may_end=True).tolist() == [3, 5]
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert row_lengths({"input_ids": np.ones((2, 4)), "attention_mask": mask},
                       pad_id=1).tolist() == [2, 4]
    assert row_lengths({"input_ids": ids}, pad_id=0, padding_side="left").tolist() == [5, 5, 5]


def _held_out_texts() -> list[str]:
    """24 captions from 1 word to past the context (truncated), none of the golden ones."""
    words = ("red blue small old bright wooden cat dog boat tree river house street lamp "
             "child bird window mountain car bridge").split()
    rng = np.random.default_rng(7)
    counts = [1, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 70,
              75, 90]
    return [" ".join(rng.choice(words, size=c)) for c in counts]


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_precisions_stay_dynamic_and_pass_their_gates_at_every_length(precision, tmp_path):
    from clipfast.artifact.fidelity import check_gates
    from clipfast.export.sources import load_source_from_spec
    from clipfast.export.verify import measure

    art = _export_tiny(tmp_path, precision)
    m = json.loads((art / "manifest.json").read_text())
    assert m["text"]["sequence"] == "dynamic", m["text"]
    g = onnx.load(str(art / "text.onnx"), load_external_data=False)
    assert g.graph.input[0].type.tensor_type.shape.dim[1].dim_param == "sequence"
    engine = clipfast.Engine(art, backend="onnxruntime")
    assert engine.text_dynamic
    texts = _held_out_texts()
    _, lengths = engine.tokenizer.encode(texts)
    assert lengths.min() <= 3 and lengths.max() == 77
    figures = measure(load_source_from_spec(m["source"]), engine, texts=texts)
    gates = {k: v for k, v in GATES[precision].items() if not k.startswith("image_")}
    assert not check_gates(figures, gates), figures


@pytest.mark.parametrize("family,sequence", [("clip", "dynamic"), ("align", "dynamic"),
                                             ("metaclip2", "dynamic"), ("siglip", "fixed")])
def test_transformers_families_declare_their_sequence_and_match_the_source(
        family, sequence, tmp_path, export_fn, small_clip_artifact):
    """transformers CLIP / MetaCLIP 2 (causal, EOS pooling) and ALIGN (attention mask) take the
    dynamic path; SigLIP (no mask, last-token pooling, trained on padding) keeps 64."""
    import hf_models

    from clipfast.artifact.fidelity import check_gates
    from clipfast.export.sources import load_source_from_spec
    from clipfast.export.verify import measure

    if family == "clip":
        art = small_clip_artifact
    else:
        builder = {"align": lambda p: hf_models.save_align(p, full=False),
                   "siglip": hf_models.save_siglip,
                   "metaclip2": hf_models.save_metaclip2}[family]
        builder(tmp_path / "src")
        art = export_fn(f"transformers:{tmp_path / 'src'}", tmp_path / "art", pretrained=None)
    m = json.loads((art / "manifest.json").read_text())
    assert m["text"]["sequence"] == sequence, m["text"]
    engine = clipfast.Engine(art, backend="onnxruntime")
    assert engine.text_dynamic == (sequence == "dynamic")
    texts = _held_out_texts()
    spy = _ShapeSpy(engine)
    try:
        figures = measure(load_source_from_spec(m["source"]), engine, texts=texts)
    finally:
        spy.close()
    context = m["tokenizer"]["context_length"]
    widths = {s[1] for s in spy.shapes}
    assert (min(widths) < context) == (sequence == "dynamic"), widths
    gates = {k: v for k, v in GATES["fp32"].items() if not k.startswith("image_")}
    assert not check_gates(figures, gates), figures


def test_non_causal_text_tower_keeps_fixed_length_and_a_wrong_claim_is_caught(
        tiny_openclip, monkeypatch):
    """A text tower whose attention sees the padding (no causal mask, as MobileCLIP's) keeps its
    fixed length; a family that wrongly declares it padding-free is caught on the source."""
    from clipfast.export.families._openclip import OpenClipFamily
    from clipfast.export.onnx_export import text_sequence_plan
    from clipfast.export.sources import load_source_from_spec

    m = json.loads((tiny_openclip / "manifest.json").read_text())
    source = load_source_from_spec(m["source"])
    assert text_sequence_plan(source)[0] is True
    source.text_tower.model.attn_mask = None  # bidirectional: padding reaches every token
    dynamic, reason = text_sequence_plan(source)
    assert dynamic is False and "not causal" in reason
    monkeypatch.setattr(OpenClipFamily, "text_padding_free",
                        lambda self, tower: (True, "wrongly declared"))
    dynamic, reason = text_sequence_plan(source)
    assert dynamic is False and "changes with the padding" in reason, reason


def test_golden_self_check_catches_a_wrong_dynamic_claim_at_load(tiny_openclip, tmp_path):
    """An artifact whose text graph depends on padding but claims ``sequence: dynamic`` fails
    the self-check at load (its short golden texts run at their own length); the same graph
    declared fixed passes."""
    import shutil

    from clipfast.artifact.manifest import load_manifest, write_manifest
    from clipfast.artifact.selfcheck import GOLDEN_TEXTS, load_golden, write_golden
    from clipfast.errors import FidelityError
    from clipfast.export.fusion import EagerSelfAttention
    from clipfast.export.sources import load_source_from_spec

    art = tmp_path / "wrong"
    shutil.copytree(tiny_openclip, art)
    data = json.loads((art / "manifest.json").read_text())
    source = load_source_from_spec(data["source"])
    tower = source.text_tower
    tower.model.attn_mask = None  # bidirectional: depends on the padding
    for block in tower.model.transformer.resblocks:  # traceable at any length
        block.attn = EagerSelfAttention(block.attn, causal=False)
    ids = torch.from_numpy(np.asarray(source.reference_tokenize(["a cat", "two dogs"])
                                      ["input_ids"], dtype=np.int32)[:, :8])
    torch.onnx.export(tower, (ids,), str(art / "text.onnx"), input_names=["input_ids"],
                      output_names=["text_embeds"], dynamo=False, opset_version=17,
                      dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                    "text_embeds": {0: "batch"}})
    golden = load_golden(load_manifest(tiny_openclip))
    assert len(golden.text_embeds) == GOLDEN_TEXTS
    with torch.no_grad():
        golden.text_embeds = tower(torch.from_numpy(golden.text["input_ids"])).numpy()
    write_golden(art, golden)
    write_manifest(art, data, list(data["files"]))
    with pytest.raises(FidelityError, match="text_centred_rel_error"):
        clipfast.Engine(art, backend="onnxruntime")
    data["text"]["sequence"] = "fixed"
    write_manifest(art, data, list(data["files"]))
    engine = clipfast.Engine(art, backend="onnxruntime")
    assert engine.self_check_figures["passed"]


def test_golden_texts_span_short_and_long(tiny_openclip):
    engine = clipfast.Engine(tiny_openclip, backend="onnxruntime")
    figures = engine.self_check_figures
    assert figures["passed"] and figures["text_lengths_run"] >= 4, figures


def test_unfused_export_is_dynamic_too(tmp_path):
    """--no-fuse (and --tensorrt, whose graphs are unfused): nn.MultiheadAttention's traced
    graph holds the traced length, so the dynamic export traces the eager rewrite instead."""
    art = _export_tiny(tmp_path, fuse=False)
    m = json.loads((art / "manifest.json").read_text())
    assert m["text"]["sequence"] == "dynamic", m["text"]
    assert m["graph"]["text"]["fused"] is None
    engine = clipfast.Engine(art, backend="onnxruntime")
    got = engine.encode_texts(LENGTH_TEXTS)
    ref = _reference(art, LENGTH_TEXTS)
    assert float(centred_relative_error(got, ref).max()) <= \
        GATES["fp32"]["text_centred_rel_error_max"]


def test_torch_backend_runs_the_dynamic_path(tiny_openclip):
    """The torch backend (source towers, eager on CPU) takes every length; its self-check runs
    the golden texts at their own lengths."""
    engine = clipfast.Engine(tiny_openclip, backend="torch")
    assert engine.text_dynamic and engine._backend.text_lengths is None
    assert engine.self_check_figures["text_lengths_run"] >= 4
    spy = _ShapeSpy(engine)
    try:
        got = engine.encode_texts(LENGTH_TEXTS)
    finally:
        spy.close()
    assert min(s[1] for s in spy.shapes) < 77
    ref = _reference(tiny_openclip, LENGTH_TEXTS)
    assert float(centred_relative_error(got, ref).max()) <= \
        GATES["fp32"]["text_centred_rel_error_max"]
