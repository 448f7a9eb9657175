"""The protocol every backend implements."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Backend(Protocol):
    """A loaded pair of towers.

    run_image: ``float32 (batch, 3, H, W) -> float32 (batch, D)``, not normalised.
    run_text: ``{name: int64 (batch, L)} -> float32 (batch, D)``, not normalised; the names are the
        manifest's ``text.inputs``.
    max_batch: the largest batch one call accepts (the engine chunks to it), or None.
    """

    name: str
    device: str
    max_batch: int | None

    def run_image(self, pixels: np.ndarray) -> np.ndarray: ...

    def run_text(self, inputs: dict[str, np.ndarray]) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...


def host_array(x, dtype) -> np.ndarray:
    """A contiguous numpy array of ``dtype`` from numpy or a torch tensor (GPU preprocessing
    hands the towers torch CUDA tensors; backends that run on the host copy them down here)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=dtype)
