"""Manifests for backend unit tests that read a few fields: the sections a test gives over
minimal valid ones, validated like a file's (``ArtifactSpec.from_dict``), with no files on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipfast.artifact.manifest import Manifest
from clipfast.artifact.spec import ArtifactSpec

# the tower and tokenizer sections merge key by key, so a test states only what it reads
_MERGED = ("image", "text", "tokenizer")
BASE: dict[str, Any] = {
    "source": {}, "family": "test", "embed_dim": 8, "precision": "fp32",
    "image": {"file": "image.onnx", "shape": [3, 8, 8]},
    "text": {"file": "text.onnx", "inputs": ["input_ids"]},
    "preprocess": {"image_size": [8, 8]}, "tokenizer": {"kind": "hf", "context_length": 8},
    "logits": {"kind": "softmax", "scale": 1.0}, "files": {}}


def stub_manifest(directory: str | Path, data: dict[str, Any]) -> Manifest:
    """A Manifest of ``directory`` whose spec is ``data`` over BASE."""
    merged = {**BASE, **data}
    for key in _MERGED:
        if key in data:
            merged[key] = {**BASE[key], **data[key]}
    return Manifest(Path(directory), ArtifactSpec.from_dict(merged, "stub manifest"))
