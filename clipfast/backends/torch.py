"""torch backend: the source model itself (the reference, and the last fallback).

Needs the export dependencies (torch, open_clip / transformers) and the source weights: the
manifest's ``source`` section says where they come from, and their fingerprint is checked.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from clipfast.errors import BackendUnavailable, ClipfastError

log = logging.getLogger("clipfast")


class TorchBackend:
    name = "torch"

    def __init__(self, manifest, device: str, threads: int | None = None):
        try:
            import torch
        except ImportError as e:
            raise BackendUnavailable(
                "the torch backend needs PyTorch and the model sources; install them with "
                f"`pip install clipfast[export]` ({e})"
            ) from e
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("torch backend: no CUDA device is visible to PyTorch")
        try:
            from clipfast.export.sources import load_source_from_spec
        except ImportError as e:
            raise BackendUnavailable(
                f"the torch backend needs the export extras (`pip install clipfast[export]`): {e}"
            ) from e
        if threads:
            torch.set_num_threads(threads)
        try:
            self._source = load_source_from_spec(manifest["source"], device=device)
        except ClipfastError as e:
            raise BackendUnavailable(f"torch backend cannot load the source model: {e}") from e
        self.attention = "source"
        if device == "cuda" and os.environ.get("CLIPFAST_TORCH_ATTENTION", "") == "kernel":
            self._use_kernel_attention()
        self._torch = torch
        self.device = device
        self.max_batch = None
        self.text_inputs = tuple(manifest["text"]["inputs"])

    @property
    def source(self):
        """The loaded SourceModel (towers, the source's own transform and tokenizer)."""
        return self._source

    def _use_kernel_attention(self) -> None:
        """Opt-in: swap the towers' attention for the csrc kernel (see export/kernel_attention)."""
        from clipfast.export.kernel_attention import kernel_attention_tower

        reasons = []
        for which in ("image", "text"):
            attr = f"{which}_tower"
            tower, reason = kernel_attention_tower(getattr(self._source, attr), which)
            setattr(self._source, attr, tower)
            if reason:
                reasons.append(f"{which}: {reason}")
        self.attention = "kernel" + (f" (partly: {'; '.join(reasons)})" if reasons else "")
        if reasons:
            log.warning("clipfast: kernel attention not applied to every tower: %s", reasons)

    def run_image(self, pixels) -> np.ndarray:
        """``pixels``: numpy, or a torch tensor already on the device (GPU preprocessing)."""
        torch = self._torch
        with torch.inference_mode():
            if isinstance(pixels, torch.Tensor):
                x = pixels.to(self.device, torch.float32)
            else:
                x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
                x = x.to(self.device)
            return self._source.image_tower(x).float().cpu().numpy()

    def run_text(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            args = [
                torch.from_numpy(np.ascontiguousarray(inputs[n], dtype=np.int32)).to(self.device)
                for n in self.text_inputs
            ]
            return self._source.text_tower(*args).float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": self.device, "torch": self._torch.__version__,
                "source": self._source.spec.get("model"), "attention": self.attention}


def load(manifest, device: str = "cpu", threads: int | None = None, **_: Any) -> TorchBackend:
    return TorchBackend(manifest, device=device, threads=threads)
