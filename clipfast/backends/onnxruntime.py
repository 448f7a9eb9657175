"""ONNX Runtime backend (CPU execution provider; CUDA provider when present and asked for).

Session settings, and why:
- intra-op threads = physical cores available to this process (affinity and cgroup quota
  respected): the towers are GEMM-bound, and a second hyper-thread per core only contends for the
  same FMA units; one engine per process is the common case, so one batch gets every core.
- inter-op threads 1, sequential execution: a tower is one chain of blocks, there is no branch
  parallelism to exploit, and a parallel executor only adds scheduling overhead.
- memory arena and memory pattern on: batches of one shape repeat, so allocations are planned
  once and reused.
- IO binding for torch tensors (GPU preprocessing hands CUDA tensors over): the tensor's device
  memory is bound as the input, skipping the device -> host -> device round trip. numpy inputs
  go through ``run`` (on CPU that is already zero-copy, binding would gain nothing).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from clipfast.backends.base import host_array
from clipfast.errors import ArtifactError, BackendUnavailable

# ONNX Runtime's input type strings -> numpy dtypes (what a feed must be cast to)
ORT_NUMPY_DTYPES = {"tensor(int32)": np.int32, "tensor(int64)": np.int64,
                    "tensor(float)": np.float32, "tensor(float16)": np.float16}
_DTYPES = ORT_NUMPY_DTYPES


def _cgroup_cpu_limit() -> int | None:
    """CPUs allowed by a cgroup v2 / v1 quota (containers), or None when unlimited/unknown."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota_us = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period_us = int(f.read())
        return max(1, math.ceil(quota_us / period_us)) if quota_us > 0 else None
    except (OSError, ValueError):
        return None


def physical_cores() -> int:
    """Physical cores this process may run on: logical CPUs in its affinity mask with
    hyper-thread siblings counted once (Linux sysfs topology), capped by a cgroup CPU quota.
    Falls back to the logical count where the topology is not readable."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    cores: set[tuple[str, str]] | None = set()
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(base + "physical_package_id") as f:
                package = f.read().strip()
            with open(base + "core_id") as f:
                core = f.read().strip()
        except OSError:
            cores = None
            break
        cores.add((package, core))
    count = len(cores) if cores else len(cpus)
    limit = _cgroup_cpu_limit()
    return max(1, min(count, limit) if limit else count)


def _session_options(ort, threads: int | None):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or physical_cores()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_cpu_mem_arena = True
    so.enable_mem_pattern = True
    return so


def _is_torch_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "data_ptr")


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
        self._options = {
            "intra_op_threads": so.intra_op_num_threads,
            "inter_op_threads": so.inter_op_num_threads,
            "execution_mode": "sequential",
            "memory_arena": so.enable_cpu_mem_arena,
            "memory_pattern": so.enable_mem_pattern,
            "graph_optimization": "all",
            "io_binding": "torch tensor inputs",
        }
        self._sessions = {}
        for tower in ("image", "text"):
            path = manifest.path(manifest[tower]["file"])
            try:
                self._sessions[tower] = ort.InferenceSession(str(path), so, providers=providers)
            except Exception as e:  # ORT raises its own Fail/InvalidGraph exceptions
                raise ArtifactError(f"{path}: onnxruntime cannot load it: {e}") from e
        self._image_input = self._sessions["image"].get_inputs()[0]
        self._image_output = self._sessions["image"].get_outputs()[0].name
        self._text_inputs = {i.name: _DTYPES.get(i.type, np.int64)
                             for i in self._sessions["text"].get_inputs()}
        self.providers = self._sessions["image"].get_providers()

    def _run_bound(self, tensor: Any, dtype: type) -> np.ndarray:
        """Run the image tower on a torch tensor (CPU or CUDA) bound in place: float32 (N, D)."""
        import torch

        x = tensor.detach().to(dtype=getattr(torch, np.dtype(dtype).name)).contiguous()
        if x.device.type == "cuda":
            if self.device != "cuda":
                x = x.cpu()
            else:
                # ORT reads the buffer on its own stream: the producing kernels must be done.
                torch.cuda.current_stream(x.device).synchronize()
        session = self._sessions["image"]
        binding = session.io_binding()
        binding.bind_input(self._image_input.name, device_type=x.device.type,
                           device_id=x.device.index or 0, element_type=dtype,
                           shape=tuple(x.shape), buffer_ptr=x.data_ptr())
        binding.bind_output(self._image_output, "cpu")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def run_image(self, pixels: Any) -> np.ndarray:
        dtype = _DTYPES.get(self._image_input.type, np.float32)
        if _is_torch_tensor(pixels):
            out = self._run_bound(pixels, dtype)
        else:
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
                "onnxruntime": ort.__version__, "session": dict(self._options),
                "image_input_dtype": np.dtype(_DTYPES.get(self._image_input.type, np.float32)
                                              ).name}


def load(manifest, device: str = "cpu", threads: int | None = None, **_: Any) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(manifest, device=device, threads=threads)
