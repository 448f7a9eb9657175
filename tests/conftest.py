"""Shared fixtures: artifacts exported once per session from random-weight real architectures."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# Tests never reach a hub: fail fast instead of hanging on a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# backend="auto" on the CPU walks its fixed order here instead of measuring (tests compare auto
# engines with onnxruntime ones bit for bit); tests/test_openvino_auto.py covers the measured
# choice with injected timings.
os.environ.setdefault("CLIPFAST_AUTO_TUNE", "0")


def _export(model: str, out: Path, pretrained: str | None = "none") -> Path:
    from clipfast.export.pipeline import ExportOptions, run_export

    return run_export(ExportOptions(model=model, pretrained=pretrained, out=out, progress=False))


@pytest.fixture(scope="session")
def vitb32_artifact(tmp_path_factory) -> Path:
    """open_clip ViT-B-32 at full size, random weights (seed 0), fp32."""
    return _export("ViT-B-32", tmp_path_factory.mktemp("art") / "vit-b-32")


@pytest.fixture(scope="session")
def vitb32_engine(vitb32_artifact):
    import clipfast

    return clipfast.Engine(vitb32_artifact, backend="onnxruntime")


@pytest.fixture(scope="session")
def small_clip_artifact(tmp_path_factory) -> Path:
    """A tiny transformers CLIP (64x64 input, 2+2 layers, random weights), fp32: the CLI,
    embed, Ray and serving tests share this one export."""
    from hf_models import save_clip

    root = tmp_path_factory.mktemp("small-clip")
    src = save_clip(root / "src", "small")
    return _export(f"transformers:{src}", root / "art", pretrained=None)


@pytest.fixture(scope="session")
def small_clip_engine(small_clip_artifact):
    import clipfast

    return clipfast.Engine(small_clip_artifact, backend="onnxruntime")


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real photographs bundled with scikit-image (offline)."""
    from skimage import data

    return {name: getattr(data, name)() for name in
            ("astronaut", "chelsea", "coffee", "rocket", "camera")}


@pytest.fixture(scope="session")
def export_fn():
    return _export


@pytest.fixture
def fresh_loader(monkeypatch):
    """The kernel library loader re-reads the environment; the real outcome is restored
    afterwards."""
    from clipfast.kernels import _lib

    _lib._reset_for_tests()
    yield monkeypatch
    monkeypatch.undo()
    _lib._reset_for_tests()
