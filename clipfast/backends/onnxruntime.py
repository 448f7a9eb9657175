"""ONNX Runtime backend: CPU execution provider, or on ``device="cuda"`` the CUDA execution
provider (TensorRT execution provider first with ``ort_tensorrt=True``).

Session settings, and why:
- intra-op threads = physical cores available to this process (affinity and cgroup quota
  respected): the towers are GEMM-bound, and a second hyper-thread per core only contends for the
  same FMA units; one engine per process is the common case, so one batch gets every core.
- inter-op threads 1, sequential execution: a tower is one chain of blocks, there is no branch
  parallelism to exploit, and a parallel executor only adds scheduling overhead.
- memory arena and memory pattern on: batches of one shape repeat, so allocations are planned
  once and reused.
- CPU sessions only: ORT's online ``SkipLayerNormFusion`` is disabled. It matters for graphs
  whose SkipLayerNormalization was split back into Add + LayerNormalization (the int8 export
  does that, export/quantize.py): on the x86 CPU the benchmarks ran on, the dynamic int8 and the
  fp32 ViT-B-32 image towers with their SkipLayerNorm split ran faster with the fusion off
  (benchmarks/results/int8_cpu_sweep.md has the figures). Graphs fused at export keep their
  SkipLayerNormalization nodes either way. On CUDA the fused kernel saves a read and a write of
  the activations, so CUDA sessions keep the fusion.
- CUDA: inputs are bound on the device with IO binding (numpy inputs copied once into a cached
  device OrtValue of that shape, torch CUDA tensors from GPU preprocessing bound in place), the
  output is allocated on the device by ORT and copied to the host once. Without binding, ``run``
  copies inputs and outputs through pageable host buffers on every call.
- TensorRT EP (``ort_tensorrt=True``): engines are built for the batch profile (explicit
  min/opt/max shapes, so a new batch size does not trigger a rebuild) and cached, with the timing
  cache, in the artifact's ``ort-tensorrt`` cache (clipfast.artifact.cache: inside the artifact
  when it is
  writable, else under ``$CLIPFAST_CACHE_DIR``). The CUDA EP stays behind it for any node
  TensorRT does not take.

Backend options (``Engine(..., backend_options={...})``; ``OPTIONS``, any other raises
InputError):
- ``device_id`` (int, 0): the CUDA device.
- ``ort_tensorrt`` (bool, False): put TensorrtExecutionProvider first.
- ``ort_trt_fp16`` (bool | None, None): TensorRT's fp16 builder flag (``trt_fp16_enable``).
  None follows the artifact: on for an fp16 artifact (whose graph is already fp16 where that is
  safe), off for fp32 / int8 ones, where it would let TensorRT run fp32 layers in fp16 and so
  override the precision the graph states. int8 (QDQ) artifacts always get
  ``trt_int8_enable``: TensorRT refuses a network with int8 Q/DQ layers without it.
- ``ort_cudnn_conv_algo_search`` ("EXHAUSTIVE" | "HEURISTIC" | "DEFAULT", "EXHAUSTIVE").
- ``ort_arena_extend_strategy`` ("kNextPowerOfTwo" | "kSameAsRequested", "kSameAsRequested"):
  the engine sends a few fixed batch shapes, so growing the arena by what is asked avoids
  reserving up to twice the memory for nothing.
- ``profile`` (``BatchProfile`` | {"min", "opt", "max"} | (min, opt, max), (1, 64, 256)): the
  TensorRT EP's optimization profile, and then the backend's ``max_batch``.

int8 on the CPU: an artifact in the portable int8 format (7-bit weights) runs on ONNX Runtime's
integer kernels everywhere. A full-range static (Q/DQ) tower on an x86 CPU without VNNI, whose
u8 x s8 kernels saturate (``clipfast.cpu``), runs its Q/DQ pairs as float instead
(``session.disable_quant_qdq``): the integers the graph states, at fp32 speed, rather than wrong
embeddings at int8 speed. ``describe()["int8"]`` says which, per tower; a full-range dynamic
tower there (integer operators only) cannot run correctly and is refused.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from clipfast.artifact.cache import artifact_cache_dir
from clipfast.artifact.manifest import tower_input_dims
from clipfast.backends.base import (
    DEVICE_ID,
    Backend,
    BackendInfo,
    Option,
    OptionSpec,
    choice,
    flag,
    host_array,
    is_torch_tensor,
    option_bool,
    text_feed,
)
from clipfast.backends.batching import PROFILE, BatchProfile
from clipfast.errors import ArtifactError, BackendUnavailable, ClipfastError, InputError

# ONNX Runtime's input type strings -> numpy dtypes (what a feed must be cast to)
ORT_NUMPY_DTYPES = {"tensor(int32)": np.int32, "tensor(int64)": np.int64,
                    "tensor(float)": np.float32, "tensor(float16)": np.float16}

CPU_EP, CUDA_EP, TRT_EP = ("CPUExecutionProvider", "CUDAExecutionProvider",
                           "TensorrtExecutionProvider")
# Graph transformers disabled on CPU-only sessions (see the module docstring for the numbers).
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
# Graph transformers disabled for fp16 graphs, on every device. ONNX Runtime 1.32's NCHWc layout
# transformer crashes the process (SIGSEGV) creating a session for some fp16 graphs (CoCa
# ViT-B-32's fused image tower, ViT-M-16-alt's image tower). Its blocked layouts serve fp32 Conv
# kernels only, so an fp16 graph loses nothing by it (on the CPU fp16 runs for fidelity checks;
# its speed is the GPU's, where the transformer does not apply).
FP16_DISABLED_OPTIMIZERS = ("NchwcTransformer",)


def precision_disabled_optimizers(precision: str | None) -> tuple[str, ...]:
    """Graph transformers every session of a graph of ``precision`` runs without (the runtime's
    and the export's measurement alike)."""
    return FP16_DISABLED_OPTIMIZERS if precision == "fp16" else ()


CUDNN_CONV_ALGO_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
ARENA_EXTEND_STRATEGIES = ("kNextPowerOfTwo", "kSameAsRequested")
# The folder of the TensorRT EP's engines and timing cache (clipfast.artifact.cache).
CACHE_PURPOSE = "ort-tensorrt"
OPTIONS = OptionSpec(
    "onnxruntime", DEVICE_ID, flag("ort_tensorrt", False),
    Option("ort_trt_fp16", None, lambda v: None if v is None else option_bool("ort_trt_fp16", v)),
    choice("ort_cudnn_conv_algo_search", "EXHAUSTIVE", CUDNN_CONV_ALGO_SEARCH),
    choice("ort_arena_extend_strategy", "kSameAsRequested", ARENA_EXTEND_STRATEGIES),
    PROFILE)
# Device input buffers kept per (tower, input, shape): the engine sends a full-size chunk and at
# most a few remainders, so a handful covers steady state without holding memory for every shape.
_MAX_CACHED_INPUTS = 8

_INSTALL_GPU = ("install onnxruntime-gpu in place of onnxruntime (`pip uninstall onnxruntime && "
                "pip install onnxruntime-gpu`), with CUDA 12 and cuDNN 9 libraries")


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


def tensorrt_cache_dir(manifest, profile: BatchProfile, ort_version: str) -> Path:
    """Where the TensorRT EP keeps engines and its timing cache for this artifact, created:
    ``<artifact cache>/ort<version>-<profile>``, the artifact cache being ``<artifact>/
    ort-tensorrt`` or ``<$CLIPFAST_CACHE_DIR>/<artifact digest>/ort-tensorrt``
    (clipfast.artifact.cache).
    The leaf names the ORT version (each ORT GPU release is built against one TensorRT version)
    and the batch profile; ORT itself keys engine files by graph hash and GPU compute capability.
    BackendUnavailable when no cache folder can be written.
    """
    try:
        base = artifact_cache_dir(manifest, CACHE_PURPOSE)
    except ClipfastError as e:
        raise BackendUnavailable(f"the TensorRT EP needs a cache directory: {e}") from e
    return base / f"ort{ort_version}-{profile.tag()}"


def trt_profile_shapes(manifest, profile: BatchProfile) -> dict[str, dict[str, str]] | None:
    """TensorRT EP ``trt_profile_{min,opt,max}_shapes`` per tower ("name:NxCxHxW,..."), from the
    manifest's input names and shapes; None when the manifest lacks them (ORT then builds for
    the shapes it sees, rebuilding on a new batch size)."""
    try:
        per_tower = {tower: [(name, "x".join(map(str, tail)))
                             for name, tail in tower_input_dims(manifest, tower).items()]
                     for tower in ("image", "text")}
    except (KeyError, TypeError, ValueError):
        return None
    from clipfast.inputs.text_batching import sequence_profile

    out: dict[str, dict[str, str]] = {}
    for tower, dims in per_tower.items():
        out[tower] = {
            f"trt_profile_{which}_shapes": ",".join(f"{n}:{batch}x{tail}" for n, tail in dims)
            for which, batch in (("min", profile.min), ("opt", profile.opt), ("max", profile.max))
        }
    # a dynamic-sequence text tower: one profile over the lengths too, so no length rebuilds
    seq = sequence_profile(manifest)
    if seq is not None:
        names = list(manifest.spec.text.inputs)
        out["text"] = {
            f"trt_profile_{which}_shapes": ",".join(f"{n}:{batch}x{length}" for n in names)
            for which, batch, length in zip(("min", "opt", "max"),
                                            (profile.min, profile.opt, profile.max), seq)}
    return out


def plan_providers(device: str, available: list[str] | tuple[str, ...], *,
                   tensorrt: bool = False, device_id: int = 0, trt_fp16: bool = False,
                   trt_int8: bool = False,
                   cudnn_conv_algo_search: str = "EXHAUSTIVE",
                   arena_extend_strategy: str = "kSameAsRequested",
                   cache_dir: Path | None = None) -> tuple[list[tuple[str, dict[str, Any]]],
                                                          tuple[str, ...]]:
    """``(providers with their options, disabled optimizers)`` for one session.

    Pure: decides from ``available`` (``onnxruntime.get_available_providers()``), raising
    BackendUnavailable with what to install when the device cannot be served.
    """
    if device == "cpu":
        if tensorrt:
            # A skip, not an input error: the auto chain tries onnxruntime on the CPU after a
            # CUDA request failed, with the same options.
            raise BackendUnavailable("onnxruntime on cpu: backend option ort_tensorrt=True "
                                     "needs device='cuda'")
        return [(CPU_EP, {})], CPU_DISABLED_OPTIMIZERS
    if device != "cuda":
        raise InputError(f"device={device!r}: expected 'cpu' or 'cuda'")
    if CUDA_EP not in available:
        raise BackendUnavailable(
            f"onnxruntime has no {CUDA_EP} here (providers: {', '.join(available)}); for "
            f"device='cuda' {_INSTALL_GPU}")
    # Option names and values: onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider
    # (do_copy_in_default_stream=False can race, per OrtCUDAProviderOptions' documentation).
    cuda = {"device_id": device_id, "arena_extend_strategy": arena_extend_strategy,
            "cudnn_conv_algo_search": cudnn_conv_algo_search,
            "do_copy_in_default_stream": True}
    providers: list[tuple[str, dict[str, Any]]] = []
    if tensorrt:
        if TRT_EP not in available:
            raise BackendUnavailable(
                f"onnxruntime has no {TRT_EP} here (providers: {', '.join(available)}); "
                f"ort_tensorrt=True needs onnxruntime-gpu and the TensorRT libraries "
                "(`pip install onnxruntime-gpu tensorrt`), or drop ort_tensorrt")
        if cache_dir is None:
            raise ClipfastError("the TensorRT EP needs a cache directory")
        providers.append((TRT_EP, {
            "device_id": device_id,
            "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
            "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache_dir),
            "trt_fp16_enable": trt_fp16, "trt_int8_enable": trt_int8,
        }))
    providers.append((CUDA_EP, cuda))
    providers.append((CPU_EP, {}))
    return providers, ()


def _gpu_first(providers: list[tuple[str, dict[str, Any]]]) -> bool:
    return providers[0][0] in (CUDA_EP, TRT_EP)


def int8_plan(manifest, tower: str, device: str, cpu=None) -> tuple[str | None, str]:
    """``(how, why)`` for one tower of an int8 artifact on this host: how is None (not int8, or
    integer kernels are exact here), "float-qdq" (run the Q/DQ pairs as float), or "refuse"."""
    quant = ((q := manifest.spec.quantization) and q.report(tower)
             if manifest.spec.precision == "int8" else None)
    if not isinstance(quant, dict):
        return None, "not int8"
    record = quant.get("int8_format") or {}
    safe = record.get("saturation_safe", bool(quant.get("reduce_range")))
    if device != "cpu" or safe:
        return None, ("integer kernels: 7-bit weights are exact on every CPU" if safe
                      else "integer kernels on the GPU provider")
    from clipfast.cpu import host_cpu

    cpu = cpu or host_cpu()
    if not cpu.int8_saturates:
        return None, f"integer kernels: full-range weights are exact on {cpu.isa}"
    if quant.get("method", "static_qdq") == "static_qdq":
        return "float-qdq", (f"Q/DQ run as float: full-range int8 weights would saturate "
                             f"{cpu.isa} integer kernels (no VNNI)")
    return "refuse", (f"the {tower} tower is dynamic int8 with full-range weights, which "
                      f"saturates on this CPU ({cpu.describe()}); re-export it with the "
                      "portable int8 format (the default) or use --precision fp32")


def session_options(ort, threads: int | None):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or physical_cores()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_cpu_mem_arena = True
    so.enable_mem_pattern = True
    return so


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, manifest, device: str, threads: int | None = None, *,
                 device_id: int, ort_tensorrt: bool, ort_trt_fp16: bool | None,
                 ort_cudnn_conv_algo_search: str, ort_arena_extend_strategy: str,
                 profile: BatchProfile):
        """``load`` checks the options (``OPTIONS.validate``) before this runs."""
        tensorrt = ort_tensorrt
        precision = manifest.spec.precision
        trt_fp16 = precision == "fp16" if ort_trt_fp16 is None else ort_trt_fp16
        conv_search, arena = ort_cudnn_conv_algo_search, ort_arena_extend_strategy
        batch_profile = profile
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendUnavailable(
                f"onnxruntime is not installed ({e}); install it with `pip install onnxruntime`"
            ) from e
        cache_dir = None
        if tensorrt and device == "cuda":
            cache_dir = tensorrt_cache_dir(manifest, batch_profile, ort.__version__)
        providers, disabled = plan_providers(
            device, ort.get_available_providers(), tensorrt=tensorrt, device_id=device_id,
            trt_fp16=trt_fp16, trt_int8=precision == "int8",
            cudnn_conv_algo_search=conv_search,
            arena_extend_strategy=arena, cache_dir=cache_dir)
        if cache_dir is not None:
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise BackendUnavailable(
                    f"cannot create the TensorRT EP cache directory {cache_dir} ({e}); point "
                    "CLIPFAST_CACHE_DIR at a writable directory") from e
        disabled = (*disabled, *precision_disabled_optimizers(precision))
        shapes = trt_profile_shapes(manifest, batch_profile) if tensorrt else None
        self._ort = ort
        self._device_id = device_id
        self._sessions = {}
        run_device = "cuda" if _gpu_first(providers) else "cpu"
        self.int8: dict[str, str] = {}
        for tower in ("image", "text"):
            how, why = int8_plan(manifest, tower, run_device)
            if how == "refuse":
                raise BackendUnavailable(why)
            if precision == "int8":
                self.int8[tower] = why
            so = session_options(ort, threads)
            if how == "float-qdq":
                so.add_session_config_entry("session.disable_quant_qdq", "1")
            path = manifest.path(manifest.spec.tower(tower).file)
            tower_providers = [(n, {**o, **(shapes[tower] if shapes and n == TRT_EP else {})})
                               for n, o in providers]
            try:
                self._sessions[tower] = ort.InferenceSession(
                    str(path), so, providers=tower_providers,
                    disabled_optimizers=list(disabled) or None)
            except Exception as e:  # ORT raises its own Fail/InvalidGraph/EPFail exceptions
                if _gpu_first(providers):
                    # A provider failing to build (a TensorRT engine build, a CUDA library) is a
                    # skip: the auto chain goes on to onnxruntime on the CPU, which reports a
                    # broken file as such.
                    raise BackendUnavailable(f"{path}: onnxruntime could not create a "
                                             f"{providers[0][0]} session: {e}") from e
                raise ArtifactError(f"{path}: onnxruntime cannot load it: {e}") from e
        self.providers = self._sessions["image"].get_providers()
        wanted = providers[0][0]
        for tower, session in self._sessions.items():
            # ORT falls back to the CPU provider (printing an "EP Error") when a GPU provider
            # fails to initialise, e.g. missing CUDA or TensorRT libraries: the device must say
            # where the towers really run, so that is a skip here, not a silent CPU run.
            got = session.get_providers()
            if got[0] != wanted:
                raise BackendUnavailable(
                    f"onnxruntime could not initialise {wanted} for the {tower} tower (session "
                    f"providers: {', '.join(got)}); check that the CUDA 12 / cuDNN 9"
                    f"{' / TensorRT' if tensorrt else ''} libraries are on the library path "
                    "(onnxruntime-gpu can load those of the nvidia-* pip wheels: "
                    "`onnxruntime.preload_dlls()`)")
        self.device = "cuda" if _gpu_first(providers) else "cpu"
        self.profile = batch_profile if tensorrt else None
        # The TensorRT EP serves the profile's batch range; the CUDA EP any batch.
        self.max_batch = batch_profile.max if tensorrt else None
        self._provider_options = {n: {k: v for k, v in o.items()} for n, o in providers}
        self._options = {
            "intra_op_threads": so.intra_op_num_threads,
            "inter_op_threads": so.inter_op_num_threads,
            "execution_mode": "sequential",
            "memory_arena": so.enable_cpu_mem_arena,
            "memory_pattern": so.enable_mem_pattern,
            "graph_optimization": "all",
            "disabled_optimizers": list(disabled),
            "io_binding": ("numpy and torch inputs bound on the device, output copied once"
                           if self.device == "cuda" else "torch tensor inputs"),
        }
        self._image_input = self._sessions["image"].get_inputs()[0]
        self._image_output = self._sessions["image"].get_outputs()[0].name
        self._text_inputs = {i.name: ORT_NUMPY_DTYPES.get(i.type, np.int64)
                             for i in self._sessions["text"].get_inputs()}
        self._text_output = self._sessions["text"].get_outputs()[0].name
        self._device_inputs: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    # -- CUDA: IO binding ------------------------------------------------------------------------
    def _device_input(self, tower: str, name: str, array: np.ndarray):
        """A device OrtValue holding ``array``: the cached one of that shape refilled in place,
        or a new one. Safe to reuse: ``run_with_iobinding`` returns after the run finished."""
        key = (tower, name, array.shape, array.dtype.str)
        value = self._device_inputs.get(key)
        if value is None:
            value = self._ort.OrtValue.ortvalue_from_numpy(array, "cuda", self._device_id)
            self._device_inputs[key] = value
            while len(self._device_inputs) > _MAX_CACHED_INPUTS:
                self._device_inputs.popitem(last=False)
        else:
            value.update_inplace(array)
            self._device_inputs.move_to_end(key)
        return value

    def _run_cuda(self, tower: str, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
        """Run one tower with host inputs bound as device OrtValues and the output allocated on
        the device by ORT; one host copy of the result."""
        session = self._sessions[tower]
        with self._lock:
            binding = session.io_binding()
            for name, array in feeds.items():
                binding.bind_ortvalue_input(name, self._device_input(tower, name, array))
            binding.bind_output(output, "cuda", self._device_id)
            session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0]

    def _run_bound(self, tensor: Any, dtype: type) -> np.ndarray:
        """Run the image tower on a torch tensor (CPU or CUDA) bound in place: float32 (N, D)."""
        import torch

        x = tensor.detach().to(dtype=getattr(torch, np.dtype(dtype).name)).contiguous()
        if x.device.type == "cuda":
            if self.device != "cuda":
                x = x.cpu()
            else:
                x = x.to(f"cuda:{self._device_id}")
                # ORT reads the buffer on its own stream: the producing kernels must be done.
                torch.cuda.current_stream(x.device).synchronize()
        session = self._sessions["image"]
        binding = session.io_binding()
        binding.bind_input(self._image_input.name, device_type=x.device.type,
                           device_id=x.device.index or 0, element_type=dtype,
                           shape=tuple(x.shape), buffer_ptr=x.data_ptr())
        binding.bind_output(self._image_output, self.device,
                            self._device_id if self.device == "cuda" else 0)
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def run_image(self, pixels: Any) -> np.ndarray:
        dtype = ORT_NUMPY_DTYPES.get(self._image_input.type, np.float32)
        if is_torch_tensor(pixels):
            out = self._run_bound(pixels, dtype)
        elif self.device == "cuda":
            x = host_array(pixels, dtype)
            out = self._run_cuda("image", {self._image_input.name: x}, self._image_output)
        else:
            x = host_array(pixels, dtype)
            out = self._sessions["image"].run(None, {self._image_input.name: x})[0]
        return out.astype(np.float32, copy=False)

    def run_text(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        feed = text_feed(inputs, self._text_inputs)
        if self.device == "cuda":
            out = self._run_cuda("text", feed, self._text_output)
        else:
            out = self._sessions["text"].run(None, feed)[0]
        return out.astype(np.float32, copy=False)

    def info(self) -> BackendInfo:
        return dataclasses.replace(super().info(), providers=tuple(self.providers))

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": self.device, "providers": self.providers,
                "provider_options": {n: dict(o) for n, o in self._provider_options.items()},
                "onnxruntime": self._ort.__version__, "session": dict(self._options),
                "profile": self.profile.as_dict() if self.profile else None,
                "int8": dict(self.int8) or None,
                "image_input_dtype": np.dtype(ORT_NUMPY_DTYPES.get(self._image_input.type,
                                                                   np.float32)).name}


def load(manifest, device: str = "cpu", threads: int | None = None, **options: Any
         ) -> OnnxRuntimeBackend:
    """The onnxruntime backend; ``options`` are this backend's (``OPTIONS``, described in the
    module docstring), checked before anything loads: InputError names an unknown one or a bad
    value."""
    return OnnxRuntimeBackend(manifest, device=device, threads=threads,
                              **OPTIONS.validate(options))
