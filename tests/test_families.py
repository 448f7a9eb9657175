"""Model families: the registry, adding a family as one module, and one representative of each
family exported and gated.

The representatives are the real open_clip configs (their tower classes, pooling heads,
activations, tokenizer kinds) shrunk to width 32-64, one block per tower / stage and 64x64
images, built offline (``offline_families``) with random weights, then exported
by the real pipeline (``run_export``, fp32, gate on). The full-size configs are covered by
``benchmarks/coverage.py`` (benchmarks/results/coverage.md).
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import clipfast
from clipfast.artifact.fidelity import GATES, check_gates
from clipfast.errors import ExportError
from clipfast.export import families

FP32 = GATES["fp32"]
WIDTH = 64


# -- the registry --------------------------------------------------------------------------------
def test_every_family_module_registers_one_family():
    import pkgutil

    mods = [m.name for m in pkgutil.iter_modules(families.__path__)
            if not m.name.startswith("_") and m.name not in ("base", "offline", "cli")]
    specs = families.all_families()
    assert len(mods) == len(specs), (mods, [s.name for s in specs])
    assert len({s.name for s in specs}) == len(specs)
    for s in specs:
        assert s.summary and s.label and s.layer_names, s.name


def test_transformers_dispatch_and_labels():
    assert families.supported_model_types() == ("align", "clip", "metaclip_2", "siglip")
    assert families.for_transformers("clip", None, "openai/clip-vit-base-patch32").name == "clip"
    assert families.for_transformers("clip", None, "facebook/metaclip-b32-400m").label == \
        "metaclip"
    assert families.for_transformers("metaclip_2").label == "metaclip2"
    with pytest.raises(ExportError, match="'bert'.*align, clip, metaclip_2, siglip"):
        families.for_transformers("bert")


@pytest.mark.parametrize("name, family", [
    ("ViT-B-32", "openclip-vit"), ("ViT-B-32-quickgelu", "openclip-vit"),
    ("ViT-H-14-worldwide", "openclip-vit"), ("RN50", "openclip-resnet"),
    ("convnext_base", "openclip-convnext"), ("EVA02-B-16", "openclip-eva"),
    ("ViT-B-16-SigLIP2", "openclip-siglip"), ("MobileCLIP-S1", "openclip-mobileclip"),
    ("MobileCLIP2-L-14", "openclip-mobileclip"), ("xlm-roberta-base-ViT-B-32",
                                                 "openclip-multilingual"),
    ("nllb-clip-base-siglip", "openclip-multilingual"), ("coca_ViT-B-32", "openclip-coca"),
    ("ViTamin-S", "openclip-vitamin"), ("PE-Core-B-16", "openclip-pe"),
    ("swin_base_patch4_window7_224", "openclip-timm"),
])
def test_open_clip_configs_resolve_to_their_family(name, family):
    assert families.family_for_open_clip_name(name) == family


def test_every_open_clip_config_has_a_family():
    import open_clip

    names = {families.family_for_open_clip_name(n) for n in open_clip.list_models()}
    assert names <= {s.name for s in families.all_families()}


def test_layer_regex_is_the_union_of_the_families_block_names():
    from clipfast.export.quant_graph import layer_of

    assert layer_of("/visual/transformer/resblocks.3/mlp/c_fc/MatMul") == \
        "/visual/transformer/resblocks.3"
    assert layer_of("/text_model/encoder/layers.11/self_attn/q_proj/MatMul") == \
        "/text_model/encoder/layers.11"
    assert layer_of("/text_model/encoder/layer.2/attention/MatMul") == \
        "/text_model/encoder/layer.2"
    assert layer_of("/visual/trunk/blocks.0/attn/qkv/MatMul") == "/visual/trunk/blocks.0"
    assert layer_of("/visual/proj/MatMul") is None


THROWAWAY = '''
"""A throwaway family: a transformers model type no real family claims."""
from clipfast.export.families import register
from clipfast.export.families._hf import TransformersFamily
from clipfast.export.families.base import AttentionSpec, TowerParts


class Tower:
    pass


@register
class ToyFamily(TransformersFamily):
    name = "toy"
    label = "toy"
    model_types = ("toy_dual",)
    default_context = 16
    layer_names = ("toyunit",)
    summary = "test family"
    tower_classes = (Tower,)

    def build_towers(self, model, name):
        return TowerParts(image_tower=model.image, text_tower=model.text,
                          text_inputs=("input_ids",), embed_dim=4,
                          logits={"kind": "softmax", "scale": 1.0, "bias": None},
                          architecture={"toy": True})

    def attention(self, tower, which):
        return AttentionSpec("clip", 3, 2, 8), None
'''


def test_adding_a_family_is_one_module(tmp_path, monkeypatch):
    """A module dropped into the families package (here: a directory added to its __path__)
    is discovered and used by the registry, the transformers builder, fusion and int8's block
    grouping, with no other file touched."""
    import torch

    from clipfast.export.fusion import attention_spec
    from clipfast.export.quant_graph import layer_of
    from clipfast.export.sources_hf import build_towers

    (tmp_path / "toy_family.py").write_text(textwrap.dedent(THROWAWAY))
    monkeypatch.setattr(families, "__path__", [*families.__path__, str(tmp_path)])
    try:
        families.discover()
        mod = sys.modules["clipfast.export.families.toy_family"]
        assert families.get("toy").summary == "test family"
        assert "toy_dual" in families.supported_model_types()

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.config = type("Cfg", (), {
                    "model_type": "toy_dual",
                    "text_config": type("T", (), {"max_position_embeddings": 16})()})()
                self.image, self.text = torch.nn.Identity(), torch.nn.Identity()

        towers = build_towers(Model(), name="toy")
        assert towers.family == "toy" and towers.spec_name == "toy"
        assert towers.architecture == {"model_type": "toy_dual", "toy": True}
        spec, reason = attention_spec(mod.Tower(), "image")
        assert reason is None and spec.layers == 3
        assert layer_of("/x/toyunit.4/MatMul") == "/x/toyunit.4"
    finally:
        monkeypatch.undo()  # the package path first, so nothing rediscovers the module
        families.unregister("toy")
        families._DISCOVERED.discard("toy_family")
        sys.modules.pop("clipfast.export.families.toy_family", None)
    assert "toy_dual" not in families.supported_model_types()
    assert layer_of("/x/toyunit.4/MatMul") is None


def test_registering_a_name_twice_is_refused():
    from clipfast.export.families.base import FamilySpec

    class Clash(FamilySpec):
        name = "clip"
        loader = "transformers"

    with pytest.raises(ExportError, match="registered twice"):
        families.register(Clash)


@pytest.mark.parametrize("variant,stages", [("fastvit_mci0", 4), ("fastvit_mci3", 5)])
def test_depth_cap_keeps_each_fastvit_stage_layout(variant, stages):
    """MobileCLIP2-S3/S4's FastViT has 5 stages, S0-S2's 4: the depth cap caps each stage and
    keeps the count (a fixed 4-tuple built a model whose stages did not connect)."""
    import timm
    import torch
    from offline_families import timm_depth

    with torch.device("meta"), timm_depth(1):
        model = timm.create_model(variant)
    assert [len(s.blocks) for s in model.stages] == [1] * stages
    with torch.device("meta"):
        full = timm.create_model(variant)
    assert sum(len(s.blocks) for s in full.stages) > stages  # the cap is gone afterwards


# -- one representative per family, exported and gated ---------------------------------------
def _vit(cfg: dict[str, Any], width: int = WIDTH) -> None:
    v = cfg["vision_cfg"]
    v.update(width=width, layers=1, head_width=32, image_size=64, patch_size=16)
    v.pop("mlp_ratio", None)


def _text(cfg: dict[str, Any], width: int = WIDTH) -> None:
    t = cfg.setdefault("text_cfg", {})
    if "hf_model_name" not in t:
        t.update(width=width, heads=2, layers=1)
        if t.get("vocab_size", 0) > 4096 and t.get("hf_tokenizer_name"):
            t["vocab_size"] = 4096  # stand-in tokenizer ids stay below 2000
    cfg["embed_dim"] = 32


def _small_timm(name: str) -> dict[str, Any]:
    if name.startswith("convnext"):
        return {"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128)}
    if name.startswith("fastvit"):
        return {"layers": (1, 1, 1, 1), "embed_dims": (16, 32, 64, 128)}
    return {"depth": 1, "embed_dim": WIDTH, "num_heads": 2, "img_size": 64}


def _edit_vit_text(cfg: dict[str, Any]) -> None:
    _vit(cfg)
    _text(cfg)


def _edit_resnet(cfg: dict[str, Any]) -> None:
    cfg["vision_cfg"].update(layers=[1, 1, 1, 1], width=16, head_width=32, image_size=64)
    _text(cfg)


def _edit_timm(cfg: dict[str, Any]) -> None:
    cfg["vision_cfg"]["image_size"] = 64
    _text(cfg)
    cfg["embed_dim"] = WIDTH  # SigLIP's timm tower has no projection: embed_dim = width


def _edit_coca(cfg: dict[str, Any]) -> None:
    _vit(cfg)
    _text(cfg)
    cfg["vision_cfg"].update(attn_pooler_heads=2)
    cfg["multimodal_cfg"].update(width=WIDTH, heads=2, layers=1)


HF_SMALL = {"hidden_size": WIDTH, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 128, "vocab_size": 4096, "max_position_embeddings": 80}

REPRESENTATIVES = {
    # name: (open_clip config, edit, timm kwargs, hf text overrides, expected family)
    "vit": ("ViT-B-32", _edit_vit_text, None, None, "openclip-vit"),
    "quickgelu-metaclip": ("ViT-B-32-quickgelu", _edit_vit_text, None, None, "openclip-vit"),
    "worldwide-metaclip2": ("ViT-H-14-worldwide", _edit_vit_text, None, None, "openclip-vit"),
    "resnet": ("RN50", _edit_resnet, None, None, "openclip-resnet"),
    "convnext": ("convnext_base", _edit_timm, _small_timm, None, "openclip-convnext"),
    "eva": ("EVA02-B-16", _edit_timm, _small_timm, None, "openclip-eva"),
    "siglip2": ("ViT-B-16-SigLIP2", _edit_timm, _small_timm, None, "openclip-siglip"),
    "mobileclip": ("MobileCLIP-S1", _edit_timm, _small_timm, None, "openclip-mobileclip"),
    "xlm-roberta": ("xlm-roberta-base-ViT-B-32", _edit_vit_text, None, HF_SMALL,
                    "openclip-multilingual"),
    "coca": ("coca_ViT-B-32", _edit_coca, None, None, "openclip-coca"),
}


def _export_small(key: str, tmp_path: Path) -> tuple[dict[str, Any], str]:
    from offline_families import register_offline_config, timm_kwargs

    from clipfast.export.pipeline import ExportOptions, run_export

    base, edit, timm_kw, hf, _ = REPRESENTATIVES[key]
    oc = register_offline_config(base, tmp_path / "cfg", None, edit=edit, hf_overrides=hf,
                                 suffix="@tiny")
    with timm_kwargs(timm_kw):
        out = run_export(ExportOptions(model=oc.name, out=tmp_path / "art", pretrained="none",
                                       progress=False))
    return json.loads((out / "manifest.json").read_text()), oc.name


@pytest.mark.slow
@pytest.mark.parametrize("key", list(REPRESENTATIVES))
def test_family_representative_exports_and_passes_fp32(key, tmp_path):
    manifest, name = _export_small(key, tmp_path)
    fid = manifest["fidelity"]
    assert fid["passed"] is True and not check_gates(fid, FP32), fid
    # centred relative error, not cosine alone (random towers have near-collinear embeddings)
    assert fid["image_centred_rel_error"] <= FP32["image_centred_rel_error_max"], fid
    assert fid["text_centred_rel_error"] <= FP32["text_centred_rel_error_max"], fid
    assert fid["token_ids_identical"] is True
    assert manifest["architecture"]["family_spec"] == REPRESENTATIVES[key][4]
    graph = manifest["graph"]
    if key in ("vit", "quickgelu-metaclip", "worldwide-metaclip2"):
        # open_clip ViT towers: attention rewritten and fused, one Attention per block (the
        # worldwide text tower pools at the first eos id: open_clip's encode_text, unfused)
        for which in ("image", "text") if key != "worldwide-metaclip2" else ("image",):
            assert graph[which]["fusion"] == "ok", graph[which]
            assert graph[which]["fused"]["Attention"] == graph[which]["layers"] == 1
    if key == "quickgelu-metaclip":
        assert manifest["architecture"]["quick_gelu"] is True
        assert graph["image"]["fused"]["QuickGelu"] >= 1
    if key == "worldwide-metaclip2":
        assert manifest["tokenizer"]["kind"] == "hf"  # XLM-V style stand-in, eos pooling
    if key == "xlm-roberta":
        assert "not open_clip's built-in" in graph["text"]["fusion"]


@pytest.mark.slow
def test_resnet_random_weights_are_not_degenerate_and_pass_fp16(tmp_path):
    """open_clip's ResNet init maps every image to nearly one embedding (fp16 rounding alone then
    fails the centred-error gate); the family's random_init calibrates BatchNorm like a trained
    tower, and the fp16 export passes."""
    from offline_families import register_offline_config

    from clipfast.export.pipeline import ExportOptions, run_export

    oc = register_offline_config("RN50", tmp_path / "cfg", None, edit=_edit_resnet,
                                 suffix="@tiny16")
    out = run_export(ExportOptions(model=oc.name, out=tmp_path / "art", pretrained="none",
                                   precision="fp16", progress=False))
    m = json.loads((out / "manifest.json").read_text())
    assert any("BatchNorm" in note for note in m["architecture"]["random_init"])
    fid = m["fidelity"]
    assert fid["passed"] is True and not check_gates(fid, GATES["fp16"]), fid
    assert fid["image_centred_rel_error"] <= GATES["fp16"]["image_centred_rel_error_max"]


@pytest.mark.slow
def test_coca_fp16_keeps_its_fused_image_tower(tmp_path):
    """ONNX Runtime 1.32's NCHWc layout transformer crashes the process (SIGSEGV) creating a CPU
    session for CoCa's fused fp16 image tower. Sessions of fp16 graphs run without it, at
    export and at run time, so the fused graph is kept, loads, and passes the fp16 gates."""
    from offline_families import register_offline_config

    from clipfast.backends.onnxruntime import FP16_DISABLED_OPTIMIZERS
    from clipfast.export.pipeline import ExportOptions, run_export

    oc = register_offline_config("coca_ViT-B-32", tmp_path / "cfg", None, edit=_edit_coca,
                                 suffix="@tiny16")
    out = run_export(ExportOptions(model=oc.name, out=tmp_path / "art", pretrained="none",
                                   precision="fp16", progress=False))
    m = json.loads((out / "manifest.json").read_text())
    image = m["graph"]["image"]
    assert image["fusion"] == "ok" and image["fused"]["Attention"] == 1, image
    fid = m["fidelity"]
    assert fid["passed"] is True and not check_gates(fid, GATES["fp16"]), fid
    from clipfast.artifact.samples import sample_images

    engine = clipfast.Engine(out, backend="onnxruntime")  # loads in this process: no crash
    assert set(FP16_DISABLED_OPTIMIZERS) <= set(engine.describe()["session"]["disabled_optimizers"])
    assert engine.encode_images(sample_images(2)).shape == (2, m["embed_dim"])


def test_metaclip2_transformers_exports_and_passes_fp32(tmp_path):
    """Worldwide MetaCLIP 2 through transformers (model_type metaclip_2), small random model."""
    import hf_models

    from clipfast.export.pipeline import ExportOptions, run_export

    d = hf_models.save_metaclip2(tmp_path / "mc2")
    out = run_export(ExportOptions(model=f"transformers:{d}", out=tmp_path / "art",
                                   progress=False))
    m = json.loads((out / "manifest.json").read_text())
    assert m["family"] == "metaclip2"
    fid = m["fidelity"]
    assert fid["passed"] is True and not check_gates(fid, FP32), fid
    assert max(fid["image_centred_rel_error"], fid["text_centred_rel_error"]) <= 1e-3


def test_offline_config_records_its_assumptions(tmp_path):
    from offline_families import offline_config

    oc = offline_config("xlm-roberta-base-ViT-B-32", tmp_path, 2)
    assert oc.name == "xlm-roberta-base-ViT-B-32@L2"
    tc = oc.config["text_cfg"]
    assert Path(tc["hf_model_name"]).is_dir() and tc["hf_model_pretrained"] is False
    cfg = json.loads((Path(tc["hf_model_name"]) / "config.json").read_text())
    assert cfg["vocab_size"] == 250002 and cfg["num_hidden_layers"] == 2
    assert any("stand-in" in a for a in oc.assumptions)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tc["hf_tokenizer_name"])
    ids = tok("a photo of a cat")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and tok.pad_token_id == 1  # XLM-R <s> ... </s>, <pad>
    assert np.max(ids) < 250002


# -- clipfast models -----------------------------------------------------------------------------
def test_models_lists_every_open_clip_config_with_a_command(capsys):
    import open_clip

    from clipfast.cli import main

    assert main(["models", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {r["model"]: r for r in data["open_clip"]}
    assert set(rows) == set(open_clip.list_models())
    rn = rows["RN50"]
    assert rn["family"] == "openclip-resnet" and "openai" in rn["pretrained"]
    assert rn["export"] == "clipfast export --model RN50 --pretrained openai --out rn50-openai"
    assert all(r["export"].startswith(f"clipfast export --model {n} ") for n, r in rows.items())
    hf = {r["family"] for r in data["transformers"]}
    assert hf == {"clip", "metaclip", "metaclip2", "align", "siglip"}
    assert "transformers:kakaobrain/align-base" in {r["model"] for r in data["transformers"]}
    assert main(["models", "--family", "openclip-coca"]) == 0
    text = capsys.readouterr().out
    assert "coca_ViT-B-32" in text and "RN50 " not in text


def test_models_without_the_export_extras_names_the_install(monkeypatch, capsys):
    from clipfast.cli import main

    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip -> ImportError
    assert main(["models"]) == 1
    assert "pip install 'clipfast[export]'" in capsys.readouterr().err


def test_cli_module_imports_without_torch():
    """clipfast.cli (and with it the models subcommand) must import without the export extras."""
    import subprocess

    code = ("import sys; sys.modules['torch'] = None; sys.modules['open_clip'] = None; "
            "import clipfast.cli as c; c.build_parser(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
