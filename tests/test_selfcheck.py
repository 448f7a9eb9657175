"""Golden outputs in the artifact and the self-check every Engine runs at load
(clipfast/artifact/selfcheck.py): stored at export, checked on this host, torch-free in `clipfast
verify`,
and catching what sha256 cannot (weights edited and the manifest rehashed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import clipfast
from clipfast.artifact.manifest import load_manifest, write_manifest
from clipfast.artifact.selfcheck import GOLDEN_FILE, GOLDEN_IMAGES, GOLDEN_TEXTS, load_golden
from clipfast.errors import FidelityError


def test_export_stores_golden_outputs_and_the_engine_checks_them(vitb32_artifact):
    m = json.loads((vitb32_artifact / "manifest.json").read_text())
    golden = m["golden"]
    # listed with a checksum like every other file, and checked at export on the exporting host
    assert golden["file"] == GOLDEN_FILE and GOLDEN_FILE in m["files"]
    assert (golden["images"], golden["texts"]) == (GOLDEN_IMAGES, GOLDEN_TEXTS)
    assert golden["figures_at_export"]["passed"] is True
    assert m["exported_on"]["isa"] and isinstance(m["exported_on"]["flags"], list)
    g = load_golden(load_manifest(vitb32_artifact))
    assert g.pixel_values.shape == (GOLDEN_IMAGES, 3, 224, 224)
    assert g.text["input_ids"].shape == (GOLDEN_TEXTS, 77)
    assert g.text["input_ids"].dtype == np.int32
    engine = clipfast.Engine(vitb32_artifact, backend="onnxruntime")
    figures = engine.self_check_figures
    # the fp32 gate on this host (round-off of a 12-block fp32 graph is ~1e-6)
    assert figures["passed"] and figures["image_centred_rel_error"] <= 1e-3
    assert figures["text_centred_rel_error"] <= 1e-3
    assert engine.describe()["self_check"] == figures
    assert clipfast.Engine(vitb32_artifact, self_check=False).self_check_figures is None


def _edit_weights(src: Path, dst: Path, factor: float = 1.3) -> Path:
    """Copy an artifact, scale one MLP weight of the image tower and rehash the manifest: every
    checksum then matches, only the outputs tell."""
    import onnx
    from onnx import numpy_helper

    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "image.onnx"))
    biggest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims or [1])))
    w = numpy_helper.to_array(biggest) * factor
    biggest.CopyFrom(numpy_helper.from_array(w.astype(np.float32), biggest.name))
    onnx.save(model, str(dst / "image.onnx"))
    data = json.loads((dst / "manifest.json").read_text())
    write_manifest(dst, data, list(data["files"]))
    return dst


@pytest.fixture(scope="module")
def edited_artifact(vitb32_artifact, tmp_path_factory) -> Path:
    return _edit_weights(vitb32_artifact, tmp_path_factory.mktemp("edited") / "art")


@pytest.mark.slow
def test_edited_weights_with_a_rehashed_manifest_are_refused(edited_artifact):
    art = edited_artifact
    load_manifest(art)  # the checksums pass: sha256 alone cannot see this
    with pytest.raises(FidelityError) as info:
        clipfast.Engine(art, backend="onnxruntime")
    msg = str(info.value)
    # names the backend, the failed figures and this host's CPU
    assert "backend onnxruntime" in msg and "image_centred_rel_error" in msg
    assert "CPU" in msg and "flags" in msg
    assert info.value.figures["passed"] is False


@pytest.mark.slow
def test_auto_moves_past_refused_towers_to_the_source_model(edited_artifact):
    # the ONNX Runtime towers are refused, the figures are in the fallbacks, and the source
    # model (torch backend, which needs the export extras) serves
    pytest.importorskip("torch")
    engine = clipfast.Engine(edited_artifact)
    assert engine.backend == "torch"
    (label, reason), = [f for f in engine.fallbacks if f[0] == "onnxruntime"]
    assert reason.startswith("self-check failed") and "image_centred_rel_error" in reason


_NO_TORCH = """
import sys
for name in ("torch", "torchvision", "open_clip", "transformers"):
    sys.modules[name] = None  # import raises ImportError: an environment without them
from clipfast.cli import main
rc = main(sys.argv[1:])
assert "torch" not in [k for k, v in sys.modules.items() if v is not None]
sys.exit(rc)
"""


def _verify_without_torch(art: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(clipfast.__file__).parents[1])}
    return subprocess.run([sys.executable, "-c", _NO_TORCH, "verify", str(art)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_verify_runs_without_torch(vitb32_artifact, tmp_path):
    done = _verify_without_torch(vitb32_artifact)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "self-check against the golden outputs" in done.stdout
    assert "comparison against the PyTorch source skipped" in done.stdout
    assert "image_centred_rel_error" in done.stdout
    edited = _verify_without_torch(_edit_weights(vitb32_artifact, tmp_path / "edited"))
    assert edited.returncode == 1 and "FAILED" in edited.stdout


def test_self_check_gates_follow_the_backends_arithmetic(vitb32_artifact):
    from clipfast.artifact.fidelity import GATES
    from clipfast.artifact.selfcheck import EMBEDDING_GATES, self_check_gates

    m = load_manifest(vitb32_artifact)
    strict = self_check_gates(m)
    assert set(strict) == set(EMBEDDING_GATES)
    assert strict["image_centred_rel_error_max"] == GATES["fp32"]["image_centred_rel_error_max"]
    # a backend computing in fp16 (torch on CUDA) is held to the fp16 gates, never stricter
    loose = self_check_gates(m, "fp16")
    assert loose["image_centred_rel_error_max"] == GATES["fp16"]["image_centred_rel_error_max"]
    assert self_check_gates(m, "fp32") == strict


def test_artifact_without_golden_outputs_still_loads(vitb32_artifact, tmp_path):
    art = tmp_path / "old"
    shutil.copytree(vitb32_artifact, art)
    data = json.loads((art / "manifest.json").read_text())
    del data["golden"]
    (art / GOLDEN_FILE).unlink()
    write_manifest(art, data, [f for f in data["files"] if f != GOLDEN_FILE])
    engine = clipfast.Engine(art, backend="onnxruntime")
    assert engine.self_check_figures is None and engine.check_golden() is None
