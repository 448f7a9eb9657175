"""Build and cache TensorRT engines for an artifact's towers (``clipfast build-engines``).

Precision lives in the ONNX graph: an fp16 artifact's graphs
are already converted and an int8 artifact's carry QDQ nodes, so engines are built from
*strongly typed* networks and no precision builder flag is ever set. What differs between the
TensorRT versions supported, as documented by NVIDIA:

- TensorRT 10.x: strong typing is opt-in, with ``1 << NetworkDefinitionCreationFlag.
  STRONGLY_TYPED`` passed to ``Builder.create_network`` (TensorRT 10 Python API, Core/Builder).
- TensorRT 11.x: "Strongly typed networks are now the default ... Weak typing is no longer
  supported" (TensorRT 11.0.0 release notes); ``STRONGLY_TYPED`` is "[DEPRECATED] ... always
  enabled. This flag is retained for API compatibility but is ignored" (TensorRT 11.0 Python API,
  Core/Builder), and ``BuilderFlag.FP16/INT8/BF16/FP8/...``, ``OBEY_PRECISION_CONSTRAINTS`` and
  ``IBuilderConfig.int8_calibrator`` are removed (TensorRT 11 migration guide, "Removed Python
  APIs and Replacements"). So on 11 no flag is passed at all.
- ``BuilderFlag.TF32`` exists in 10.x and is on by default: an fp32 artifact is built with it
  cleared, because TF32 matrix products (10-bit mantissas) would miss the fp32 fidelity gates.

Engines are a local cache, never shipped or downloaded: an engine is only valid for the TensorRT
version and GPU compute capability that built it, so both are part of its cache key, with the
precision, the batch profile and the tower graph's sha256 (a re-export invalidates it). Each
engine has a JSON sidecar holding the key, and a lookup that finds an engine built elsewhere says
which value differs instead of handing TensorRT a plan it would reject.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from clipfast.artifact.cache import artifact_cache_dir, writable_dir
from clipfast.artifact.manifest import tower_input_dims
from clipfast.backends.batching import BatchProfile, as_profile
from clipfast.backends.tensorrt.graph_ops import contrib_ops_message, tower_contrib_ops
from clipfast.errors import ArtifactError, BackendUnavailable, ClipfastError

log = logging.getLogger("clipfast.tensorrt")

INSTALL_HINT = "pip install clipfast[tensorrt]"
TOWERS = ("image", "text")
CACHE_SUBDIR = "tensorrt"
ENGINE_SUFFIX = ".engine"
SIDECAR_SUFFIX = ".json"
MIN_TENSORRT_MAJOR = 10


class EngineBuildError(ClipfastError):
    """TensorRT could not parse a tower graph or build an engine; the message carries the
    parser's node index and name or the builder's own error lines (naming the failing layer)."""


# -- availability ------------------------------------------------------------------------------
def import_tensorrt():
    """The ``tensorrt`` module; BackendUnavailable saying how to install it otherwise."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailable(
            f"TensorRT is not importable ({e}); install it with `{INSTALL_HINT}` (a CUDA GPU "
            "with an NVIDIA driver is needed to run it)"
        ) from e
    major = tensorrt_major(trt.__version__)
    if major < MIN_TENSORRT_MAJOR:
        raise BackendUnavailable(
            f"TensorRT {trt.__version__} is installed; clipfast needs TensorRT "
            f"{MIN_TENSORRT_MAJOR} or newer (strongly typed networks): `{INSTALL_HINT}`"
        )
    return trt


def tensorrt_major(version: str) -> int:
    try:
        return int(str(version).split(".", 1)[0])
    except ValueError:
        return 0


def unavailable_reason() -> str | None:
    """Why TensorRT engines cannot be built on this machine (what is missing and how to get
    it), or None when they can. Cheap: imports and a device count, no CUDA context work."""
    from clipfast.backends.tensorrt import cudart

    try:
        import_tensorrt()
        cudart.runtime()
    except BackendUnavailable as e:
        return str(e)
    reason = cudart.no_device_reason()
    if reason:
        return f"TensorRT needs a CUDA GPU: {reason}"
    return None


# -- cache keys --------------------------------------------------------------------------------
def profile_from(value: Any) -> BatchProfile:
    """A BatchProfile from a BatchProfile, a ``{"min", "opt", "max"}`` dict or None (default)."""
    return as_profile(value)


