"""clipfast: fast, verified inference for CLIP-family dual encoders."""

from __future__ import annotations

from clipfast.errors import (
    ArtifactError,
    BackendUnavailable,
    ClipfastError,
    ExportError,
    FidelityError,
    ImageLoadError,
    InputError,
    TextInputError,
)
from clipfast.types import BatchResult, Failure

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "BackendUnavailable",
    "BatchResult",
    "ClipfastError",
    "Engine",
    "ExportError",
    "Failure",
    "FidelityError",
    "ImageLoadError",
    "InputError",
    "TextInputError",
    "__version__",
    "read_embeddings",
]


def __getattr__(name: str):
    # Engine pulls in numpy/onnxruntime lazily so `import clipfast` stays cheap.
    if name == "Engine":
        from clipfast.engine import Engine

        return Engine
    if name == "read_embeddings":  # needs pyarrow (the [embed] extra): imported on first use
        from clipfast.embed.output import read_embeddings

        return read_embeddings
    raise AttributeError(f"module 'clipfast' has no attribute {name!r}")
