"""Fusable attention and ONNX Runtime's transformer fusions: equality with the source modules,
fused operator counts (one Attention per layer), and the unfused fallback."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from torch import nn

from clipfast.export.fusion import (
    EagerSelfAttention,
    attention_spec,
    count_ops,
    fusable_tower,
    fusion_plan,
)


def _causal(length: int) -> torch.Tensor:
    # what open_clip's build_causal_mask makes
    return torch.full((length, length), float("-inf")).triu_(1)


@pytest.mark.parametrize("embed,heads,length", [(64, 4, 10), (80, 1, 77), (768, 12, 50)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_eager_attention_equals_multihead_attention(embed, heads, length, causal, seed):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(embed, heads, batch_first=True).eval()
    with torch.no_grad():  # non-zero biases, so a q/k/v bias mix-up would show
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    eager = EagerSelfAttention(mha, causal=causal).eval()
    x = torch.randn(3, length, embed)
    mask = _causal(length) if causal else None
    with torch.no_grad():
        ref = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
        got = eager(x, x, x, need_weights=False, attn_mask=mask)[0]
    # NOTE: same maths in another order (scale after QK^T instead of SDPA's): fp32 round-off,
    # at most 4e-7 over seeds 0-9 for every shape here
    assert (got - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    # the weights are shared with the source module, not copied
    assert eager.q_proj.weight.data_ptr() == mha.in_proj_weight.data_ptr()


def test_eager_attention_refuses_cross_attention():
    from clipfast.errors import ExportError

    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    eager = EagerSelfAttention(mha)
    x, y = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    with pytest.raises(ExportError, match="self-attention"):
        eager(x, y, y)
    with pytest.raises(ExportError, match="batch_first"):
        EagerSelfAttention(nn.MultiheadAttention(32, 4))


def _tiny_open_clip(ls_init_value=None, seed=0):
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    from clipfast.export.sources_openclip import OpenClipImageTower, OpenClipTextTower

    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=16, patch_size=16, image_size=32,
                                 ls_init_value=ls_init_value),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=48, heads=4, layers=3),
    ).eval()
    torch.backends.mha.set_fastpath_enabled(False)
    return OpenClipImageTower(model).eval(), OpenClipTextTower(model).eval()


@pytest.mark.parametrize("seed", [0, 1])
def test_fusable_tower_is_an_equal_copy_and_leaves_the_reference_alone(seed):
    image, text = _tiny_open_clip(seed=seed)
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.zeros(2, 77, dtype=torch.int32)
    ids[0, :5] = torch.tensor([49406, 320, 1125, 539, 49407])
    ids[1, :3] = torch.tensor([49406, 7034, 49407])
    for tower, which, args, layers in ((image, "image", (pixels,), 2), (text, "text", (ids,), 3)):
        copy, reason = fusable_tower(tower, which)
        assert reason is None and copy is not tower
        blocks = (tower.model.visual.transformer if which == "image"
                  else tower.model.transformer).resblocks
        assert all(isinstance(b.attn, nn.MultiheadAttention) for b in blocks)  # untouched
        new = (copy.model.visual.transformer if which == "image"
               else copy.model.transformer).resblocks
        assert all(isinstance(b.attn, EagerSelfAttention) for b in new)
        assert all(b.attn.causal is (which == "text") for b in new)
        # parameters shared, not duplicated
        assert new[0].mlp.c_fc.weight.data_ptr() == blocks[0].mlp.c_fc.weight.data_ptr()
        with torch.no_grad():
            diff = (copy(*args) - tower(*args)).abs().max().item()
        assert diff <= 1e-5, (which, diff)  # outputs ~2; at most 1.7e-6 over seeds 0-9
        spec, _ = attention_spec(tower, which)
        assert spec is not None and spec.layers == layers and spec.model_type == "clip"


def test_fusion_plan_names_what_it_cannot_rewrite():
    image, text = _tiny_open_clip(ls_init_value=0.1)
    transformer, _, reason = fusion_plan(image, "image")
    assert transformer is None and "LayerScale" in reason
    copy, why = fusable_tower(image, "image")
    assert copy is image and "LayerScale" in why
    text.model.attn_mask = torch.zeros(77, 77)  # bidirectional: not the causal pattern
    assert "causal" in fusion_plan(text, "text")[2]


def test_vitb32_fused_one_attention_per_layer(vitb32_artifact):
    """The default export fuses: 12 Attention per tower (a plain nn.MultiheadAttention export
    fuses none), each kept only after matching the source tower."""
    m = json.loads((vitb32_artifact / "manifest.json").read_text())
    for tower in ("image", "text"):
        g = m["graph"][tower]
        assert g["fusion"] == "ok", g
        assert g["fused"]["Attention"] == 12 == g["layers"]
        assert g["fused"]["SkipLayerNormalization"] == 24
        assert g["fused"]["BiasGelu"] == 12  # nn.GELU (erf) + bias
        assert g["check_max_rel_diff"] <= 1e-4
    assert (m["graph"]["image"]["num_heads"], m["graph"]["text"]["num_heads"]) == (12, 8)
    for tower, unidirectional in (("image", 0), ("text", 1)):
        graph = onnx.load(str(vitb32_artifact / f"{tower}.onnx"), load_external_data=False)
        nodes = [n for n in graph.graph.node if n.op_type == "Attention"]
        assert count_ops(graph)["Attention"] == 12
        for n in nodes:  # the causal mask survived as unidirectional attention
            attrs = {a.name: a.i for a in n.attribute}
            assert attrs.get("unidirectional", 0) == unidirectional, (tower, n.name)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    from hf_models import save_align, save_clip, save_siglip

    root = tmp_path_factory.mktemp("hf")
    return {"clip": save_clip(root / "clip", "small"), "align": save_align(root / "align", False),
            "siglip": save_siglip(root / "siglip")}


def _export(directory, out, **kw):
    from clipfast.export.pipeline import ExportOptions, run_export

    art = run_export(ExportOptions(model=f"transformers:{directory}", out=out, progress=False,
                                   **kw))
    return json.loads((art / "manifest.json").read_text())


def test_hf_towers_fuse_one_attention_per_layer(hf_dirs, tmp_path):
    clip = _export(hf_dirs["clip"], tmp_path / "clip")
    for tower in ("image", "text"):
        fused = clip["graph"][tower]["fused"]
        assert fused["Attention"] == 2 and fused["QuickGelu"] == 2, fused
    align = _export(hf_dirs["align"], tmp_path / "align")
    text = align["graph"]["text"]
    assert text["model_type"] == "bert"
    assert text["fused"]["Attention"] == 2 and text["fused"]["EmbedLayerNormalization"] == 1
    assert align["graph"]["image"]["fused"] is None
    assert "EfficientNet" in align["graph"]["image"]["fusion"]
    assert clip["fidelity"]["passed"] and align["fidelity"]["passed"]


def test_incomplete_fusion_keeps_the_unfused_graph_and_says_why(hf_dirs, tmp_path, monkeypatch):
    # SigLIP's vision tower defeats ORT's CLIP pattern (symbolic shape inference fails on its
    # pooling head): the export must notice, keep the plain graph, and still pass.
    sig = _export(hf_dirs["siglip"], tmp_path / "siglip")
    image = sig["graph"]["image"]
    assert image["fused"] is None and "expected one per layer" in image["fusion"]
    assert image["rejected_counts"]["Attention"] == 0
    assert sig["graph"]["text"]["fused"]["Attention"] == 2
    assert sig["fidelity"]["passed"]
    # a fused graph that does not reproduce the source is rejected too
    import clipfast.export.pipeline as pipeline

    monkeypatch.setattr(pipeline, "FUSION_CHECK_TOL", -1.0)
    clip = _export(hf_dirs["clip"], tmp_path / "clip-rejected")
    for tower in ("image", "text"):
        assert clip["graph"][tower]["fused"] is None
        assert "differs from the source tower" in clip["graph"][tower]["fusion"]
    off = _export(hf_dirs["clip"], tmp_path / "clip-off", fuse=False)
    assert off["graph"]["image"] == {"fused": None, "fusion": "off (--no-fuse)",
                                     "contrib_ops": []}
