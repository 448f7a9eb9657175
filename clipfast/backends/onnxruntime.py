"""ONNX Runtime backend (CPU execution provider; CUDA provider when present and asked for)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from clipfast.backends.base import host_array
from clipfast.errors import ArtifactError, BackendUnavailable

_DTYPES = {"tensor(int32)": np.int32, "tensor(int64)": np.int64, "tensor(float)": np.float32,
           "tensor(float16)": np.float16}


def _session_options(ort, threads: int | None):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One engine per process is the common case: use every core for one batch.
    so.intra_op_num_threads = threads or (os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    return so


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, manifest, device: str, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendUnavailable(
                f"onnxruntime is not installed ({e}); install it with `pip install onnxruntime`"
            ) from e
        available = ort.get_available_providers()
        if device == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise BackendUnavailable(
                    "onnxruntime has no CUDAExecutionProvider here (providers: "
                    f"{', '.join(available)}); install onnxruntime-gpu for device='cuda'"
                )
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.device = device
        self.max_batch = None
        so = _session_options(ort, threads)
        self._sessions = {}
        for tower in ("image", "text"):
            path = manifest.path(manifest[tower]["file"])
            try:
                self._sessions[tower] = ort.InferenceSession(str(path), so, providers=providers)
            except Exception as e:  # ORT raises its own Fail/InvalidGraph exceptions
                raise ArtifactError(f"{path}: onnxruntime cannot load it: {e}") from e
        self._image_input = self._sessions["image"].get_inputs()[0]
        self._text_inputs = {i.name: _DTYPES.get(i.type, np.int64)
                             for i in self._sessions["text"].get_inputs()}
        self.providers = self._sessions["image"].get_providers()

    def run_image(self, pixels: np.ndarray) -> np.ndarray:
        dtype = _DTYPES.get(self._image_input.type, np.float32)
        x = host_array(pixels, dtype)
        out = self._sessions["image"].run(None, {self._image_input.name: x})[0]
        return out.astype(np.float32, copy=False)

    def run_text(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        feed = {}
        for name, dtype in self._text_inputs.items():
            if name not in inputs:
                raise ArtifactError(f"text tower expects input {name!r}; tokenizer gave "
                                    f"{sorted(inputs)}")
            feed[name] = np.ascontiguousarray(inputs[name], dtype=dtype)
        out = self._sessions["text"].run(None, feed)[0]
        return out.astype(np.float32, copy=False)

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"backend": self.name, "device": self.device, "providers": self.providers,
                "onnxruntime": ort.__version__}


def load(manifest, device: str = "cpu", threads: int | None = None, **_: Any) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(manifest, device=device, threads=threads)
