"""OpenVINO backend: the artifact's ONNX graphs on OpenVINO's CPU plugin (no torch).

Graphs: the artifact's own tower graphs, read by OpenVINO's ONNX frontend, which also converts
ONNX Runtime's fused ``com.microsoft`` operators clipfast's export produces (Attention,
SkipLayerNormalization, QuickGelu; checked by the held-out parity tests). A graph the frontend
cannot convert is a skip (BackendUnavailable) that says to re-export with ``--no-fuse``.
Shapes are compiled as the graph declares them (dynamic batch, and a dynamic sequence axis
where the text graph has one): nothing is reshaped here.

Precision, always stated (OpenVINO otherwise picks bf16 by itself on some CPUs, AMX Xeons among
them, which would lower an fp32 artifact's precision silently):
- ``f32``: ``INFERENCE_PRECISION_HINT=f32``. The default for fp32 and fp16 artifacts (an fp16
  graph's weights are widened, computing above the graph's precision).
- ``bf16``: ``INFERENCE_PRECISION_HINT=bf16``, only where the CPU plugin reports BF16 among its
  optimization capabilities (AVX512_BF16 or AMX); elsewhere BackendUnavailable says so. Never a
  default: it is asked for (``ov_precision="bf16"``, or ``allow_precisions`` in ``auto``), and the
  golden self-check holds it to the bf16 gates (``clipfast.artifact.fidelity.GATES["bf16"]``, or the
  artifact's ``precision_gates``).
- int8: an int8 artifact's own Q/DQ graph, with ``f32`` for what the graph leaves float.
  OpenVINO's low-precision transformations run the quantized matmuls on its u8/i8 kernels.
``describe()`` names the hint and, per tower, the precisions OpenVINO's compiled model really
runs its matmul and convolution layers in (from the runtime model), e.g. ``{"u8": 48, "f32": 1}``.

Threads: ``INFERENCE_NUM_THREADS`` = ``threads`` or the physical cores available to the process
(as the onnxruntime backend), with the LATENCY performance hint: one batch at a time gets every
core, as the engine sends it.

Compiled-model cache: OpenVINO's ``CACHE_DIR`` in the artifact's ``openvino`` cache folder
(``clipfast.artifact.cache``: inside the artifact when writable, else under
``$CLIPFAST_CACHE_DIR``), in a
subfolder keyed by the host (CPU model, ISA flags) and the OpenVINO version; OpenVINO keys each
blob by the graph and the compile options within it. A second load then imports the compiled
blob instead of compiling. Without a writable cache the backend compiles each time and
``describe()["cache_dir"]`` says why.

Backend options (``OPTIONS``; any other raises InputError):
- ``ov_precision`` ("auto" | "f32" | "bf16", "auto"): "auto" follows the artifact (f32 for fp32 /
  fp16 artifacts, the Q/DQ graph with f32 elsewhere for int8 ones); "bf16" on an int8 artifact
  runs its float parts in bf16.
- ``ov_cache`` (bool, True): use the compiled-model cache.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from clipfast.backends.base import Backend, OptionSpec, choice, flag, host_array, text_feed
from clipfast.errors import ArtifactError, BackendUnavailable, ClipfastError

log = logging.getLogger("clipfast")

PRECISIONS = ("auto", "f32", "bf16")
OPTIONS = OptionSpec("openvino", choice("ov_precision", "auto", PRECISIONS),
                     flag("ov_cache", True))
INSTALL_HINT = "pip install 'clipfast[openvino]'"
CACHE_PURPOSE = "openvino"
# Layers whose runtime precision describe() reports: where the arithmetic is.
_COMPUTE_LAYERS = ("FullyConnected", "MatMul", "Convolution", "ScaledDotProductAttention",
                   "GroupConvolution")


def import_openvino():
    """The ``openvino`` module; BackendUnavailable saying how to install it otherwise."""
    try:
        import openvino as ov
    except ImportError as e:
        raise BackendUnavailable(f"OpenVINO is not installed ({e}); install it with "
                                 f"`{INSTALL_HINT}`") from e
    return ov


def bf16_unavailable_reason(core=None) -> str | None:
    """Why bf16 inference cannot run on this CPU, or None when it can: OpenVINO's CPU plugin
    lists BF16 among its optimization capabilities only on AVX512_BF16 or AMX hardware."""
    from clipfast.cpu import host_cpu

    try:
        core = core or import_openvino().Core()
        caps = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except BackendUnavailable as e:
        return str(e)
    except Exception as e:  # OpenVINO raises RuntimeError subclasses of its own
        return f"OpenVINO cannot describe the CPU plugin ({e})"
    if "BF16" in caps:
        return None
    return (f"bf16 needs a CPU with AVX512_BF16 or AMX; OpenVINO's CPU plugin reports "
            f"{', '.join(caps) or 'no'} capabilities here ({host_cpu().describe()})")


def host_key(ov_version: str) -> str:
    """The cache subfolder name of this host: the OpenVINO version and 12 hex digits of the CPU
    model and flags (a compiled blob is only valid for the ISA it was compiled for)."""
    from clipfast.cpu import host_cpu

    cpu = host_cpu()
    digest = hashlib.sha256(f"{cpu.machine}|{cpu.model}|{' '.join(cpu.flags)}".encode())
    return f"ov{ov_version.split('-')[0]}-{cpu.machine}-{digest.hexdigest()[:12]}"


def compiled_cache_dir(manifest, ov_version: str) -> tuple[Path | None, str]:
    """``(folder, note)``: the compiled-model cache for this artifact and host, created, or
    ``(None, why not)``."""
    from clipfast.artifact.cache import artifact_cache_dir

    try:
        path = artifact_cache_dir(manifest, CACHE_PURPOSE) / host_key(ov_version)
        path.mkdir(parents=True, exist_ok=True)
    except (ClipfastError, OSError) as e:
        return None, f"off: {e}"
    return path, str(path)


def runtime_precisions(compiled) -> dict[str, int]:
    """``{precision: count}`` of the compute layers (matmuls, convolutions) of a compiled model,
    as OpenVINO's runtime model reports them: the arithmetic that really runs."""
    counts: collections.Counter[str] = collections.Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        try:
            layer = info["layerType"].astype(str)
            precision = info["runtimePrecision"].astype(str)
        except (KeyError, RuntimeError):
            continue
        if layer in _COMPUTE_LAYERS:
            counts[precision] += 1
    return dict(sorted(counts.items()))