def _cc_text(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on. Two engines are interchangeable only when every field
    is equal."""

    tower: str
    onnx_sha256: str
    precision: str
    io_dtype: str
    profile: BatchProfile
    trt_version: str
    compute_capability: tuple[int, int]
    # (min, opt, max) text lengths of a dynamic-sequence text engine; None: fixed length
    sequence: tuple[int, int, int] | None = None

    def stem(self) -> str:
        """File name stem: ``image.fp16-io32.b1-64-256.trt10.8.0.sm89.0123456789ab`` (a
        dynamic-sequence text engine adds ``.s1-16-77`` after the batch profile)."""
        io = {"fp32": "io32", "fp16": "io16"}.get(self.io_dtype, f"io-{self.io_dtype}")
        cc = f"sm{self.compute_capability[0]}{self.compute_capability[1]}"
        seq = "" if self.sequence is None else ".s" + "-".join(map(str, self.sequence))
        return (f"{self.tower}.{self.precision}-{io}.{self.profile.tag()}{seq}."
                f"trt{self.trt_version}.{cc}.{self.onnx_sha256[:12]}")

    @property
    def engine_name(self) -> str:
        return self.stem() + ENGINE_SUFFIX

    @property
    def sidecar_name(self) -> str:
        return self.stem() + SIDECAR_SUFFIX

    def as_dict(self) -> dict[str, Any]:
        return {"tower": self.tower, "onnx_sha256": self.onnx_sha256,
                "precision": self.precision, "io_dtype": self.io_dtype,
                "profile": self.profile.as_dict(), "tensorrt": self.trt_version,
                "compute_capability": _cc_text(self.compute_capability),
                **({"sequence": list(self.sequence)} if self.sequence is not None else {})}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineKey:
        try:
            major, minor = str(d["compute_capability"]).split(".")
            seq = d.get("sequence")
            return cls(tower=str(d["tower"]), onnx_sha256=str(d["onnx_sha256"]),
                       precision=str(d["precision"]), io_dtype=str(d["io_dtype"]),
                       profile=profile_from(d["profile"]), trt_version=str(d["tensorrt"]),
                       compute_capability=(int(major), int(minor)),
                       sequence=None if seq is None else tuple(int(v) for v in seq))
        except (KeyError, TypeError, ValueError, ClipfastError) as e:
            raise ArtifactError(f"engine sidecar key is malformed ({e}): {d!r}") from e

    def differences(self, other: EngineKey) -> list[str]:
        """One ``"<field>: engine has X, this machine/artifact wants Y"`` line per differing
        field (``self`` is the engine found, ``other`` the key wanted)."""
        labels = {"tower": "tower", "onnx_sha256": "tower graph sha256",
                  "precision": "precision", "io_dtype": "I/O dtype", "profile": "batch profile",
                  "trt_version": "TensorRT version",
                  "compute_capability": "GPU compute capability",
                  "sequence": "text sequence profile"}
        out = []
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                if f.name == "compute_capability":
                    mine, theirs = _cc_text(mine), _cc_text(theirs)
                elif f.name == "profile":
                    mine, theirs = mine.tag(), theirs.tag()
                elif f.name == "onnx_sha256":
                    mine, theirs = mine[:12], theirs[:12]
                out.append(f"{labels[f.name]}: engine has {mine}, wanted {theirs}")
        return out


def tower_sha256(manifest, tower: str) -> str:
    """The tower graph's sha256 as recorded in the manifest's file list."""
    name = manifest.spec.tower(tower).file
    try:
        return str(manifest.spec.files[name]["sha256"])
    except KeyError as e:
        raise ArtifactError(f"{manifest.directory}: manifest has no checksum for {name}") from e


def engine_key(manifest, tower: str, profile: BatchProfile, trt_version: str,
               compute_capability: tuple[int, int]) -> EngineKey:
    from clipfast.inputs.text_batching import sequence_profile

    return EngineKey(tower=tower, onnx_sha256=tower_sha256(manifest, tower),
                     precision=manifest.spec.precision,
                     io_dtype=manifest.spec.io_dtype, profile=profile,
                     trt_version=str(trt_version),
                     compute_capability=(int(compute_capability[0]), int(compute_capability[1])),
                     sequence=sequence_profile(manifest) if tower == "text" else None)


def check_sidecar(sidecar: dict[str, Any], wanted: EngineKey) -> str | None:
    """None when the sidecar describes an engine for ``wanted``; otherwise why not, naming the
    engine's value and the wanted one for each difference."""
    try:
        found = EngineKey.from_dict(sidecar.get("key", {}))
    except ArtifactError as e:
        return str(e)
    diffs = found.differences(wanted)
    if not diffs:
        return None
    return f"engine {found.stem()} was built for another setup: " + "; ".join(diffs)


# -- cache location ----------------------------------------------------------------------------
def engine_cache_dir(manifest, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where this artifact's engines live: ``cache_dir`` when given; else the artifact's
    ``tensorrt`` cache by clipfast.artifact.cache's rule: ``<artifact>/tensorrt`` when writable,
    else
    ``<$CLIPFAST_CACHE_DIR or ~/.cache/clipfast>/<artifact digest>/tensorrt``."""
    if cache_dir is not None:
        path = Path(cache_dir)
        if not writable_dir(path):
            raise ClipfastError(f"engine cache dir {str(path)!r} cannot be created or written")
        return path
    try:
        return artifact_cache_dir(manifest, CACHE_SUBDIR)
    except ClipfastError as e:
        raise ClipfastError(f"{e}, or pass cache_dir (or --cache-dir)") from None


def timing_cache_path(cache_dir: Path, trt_version: str, cc: tuple[int, int]) -> Path:
    """One timing cache per (TensorRT version, compute capability): layer timings are only
    valid on the GPU and TensorRT that measured them."""
    return Path(cache_dir) / f"timing.trt{trt_version}.sm{cc[0]}{cc[1]}.cache"


# -- lookup ------------------------------------------------------------------------------------
@dataclass
class EngineLookup:
    """Result of ``find_engine``: ``path`` of a matching engine or None, ``reason`` why none
    matches, and ``found``: the other engines of this tower in the cache, as ``(stem, why it
    does not fit)``."""

    path: Path | None
    reason: str | None
    found: list[tuple[str, str]]


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def find_engine(cache_dir: Path, wanted: EngineKey) -> EngineLookup:
    """Look up the engine for ``wanted`` in ``cache_dir`` without touching TensorRT."""
    cache_dir = Path(cache_dir)
    found: list[tuple[str, str]] = []
    if cache_dir.is_dir():
        for side in sorted(cache_dir.glob(f"{wanted.tower}.*{SIDECAR_SUFFIX}")):
            if side.name == wanted.sidecar_name:
                continue
            data = _read_sidecar(side)
            why = (check_sidecar(data, wanted) if data is not None
                   else "sidecar is not valid JSON")
            found.append((side.name[: -len(SIDECAR_SUFFIX)], why or "same key, other file name"))
    engine = cache_dir / wanted.engine_name
    sidecar = cache_dir / wanted.sidecar_name
    if not engine.is_file():
        reason = f"no engine {wanted.engine_name} in {cache_dir}"
        if found:
            reason += "; engines there: " + "; ".join(f"{s} ({w})" for s, w in found)
        return EngineLookup(None, reason, found)
    data = _read_sidecar(sidecar)
    if data is None:
        return EngineLookup(None, f"{engine.name} has no readable sidecar {sidecar.name}; "
                                  "its origin is unknown", found)
    reason = check_sidecar(data, wanted)
    if reason:
        return EngineLookup(None, reason, found)
    size = data.get("engine_bytes")
    if size is not None and engine.stat().st_size != size:
        return EngineLookup(None, f"{engine.name} is {engine.stat().st_size} bytes, its sidecar "
                                  f"says {size}: truncated or replaced", found)
    return EngineLookup(engine, None, found)


# -- building ----------------------------------------------------------------------------------
def capturing_logger(trt):
    """A ``trt.ILogger`` that forwards TensorRT's messages to the ``clipfast.tensorrt`` logger
    and keeps its recent warnings and errors: the builder reports a failing layer only through
    the logger, and that text goes into the raised error. ``mark()`` before an operation and
    ``errors(mark)`` after it give the errors that operation logged."""

    class _CapturingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: deque[tuple[int, str, str]] = deque(maxlen=500)
            self._seq = itertools.count()

        def log(self, severity, msg):
            level = int(severity)  # INTERNAL_ERROR 0, ERROR 1, WARNING 2, INFO 3, VERBOSE 4
            name = {0: "INTERNAL_ERROR", 1: "ERROR", 2: "WARNING"}.get(level)
            if name is not None:
                self.messages.append((next(self._seq), name, str(msg)))
            if level <= 1:
                log.error("TensorRT: %s", msg)
            elif level == 2:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

        def mark(self) -> int:
            return self.messages[-1][0] + 1 if self.messages else 0

        def errors(self, since: int = 0) -> list[str]:
            return [m for seq, sev, m in self.messages if sev != "WARNING" and seq >= since]

    return _CapturingLogger()


_shared_logger: Any = None


def shared_logger(trt):
    """The one capturing logger of this process: TensorRT has treated the logger as a process
    singleton (objects created later may report through the first logger registered), so the
    builder and every runtime use the same one."""
    global _shared_logger
    if _shared_logger is None:
        _shared_logger = capturing_logger(trt)
    return _shared_logger


def parser_errors(parser) -> str:
    lines = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        # node_name()/node_operator() exist on TensorRT 10's ParserError; node() (the index)
        # on every version
        name = getattr(e, "node_name", lambda: "")()
        op = getattr(e, "node_operator", lambda: "")()
        where = f"node {e.node()}" + (f" {name!r}" if name else "") + (f" ({op})" if op else "")
        lines.append(f"{where}: {e.desc()} [{e.code()}]")
    return "; ".join(lines) or "no parser error recorded"


def create_network(trt, builder):
    if tensorrt_major(trt.__version__) >= 11:
        # TensorRT 11: every network is strongly typed; the flag is deprecated and ignored.
        return builder.create_network(0)
    return builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))


def _profile_shapes(network, profile: BatchProfile, static_dims: dict[str, tuple[int, ...]],
                    sequence: tuple[int, int, int] | None = None
                    ) -> dict[str, tuple[tuple[int, ...], ...]]:
    """``{input: (min_shape, opt_shape, max_shape)}``: dim 0 from the batch profile, the others
    from the graph, or from ``static_dims`` (the manifest) where the graph leaves them dynamic.
    ``sequence``: ``(min, opt, max)`` of a dynamic dim 1 (a text engine on the dynamic path)."""
    shapes = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = list(tensor.shape)
        rest = dims[1:]
        if sequence is not None and len(rest) == 1 and rest[0] < 0:
            shapes[tensor.name] = tuple((b, s) for b, s in zip(
                (profile.min, profile.opt, profile.max), sequence))
            continue
        if any(d < 0 for d in rest):
            given = static_dims.get(tensor.name)
            if given is None or len(given) != len(rest):
                raise EngineBuildError(
                    f"input {tensor.name!r} has dynamic non-batch dimensions {dims} and the "
                    "manifest does not fix them")
            rest = [g if d < 0 else d for d, g in zip(rest, given)]
        shapes[tensor.name] = tuple((b, *rest) for b in (profile.min, profile.opt, profile.max))
    return shapes


def build_engine(onnx_path: Path, key: EngineKey, cache_dir: Path, *,
                 static_dims: dict[str, tuple[int, ...]] | None = None,
                 device_name: str | None = None) -> Path:
    """Build the engine for ``key`` from ``onnx_path`` into ``cache_dir`` (engine + sidecar,
    written atomically); return the engine path. Raises EngineBuildError with the parser's node
    index/name or the builder's error lines."""
    trt = import_tensorrt()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    logger = shared_logger(trt)
    since = logger.mark()
    builder = trt.Builder(logger)
    network = create_network(trt, builder)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so external weights (<tower>.onnx.data) resolve beside it
    if not parser.parse_from_file(str(onnx_path)):
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path.name}: {parser_errors(parser)}")
    config = builder.create_builder_config()
    if key.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    opt = builder.create_optimization_profile()
    for name, (lo, mid, hi) in _profile_shapes(network, key.profile, static_dims or {},
                                               key.sequence).items():
        opt.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(opt)

    timing_path = timing_cache_path(cache_dir, key.trt_version, key.compute_capability)
    blob = b""
    if timing_path.is_file():
        blob = timing_path.read_bytes()
    timing = config.create_timing_cache(blob)
    # ignore_mismatch=False: a cache from another device/version is rejected, not mixed in
    if not config.set_timing_cache(timing, False):
        log.warning("TensorRT rejected the timing cache %s; timing from scratch", timing_path)
        timing = config.create_timing_cache(b"")
        config.set_timing_cache(timing, False)

    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if plan is None:
        errors = logger.errors(since) or ["TensorRT reported no error message"]
        raise EngineBuildError(f"TensorRT failed to build the {key.tower} engine from "
                               f"{onnx_path.name}: " + " | ".join(errors))
    _write_atomic(timing_path, bytes(memoryview(config.get_timing_cache().serialize())))
    data = bytes(memoryview(plan))
    engine_path = cache_dir / key.engine_name
    _write_atomic(engine_path, data)
    sidecar = {"key": key.as_dict(), "engine": key.engine_name, "engine_bytes": len(data),
               "engine_sha256": hashlib.sha256(data).hexdigest(),
               "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "build_seconds": round(seconds, 1), "tensorrt": trt.__version__,
               "device": device_name, "onnx": onnx_path.name}
    _write_atomic(cache_dir / key.sidecar_name, (json.dumps(sidecar, indent=2) + "\n").encode())
    log.info("built TensorRT engine %s in %.1f s", engine_path, seconds)
    return engine_path


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def ensure_engine(manifest, tower: str, profile: BatchProfile, cache_dir: Path, *,
                  rebuild: bool = False, why: str | None = None, progress: bool = False
                  ) -> tuple[Path, EngineKey, bool]:
    """The engine for ``tower`` on this GPU, built when missing, stale or ``rebuild`` (``why``
    says why in the build message). Returns ``(engine path, key, built_now)``."""
    from clipfast.backends.tensorrt import cudart

    trt = import_tensorrt()
    reason = cudart.no_device_reason()
    if reason:
        raise BackendUnavailable(f"TensorRT needs a CUDA GPU: {reason}")
    cc = cudart.compute_capability()
    key = engine_key(manifest, tower, profile, trt.__version__, cc)
    lookup = find_engine(cache_dir, key)
    if lookup.path is not None and not rebuild:
        return lookup.path, key, False
    onnx_path = manifest.path(manifest.spec.tower(tower).file)
    ops = tower_contrib_ops(manifest, tower)
    if ops:
        raise BackendUnavailable(contrib_ops_message(tower, onnx_path, ops))
    why = why or ("rebuild requested" if rebuild else lookup.reason)
    msg = (f"building the TensorRT {tower} engine {key.stem()} ({why}); this takes minutes, the "
           "timing cache makes later builds faster")
    log.warning("clipfast: %s", msg)
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(f"clipfast: {msg}")
    path = build_engine(onnx_path, key, cache_dir, static_dims=tower_input_dims(manifest, tower),
                        device_name=cudart.device_name())
    return path, key, True


def tensorrt_section(profile: BatchProfile, cache_dir: Path, artifact_dir: Path,
                     keys: dict[str, EngineKey]) -> dict[str, Any]:
    """The manifest's ``tensorrt`` record: the profile and the engines last built for it."""
    try:
        where = str(Path(cache_dir).resolve().relative_to(Path(artifact_dir).resolve()))
    except ValueError:
        where = str(cache_dir)
    return {"profile": profile.as_dict(), "cache": where,
            "engines": {t: {"key": k.stem(), "tensorrt": k.trt_version,
                            "compute_capability": _cc_text(k.compute_capability)}
                        for t, k in keys.items()},
            "note": "engines are a local cache keyed by TensorRT version, GPU, precision, "
                    "profile and graph checksum; they are not artifact files"}


def record_in_manifest(artifact_dir: Path, section: dict[str, Any]) -> bool:
    """Rewrite ``artifact_dir``'s manifest with ``section`` as its ``tensorrt`` record, keeping
    its file list (engines are a cache, not checksummed artifact files). Returns False, changing
    nothing, when the artifact is read-only."""
    from clipfast.artifact.manifest import MANIFEST_NAME, load_manifest, write_manifest
    from clipfast.artifact.sections import TensorRTSection

    artifact_dir = Path(artifact_dir)
    if not os.access(artifact_dir / MANIFEST_NAME, os.W_OK) or not os.access(artifact_dir,
                                                                             os.W_OK):
        return False
    manifest = load_manifest(artifact_dir, verify_checksums=False)
    spec = manifest.spec
    spec.tensorrt = TensorRTSection.from_dict(section, manifest.where)
    write_manifest(artifact_dir, spec, list(manifest.spec.files))
    return True


def build_engines(artifact: str | os.PathLike, profile: BatchProfile | dict | None = None, *,
                  cache_dir: str | os.PathLike | None = None, rebuild: bool = False,
                  towers: tuple[str, ...] = TOWERS, progress: bool = True) -> dict[str, Any]:
    """Build (or find) the engines of ``artifact``'s towers for this GPU; record them in the
    manifest when the artifact is writable. Returns the ``tensorrt`` section."""
    from clipfast.artifact.manifest import load_manifest

    import_tensorrt()
    manifest = load_manifest(artifact)
    profile = profile_from(profile)
    where = engine_cache_dir(manifest, cache_dir)
    keys = {}
    for tower in towers:
        _, keys[tower], _ = ensure_engine(manifest, tower, profile, where, rebuild=rebuild,
                                          progress=progress)
    section = tensorrt_section(profile, where, manifest.directory, keys)
    record_in_manifest(manifest.directory, section)
    return section


__all__ = [
    "INSTALL_HINT", "EngineBuildError", "EngineKey", "EngineLookup", "build_engine",
    "build_engines", "capturing_logger", "check_sidecar", "shared_logger", "create_network",
    "engine_cache_dir", "engine_key", "ensure_engine", "find_engine", "parser_errors",
    "import_tensorrt", "profile_from", "record_in_manifest", "tensorrt_section",
    "timing_cache_path", "unavailable_reason"
]
