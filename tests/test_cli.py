"""The command line on an exported artifact."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from clipfast.cli import main


def test_info(vitb32_artifact, capsys):
    assert main(["info", str(vitb32_artifact)]) == 0
    out = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in out and "image.onnx" in out and "fidelity" in out


def test_encode_images_with_a_bad_file(vitb32_artifact, tmp_path, photos, capsys):
    Image.fromarray(photos["chelsea"]).save(tmp_path / "cat.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "emb.npy"
    rc = main(["encode", str(vitb32_artifact), str(tmp_path), "--out", str(out), "--quiet"])
    assert rc == 2  # some inputs failed; the good rows are still written
    emb = np.load(out)
    index = json.loads(out.with_suffix(".json").read_text())
    assert emb.shape == (1, 512) and index["rows"][0].endswith("cat.jpg")
    assert index["failures"][0]["item"].endswith("broken.jpg")
    assert "broken.jpg" in capsys.readouterr().err


def test_encode_texts(vitb32_artifact, tmp_path):
    out = tmp_path / "t.npy"
    args = ["encode", str(vitb32_artifact), "--texts", "a cat", "a dog", "--out", str(out)]
    assert main(args) == 0
    assert np.load(out).shape == (2, 512)


def test_verify_passes_on_a_fresh_export(vitb32_artifact, capsys):
    assert main(["verify", str(vitb32_artifact)]) == 0
    assert "gates passed" in capsys.readouterr().out


def test_verify_fails_when_gates_are_not_met(vitb32_artifact, tmp_path, capsys):
    import shutil

    art = tmp_path / "strict"
    shutil.copytree(vitb32_artifact, art)
    m = json.loads((art / "manifest.json").read_text())
    m["gates"]["image_centred_rel_error_max"] = 0.0  # nothing real meets a zero-error gate
    (art / "manifest.json").write_text(json.dumps(m))
    assert main(["verify", str(art)]) == 1
    assert "image_centred_rel_error" in capsys.readouterr().out


def test_export_refuses_fp16_io_for_int8(tmp_path, capsys):
    rc = main(["export", "--model", "ViT-B-32", "--pretrained", "none", "--precision", "int8",
               "--io", "fp16", "--out", str(tmp_path / "a")])
    assert rc == 1
    assert "--io fp16" in capsys.readouterr().err