def _numpy_dtype(element_type) -> type:
    name = element_type.get_type_name()
    return {"f32": np.float32, "f16": np.float16, "i32": np.int32, "i64": np.int64}.get(
        name, np.float32)


class OpenVinoBackend(Backend):
    name = "openvino"
    device = "cpu"

    def __init__(self, manifest, device: str = "cpu", threads: int | None = None, *,
                 ov_precision: str, ov_cache: bool):
        """``load`` checks the options (``OPTIONS.validate``) before this runs."""
        use_cache = ov_cache
        if device != "cpu":
            raise BackendUnavailable(f"the openvino backend runs on the CPU; device={device!r} "
                                     "was asked for")
        ov = import_openvino()
        import openvino.properties as props
        import openvino.properties.hint as hints

        from clipfast.backends.onnxruntime import physical_cores

        core = ov.Core()
        artifact = manifest.spec.precision
        hint = "f32" if ov_precision == "auto" else ov_precision
        if hint == "bf16":
            reason = bf16_unavailable_reason(core)
            if reason:
                raise BackendUnavailable(f"openvino bf16: {reason}")
        # The precision the towers compute in, for the self-check's gates and describe():
        # int8 artifacts keep their quantized matmuls whatever the float hint.
        self.precision = "int8" if artifact == "int8" else (
            "bf16" if hint == "bf16" else artifact or "fp32")
        self.threads = int(threads or physical_cores())
        config: dict[str, Any] = {
            hints.inference_precision(): ov.Type.bf16 if hint == "bf16" else ov.Type.f32,
            hints.execution_mode(): hints.ExecutionMode.PERFORMANCE,
            hints.performance_mode(): hints.PerformanceMode.LATENCY,
            props.inference_num_threads(): self.threads,
        }
        self.cache_dir, self._cache_note = (compiled_cache_dir(manifest, ov.__version__)
                                            if use_cache else (None, "off (ov_cache=False)"))
        if self.cache_dir is not None:
            config[props.cache_dir()] = str(self.cache_dir)
        self._ov = ov
        self._compiled: dict[str, Any] = {}
        self._requests: dict[str, Any] = {}
        self._locks = {t: threading.Lock() for t in ("image", "text")}
        self.runtime: dict[str, dict[str, int]] = {}
        for tower in ("image", "text"):
            path = manifest.path(manifest.spec.tower(tower).file)
            try:
                # compile_model(path) (rather than read_model first) lets OpenVINO import a
                # cached blob without converting the ONNX graph again.
                compiled = core.compile_model(str(path), "CPU", config)
            except Exception as e:  # OpenVINO's conversion / compile errors are RuntimeErrors
                ops = manifest.spec.graph.contrib_ops(tower)
                hint_text = (f"; its graph uses ONNX Runtime fused operators ({', '.join(ops)}): "
                             "re-export with `clipfast export ... --no-fuse` for plain graphs"
                             if ops else "")
                raise BackendUnavailable(f"{path}: OpenVINO cannot compile it ({e})"
                                         f"{hint_text}") from e
            self._compiled[tower] = compiled
            self._requests[tower] = compiled.create_infer_request()
            self.runtime[tower] = runtime_precisions(compiled)
        got = self._compiled["image"].get_property(hints.inference_precision())
        self.inference_precision = got.get_type_name()
        if self.inference_precision != hint:
            # The plugin took another precision than the one stated: never run it unsaid.
            raise BackendUnavailable(f"openvino: inference precision {hint} was asked for, the "
                                     f"CPU plugin compiled {self.inference_precision}")
        if self.precision == "bf16":
            log.info("clipfast openvino: computing in bf16, below the artifact's %s (asked for; "
                     "held to the bf16 gates)", artifact)
        image_in = self._compiled["image"].inputs[0]
        self._image_dtype = _numpy_dtype(image_in.get_element_type())
        # A port can carry several tensor names (an input feeding a Cast keeps both): the
        # manifest's names are the ones the tokenizer gives.
        self._text_inputs = {}
        for name in manifest.spec.text.inputs:
            try:
                port = self._compiled["text"].input(name)
            except RuntimeError as e:
                raise ArtifactError(f"{manifest.path(manifest.spec.text.file)}: the text graph "
                                    f"has no input {name!r} (manifest text.inputs): {e}"
                                    ) from e
            self._text_inputs[name] = _numpy_dtype(port.get_element_type())

    def _infer(self, tower: str, feed: dict[str, np.ndarray] | list[np.ndarray]) -> np.ndarray:
        # One infer request per tower, reused: it holds the compiled model's memory plan.
        # The lock makes concurrent callers (a server's threads) take turns on it.
        with self._locks[tower]:
            result = self._requests[tower].infer(feed)
            return np.array(result[0], dtype=np.float32, copy=True)

    def run_image(self, pixels: Any) -> np.ndarray:
        return self._infer("image", [host_array(pixels, self._image_dtype)])

    def run_text(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        feed = text_feed(inputs, self._text_inputs)
        return self._infer("text", feed)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": self.device,
                "openvino": self._ov.__version__,
                "inference_precision": self.inference_precision,
                "compute_precision": self.precision,
                "runtime_precisions": {t: dict(c) for t, c in self.runtime.items()},
                "threads": self.threads, "performance_hint": "LATENCY",
                "cache_dir": self._cache_note}


def load(manifest, device: str = "cpu", threads: int | None = None, **options: Any
         ) -> OpenVinoBackend:
    """The openvino backend; ``options`` are this backend's (``OPTIONS``, in the module
    docstring), checked before anything loads: InputError names an unknown one or a bad
    value."""
    return OpenVinoBackend(manifest, device=device, threads=threads, **OPTIONS.validate(options))
