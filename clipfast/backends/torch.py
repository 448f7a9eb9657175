"""torch backend: the source model itself. The fp32 reference on CPU, and on CUDA the GPU baseline
users would otherwise write themselves (fp16, CUDA graphs, optionally ``torch.compile``, the csrc
attention kernel when it checks out), and the last fallback.

Needs the export dependencies (torch, open_clip / transformers) and the source weights: the
manifest's ``source`` section says where they come from, and their fingerprint is checked.

Backend options (``Engine(..., backend_options={...})``; ``OPTIONS``, any other raises
InputError):
- ``dtype``: "auto" (fp16 on CUDA, fp32 on CPU), "fp32", "fp16" or "bf16" (the last two: CUDA).
- ``cuda_graphs`` (bool; default True on CUDA): capture each tower once per batch bucket and
  replay. A ViT-B tower is a few hundred small kernels; at small batches launching them costs
  more than running them, and a replay launches them all at once.
- ``compile`` (bool, False): ``torch.compile(mode="max-autotune-no-cudagraphs")`` the towers
  (the graphs are ours); a compile failure is logged and the eager towers are used.
- ``attention``: "auto" (default: the csrc fused attention where the kernel library loads and a
  self-check on this device passes, else PyTorch's SDPA through the source modules), "sdpa" or
  "kernel" (the swap and its self-check: clipfast.backends.torch_attention).
  ``CLIPFAST_TORCH_ATTENTION=sdpa|kernel`` overrides the option.
- ``profile`` (``BatchProfile`` | {"min", "opt", "max"} | (min, opt, max), (1, 64, 256)): the
  batch buckets graphs are captured for; its max is the backend's ``max_batch`` on CUDA.
- ``device_id`` (int, 0): the CUDA device.

On CPU the backend runs the fp32 source towers eagerly, as the reference: no graphs, no compile.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from clipfast import settings
from clipfast.backends.base import (
    DEVICE_ID,
    Backend,
    BackendInfo,
    Option,
    OptionSpec,
    flag,
)
from clipfast.backends.batching import PROFILE, BatchProfile, plan_rows
from clipfast.errors import ArtifactError, BackendUnavailable, ClipfastError, InputError

log = logging.getLogger("clipfast")

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
ATTENTION_MODES = settings.ATTENTION_MODES
COMPILE_MODE = "max-autotune-no-cudagraphs"
# Eager runs on the capture stream before each capture: cuBLAS / cuDNN pick and cache their
# algorithms and workspaces and the allocator settles, none of which may happen during capture.
WARMUP_RUNS = 3
# The attention self-check batch: enough rows for a centred error (the mean of 8 embeddings).
CHECK_ROWS = 8
CHECK_TEXTS = ("a photo of a cat", "a diagram of a bridge", "the moon over a lake at night",
               "two dogs playing in the snow", "a bowl of soup", "a red car parked on a street",
               "an astronaut in a white suit", "handwritten notes on paper")


# -- options ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TorchOptions:
    """The backend options, checked and resolved for one device."""

    device: str
    dtype: str
    cuda_graphs: bool
    compile: bool
    attention: str
    attention_origin: str
    profile: BatchProfile
    device_id: int = 0


def _attention_mode(option: Any) -> str:
    if option not in ATTENTION_MODES:
        raise InputError(f"backend option attention={option!r}: expected one of "
                         f"{', '.join(ATTENTION_MODES)}")
    return option


def _dtype(option: Any) -> str:
    if option != "auto" and option not in DTYPES:
        raise InputError(f"backend option dtype={option!r}: expected one of auto, "
                         f"{', '.join(DTYPES)}")
    return option


OPTIONS = OptionSpec("torch", Option("dtype", "auto", _dtype),
                     flag("cuda_graphs", None, none_ok=True), flag("compile", False),
                     Option("attention", "auto", _attention_mode), PROFILE, DEVICE_ID)


def attention_request(option: Any, environ: Mapping[str, str] | None = None
                      ) -> tuple[str, str]:
    """``(mode, origin)``: the ``attention`` option, unless ``CLIPFAST_TORCH_ATTENTION`` is set
    (in ``environ``, default ``os.environ`` read now), which wins (origin then names the
    variable)."""
    option = _attention_mode(option)
    env = settings.value("CLIPFAST_TORCH_ATTENTION", environ)
    if env is None:
        return option, "option"
    return env, f"CLIPFAST_TORCH_ATTENTION={env}"


def parse_options(device: str, *, environ: Mapping[str, str] | None = None, **options: Any
                  ) -> TorchOptions:
    """Check the backend options (``OPTIONS.validate``: InputError names an unknown option or a
    bad value) and resolve the defaults for ``device`` ("cpu" or "cuda"); BackendUnavailable
    for a CUDA-only setting on the CPU."""
    if device not in ("cpu", "cuda"):
        raise InputError(f"device={device!r}: expected 'cpu' or 'cuda'")
    given = OPTIONS.validate(options)
    dtype = given["dtype"]
    resolved = ("fp16" if device == "cuda" else "fp32") if dtype == "auto" else dtype
    graphs = device == "cuda" if given["cuda_graphs"] is None else given["cuda_graphs"]
    do_compile = given["compile"]
    mode, origin = attention_request(given["attention"], environ)
    batch_profile, device_id = given["profile"], given["device_id"]
    if device == "cpu":
        # The CPU path is the fp32 reference; half precision, graphs and compile are CUDA
        # features here. BackendUnavailable, not InputError: in the auto chain the CPU entry is a
        # fallback for a CUDA request, and one it cannot honour is skipped with this reason.
        for asked, what in ((resolved != "fp32", f"dtype={dtype!r}"),
                            (graphs, "cuda_graphs=True"), (do_compile, "compile=True")):
            if asked:
                raise BackendUnavailable(f"torch backend on cpu: backend option {what} needs "
                                         "device='cuda' (the CPU path is the fp32 reference)")
    return TorchOptions(device, resolved, graphs, do_compile, mode, origin, batch_profile,
                        device_id)


# -- graph bookkeeping (pure, CPU-testable) ------------------------------------------------------
@dataclass
class GraphEntry:
    """One captured graph: replay it after copying a chunk into ``inputs``; ``output`` then holds
    the result (rows past the chunk are padding)."""

    graph: Any
    inputs: tuple[Any, ...]
    output: Any


@dataclass
class GraphCache:
    """Captured graphs keyed by ``(tower, bucket, input tail shape)``, one memory pool for all.

    Pure bookkeeping: ``capture(pool)`` builds an entry (the first capture gets ``pool=None``
    and its ``graph.pool()`` is handed to every later one), called once per key. ``disable``
    turns graphs off for a tower with the reason (a capture that failed), after which
    ``disabled(tower)`` returns the reason and the tower runs eagerly.
    """

    entries: dict[Hashable, GraphEntry] = field(default_factory=dict)
    captures: list[Hashable] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    pool: Any = None

    def get_or_capture(self, key: tuple, capture: Callable[[Any], GraphEntry]) -> GraphEntry:
        entry = self.entries.get(key)
        if entry is None:
            entry = capture(self.pool)
            if self.pool is None:
                self.pool = entry.graph.pool()
            self.entries[key] = entry
            self.captures.append(key)
        return entry

    def disable(self, tower: str, reason: str) -> None:
        self.reasons[tower] = reason
        for key in [k for k in self.entries if k[0] == tower]:
            del self.entries[key]
        if not self.entries:
            # the pool's owner may be gone with its graph: a released private pool cannot be
            # reopened by a later capture, so the next one starts a fresh pool
            self.pool = None

    def disabled(self, tower: str) -> str | None:
        return self.reasons.get(tower)

    def describe(self) -> dict[str, Any]:
        return {"captured": [list(k[:2]) for k in self.captures],
                "disabled": dict(self.reasons)}


def fill_static(static: Any, chunk: Any) -> None:
    """Copy ``chunk`` (n rows) into the first rows of the captured input ``static`` (bucket rows)
    and zero the rest. Towers treat rows independently, so padding never changes real rows;
    zeros keep the padded rows finite and the replay deterministic."""
    n = chunk.shape[0]
    static[:n].copy_(chunk)
    if n < static.shape[0]:
        static[n:].zero_()


# -- the backend ----------------------------------------------------------------------------------
class _CaptureFailed(Exception):
    """A CUDA graph could not be captured (the message is the first line of torch's error)."""


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, manifest, device: str, threads: int | None = None, *,
                 options: TorchOptions):
        """``load`` checks and resolves the options (``parse_options``) before this runs."""
        opts = options
        try:
            import torch
        except ImportError as e:
            raise BackendUnavailable(
                "the torch backend needs PyTorch and the model sources; install them with "
                f"`pip install clipfast[export]` ({e})"
            ) from e
        if device == "cuda":
            if not torch.cuda.is_available():
                raise BackendUnavailable("torch backend: no CUDA device is visible to PyTorch "
                                         f"(torch {torch.__version__}, built for CUDA "
                                         f"{torch.version.cuda or 'none'})")
            if opts.device_id >= torch.cuda.device_count():
                raise BackendUnavailable(f"torch backend: device_id={opts.device_id} but "
                                         f"{torch.cuda.device_count()} CUDA device(s) visible")
        try:
            from clipfast.export.sources import load_source_from_spec
        except ImportError as e:
            raise BackendUnavailable(
                f"the torch backend needs the export extras (`pip install clipfast[export]`): {e}"
            ) from e
        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self.options = opts
        self.device = device
        self._tdevice = torch.device("cuda", opts.device_id) if device == "cuda" else \
            torch.device("cpu")
        self._dtype = getattr(torch, DTYPES[opts.dtype])
        # The arithmetic the towers run in, for the self-check's gates
        # (clipfast.artifact.selfcheck):
        # fp16 and bf16 are held to the fp16 gates.
        self.precision = "fp32" if opts.dtype == "fp32" else "fp16"
        self.text_inputs = tuple(manifest.spec.text.inputs)
        try:
            self._source = load_source_from_spec(manifest.spec.source, device=str(self._tdevice))
        except ClipfastError as e:
            raise BackendUnavailable(f"torch backend cannot load the source model: {e}") from e
        self._towers: dict[str, Any] = {"image": self._source.image_tower,
                                        "text": self._source.text_tower}
        self.attention: dict[str, str] = {}
        self.compile_status = "off"
        self._compiled: dict[str, Any] = {}
        self._graphs = GraphCache()
        self._lock = threading.Lock()
        # Text lengths the Engine pads batches up to on the dynamic path: any on the CPU (eager
        # runs), a few buckets with CUDA graphs (one graph per batch bucket and length).
        self.text_lengths: tuple[int, ...] | None = None
        if device == "cpu":
            self.max_batch = None
            self.buckets: tuple[int, ...] | None = None
            self.attention = {w: "source (fp32 reference)" for w in self._towers}
            return
        self.max_batch = opts.profile.max
        self.buckets = opts.profile.buckets() if opts.cuda_graphs else None
        if self.buckets is not None and manifest.spec.text.dynamic:
            from clipfast.inputs.text_batching import length_buckets

            self.text_lengths = length_buckets(int(manifest.spec.tokenizer.context_length))
        with torch.cuda.device(self._tdevice):
            self._setup_cuda()

    @property
    def source(self):
        """The loaded SourceModel (towers, the source's own transform and tokenizer)."""
        return self._source

    # -- CUDA setup ------------------------------------------------------------------------------
    def _setup_cuda(self) -> None:
        torch = self._torch
        opts = self.options
        want_kernel, why_not = self._kernel_candidate()
        probes: dict[str, tuple] = {}
        references: dict[str, np.ndarray] = {}
        if want_kernel and opts.attention == "auto":
            # fp32 references for the self-check, before the weights are cast.
            probes = self._probe_inputs()
            with torch.inference_mode():
                references = {w: self._towers[w](*probes[w]).float().cpu().numpy()
                              for w in self._towers}
        # Cast before any kernel tower is built: those share the (cast) weights by view.
        for tower in self._towers.values():
            tower.to(dtype=self._dtype)
        for which in ("image", "text"):
            if not want_kernel:
                self.attention[which] = f"sdpa ({why_not})"
                continue
            self.attention[which] = self._try_kernel(which, probes, references)
        if opts.compile:
            self._compile_towers()
        self._capture_stream = torch.cuda.Stream(self._tdevice) if opts.cuda_graphs else None

    def _kernel_candidate(self) -> tuple[bool, str]:
        """Whether the kernel may be tried at all, else why not (recorded as the SDPA reason)."""
        opts = self.options
        if opts.attention == "sdpa":
            return False, f"chosen by {opts.attention_origin}"
        if opts.dtype == "fp32":
            return False, "the attention kernel is fp16 / bf16 only and dtype is fp32"
        from clipfast.kernels import kernels_available

        ok, reason = kernels_available()
        if not ok:
            if opts.attention == "kernel":
                log.warning("clipfast: %s asks for the attention kernel, but %s; using SDPA",
                            opts.attention_origin, reason)
            return False, f"kernel library unavailable: {reason}"
        return True, ""

    def _probe_inputs(self) -> dict[str, tuple]:
        """The self-check batch on the device: smooth random images (upsampled 8x8 noise, so the
        embeddings differ from each other) and tokenized sentences."""
        torch = self._torch
        h, w = self._source.preprocess.image_size
        g = torch.Generator(device=self._tdevice).manual_seed(0)
        base = torch.randn(CHECK_ROWS, 3, 8, 8, generator=g, device=self._tdevice) * 1.5
        pixels = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear",
                                                 align_corners=False)
        tokens = self._source.reference_tokenize(list(CHECK_TEXTS[:CHECK_ROWS]))
        text = tuple(torch.from_numpy(np.ascontiguousarray(tokens[n], dtype=np.int32)
                                      ).to(self._tdevice) for n in self.text_inputs)
        return {"image": (pixels,), "text": text}

    def _try_kernel(self, which: str, probes: dict[str, tuple],
                    references: dict[str, np.ndarray]) -> str:
        """Swap ``which``'s attention for the kernel when it applies and checks out; returns the
        attention description for ``describe()``."""
        from clipfast.backends.torch_attention import kernel_attention_tower, self_check
        from clipfast.kernels import KernelError

        tower, reason = kernel_attention_tower(self._towers[which], which)
        if reason:
            return f"sdpa (kernel does not apply: {reason})"
        if self.options.attention == "kernel":
            self._towers[which] = tower
            return f"kernel (forced by {self.options.attention_origin}; not self-checked)"
        probe = tuple(p.to(self._dtype) if p.is_floating_point() else p for p in probes[which])
        try:
            check = self_check(tower, self._towers[which], probe, references[which])
        except (KernelError, RuntimeError) as e:
            log.warning("clipfast: attention kernel self-check failed to run on the %s tower: %s",
                        which, e)
            return f"sdpa (kernel self-check raised: {e})"
        if not check.passed:
            log.warning("clipfast: attention kernel self-check failed on the %s tower: %s; "
                        "using SDPA", which, check.summary())
            return f"sdpa (kernel self-check failed: {check.summary()})"
        self._towers[which] = tower
        return f"kernel (self-check: {check.summary()})"

    def _compile_towers(self) -> None:
        torch = self._torch
        try:
            self._compiled = {w: torch.compile(t, mode=COMPILE_MODE)
                              for w, t in self._towers.items()}
            self.compile_status = f"torch.compile(mode={COMPILE_MODE!r})"
        except Exception as e:  # compile() itself rarely fails; the first call compiles
            self._compile_failed(e)

    def _compile_failed(self, error: Exception) -> None:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        reason = f"{type(error).__name__}: {first_line}"
        log.warning("clipfast: torch.compile failed (%s); running the eager towers", reason)
        self._compiled = {}
        self.compile_status = f"failed, eager towers used ({reason})"

    # -- running ---------------------------------------------------------------------------------
    def _forward(self, which: str, *args: Any) -> Any:
        """One tower call: compiled when compiling (compilation happens on the first call of a
        shape; a failure switches to the eager tower for good), else eager."""
        compiled = self._compiled.get(which)
        if compiled is not None:
            try:
                return compiled(*args)
            except Exception as e:  # inductor / dynamo raise many types; the reason is logged
                self._compile_failed(e)
        return self._towers[which](*args)

    def _capture(self, which: str, rows: int, example: tuple, pool: Any) -> GraphEntry:
        """Warm up, then capture ``which`` on static inputs of ``rows`` rows (the documented
        torch.cuda.graph pattern: warm-up on a side stream, capture on that same stream so the
        shared pool is reused effectively)."""
        torch = self._torch
        static = tuple(torch.zeros((rows, *a.shape[1:]), dtype=a.dtype, device=a.device)
                       for a in example)
        for s, a in zip(static, example, strict=True):
            fill_static(s, a)
        stream = self._capture_stream
        stream.wait_stream(torch.cuda.current_stream(self._tdevice))
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_RUNS):
                self._forward(which, *static)
        torch.cuda.current_stream(self._tdevice).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a capture must not make CUDA calls of the application's other threads
        # (another model, a data loader) fail, which the default "global" mode does.
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            output = self._forward(which, *static)
        return GraphEntry(graph, static, output)

    def _replay(self, which: str, chunk: tuple, rows: int) -> Any:
        """Run ``chunk`` through the graph of its bucket (captured on first use).

        All graphs share one memory pool. That is safe here because replays never overlap (one
        lock, one stream) and each output is copied out right after its replay, before any other
        graph can reuse that memory.
        """
        key = (which, rows, *(tuple(a.shape[1:]) for a in chunk))
        try:
            entry = self._graphs.get_or_capture(key, lambda pool: self._capture(which, rows, chunk,
                                                                                pool))
        except RuntimeError as e:  # only capture failures turn graphs off; replay errors raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise _CaptureFailed(first) from e
        for static, a in zip(entry.inputs, chunk, strict=True):
            fill_static(static, a)
        entry.graph.replay()
        return entry.output[:chunk[0].shape[0]].to(self._torch.float32, copy=True)

    def _run(self, which: str, args: tuple) -> np.ndarray:
        """``args``: tensors on the device, first dim = batch -> float32 numpy (N, D)."""
        torch = self._torch
        n = args[0].shape[0]
        if n == 0:
            return np.zeros((0, int(self._source.embed_dim)), dtype=np.float32)
        use_graphs = self.buckets is not None and not self._graphs.disabled(which)
        plan = plan_rows(n, self.max_batch, self.buckets if use_graphs else None)
        outs = []
        with self._lock, torch.inference_mode():
            for c in plan:
                chunk = tuple(a[c.start:c.stop] for a in args)
                if use_graphs and not self._graphs.disabled(which):
                    try:
                        outs.append(self._replay(which, chunk, c.bucket))
                        continue
                    except _CaptureFailed as e:
                        # Some towers hold ops a graph cannot capture (host syncs, data-dependent
                        # shapes): run them eagerly rather than fail.
                        reason = f"capture failed: {e}"
                        log.warning("clipfast: CUDA graphs off for the %s tower (%s)", which,
                                    reason)
                        self._graphs.disable(which, reason)
                outs.append(self._forward(which, *chunk).to(torch.float32))
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
            return out.cpu().numpy()

    def _device_ctx(self):
        return (self._torch.cuda.device(self._tdevice) if self.device == "cuda"
                else contextlib.nullcontext())

    def run_image(self, pixels: Any) -> np.ndarray:
        """``pixels``: numpy ``(N, 3, H, W)``, or a torch tensor (CUDA tensors from GPU
        preprocessing stay on the device: cast there, never copied to the host)."""
        torch = self._torch
        if isinstance(pixels, torch.Tensor):
            x = pixels.detach().to(device=self._tdevice, dtype=self._dtype)
        else:
            arr = np.asarray(pixels)
            if arr.dtype not in (np.float32, np.float16):
                arr = arr.astype(np.float32)
            # Upload in the given dtype and cast on the device (half the bytes for fp16 input).
            x = torch.from_numpy(np.ascontiguousarray(arr)).to(self._tdevice).to(self._dtype)
        if x.dim() != 4:
            raise InputError(f"pixels: expected (N, 3, H, W), got shape {tuple(x.shape)}")
        with self._device_ctx():
            return self._run("image", (x.contiguous(),))

    def run_text(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        args = []
        for name in self.text_inputs:
            if name not in inputs:
                raise ArtifactError(f"text tower expects input {name!r}; tokenizer gave "
                                    f"{sorted(inputs)}")
            v = inputs[name]
            t = (v.detach().to(self._tdevice, torch.int32) if isinstance(v, torch.Tensor)
                 else torch.from_numpy(np.ascontiguousarray(v, dtype=np.int32)).to(self._tdevice))
            args.append(t.contiguous())
        with self._device_ctx():
            return self._run("text", tuple(args))

    def info(self) -> BackendInfo:
        return replace(super().info(), source_model=self._source)

    def describe(self) -> dict[str, Any]:
        torch = self._torch
        out = {"backend": self.name, "device": self.device, "torch": torch.__version__,
               "source": self._source.spec.get("model"), "dtype": self.options.dtype,
               "attention": dict(self.attention), "cuda_graphs": self.buckets is not None,
               "compile": self.compile_status}
        if self.device == "cuda":
            out.update({"gpu": torch.cuda.get_device_name(self._tdevice),
                        "profile": self.options.profile.as_dict(),
                        "buckets": list(self.buckets or ()),
                        "text_lengths": list(self.text_lengths or ()),
                        "graphs": self._graphs.describe()})
        return out


def load(manifest, device: str = "cpu", threads: int | None = None, **options: Any
         ) -> TorchBackend:
    """The torch backend; ``options`` are this backend's (``OPTIONS``, described in the module
    docstring), checked before anything loads: InputError names an unknown one or a bad
    value."""
    return TorchBackend(manifest, device=device, threads=threads,
                        options=parse_options(device, **options))
