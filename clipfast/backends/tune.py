"""``backend="auto"`` on the CPU: the fastest path that passes the artifact's gates, measured on
this host.

The fastest CPU runtime depends on the ISA (ONNX Runtime's fp32 leads on an AVX2 EPYC, OpenVINO's
bf16 through AMX is several times faster on a Xeon), so it is measured, not assumed:

1. candidates: ONNX Runtime and OpenVINO running the artifact's graphs at its own precision,
   plus OpenVINO bf16 when the user allows bf16 (``allow_precisions``, or the
   ``CLIPFAST_ALLOW_PRECISIONS`` setting so ``embed`` / ``serve`` inherit it). The default allows
   no precision below the artifact's: bf16 changes the embeddings (centred error about 3e-2 on
   ViT-B-32) and a user who exported fp32 gets fp32 unless they say otherwise.
2. each candidate loads and passes the golden self-check with the gates of what it computes in
   (a candidate that cannot load or misses its gates is skipped, with the reason);
3. the survivors are timed briefly on the golden inputs (one warm-up, then ``ROUNDS`` interleaved
   rounds of one image batch and one text batch, the median round per candidate) and the
   fastest is kept; the others are released.

The choice is cached per artifact and host (``<artifact cache>/tune/<key>.json``, the key
hashing the CPU model and flags, the thread count, the allowed precisions and the versions of
clipfast, ONNX Runtime and OpenVINO), so later loads load only the chosen path (and still
self-check it; a cached choice that no longer loads or passes is measured again).
``clipfast tune ARTIFACT`` measures afresh. ``engine.describe()["auto"]`` shows the choice, the
timings, the skips and the cache file. An explicit backend is never tuned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipfast.errors import BackendUnavailable, ClipfastError, FidelityError, InputError

log = logging.getLogger("clipfast")

CACHE_PURPOSE = "tune"
ROUNDS = 3
# Precisions a user may allow below the artifact's own (int8 needs an int8 graph: an int8 export).
ALLOWABLE = ("bf16",)


# Timings within this fraction of the fastest count as a tie, won by the earlier candidate
# (onnxruntime first): on a shared machine a few percent is noise, and a flip between runs
# would change the embeddings' last bits for nothing.
TIE = 0.03


@dataclass(frozen=True)
class Candidate:
    """One path: a backend, the options that select its precision, what it computes in, and
    whether that is below the artifact's own precision."""

    backend: str
    precision: str
    options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)
    lowered: bool = False

    @property
    def label(self) -> str:
        """The backend's name, with the precision when it is lowered: "openvino (bf16)"."""
        return f"{self.backend} ({self.precision})" if self.lowered else self.backend

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "precision": self.precision,
                "options": dict(self.options), "lowered": self.lowered}


def parse_allow(allow: Iterable[str] | str | None) -> tuple[str, ...]:
    """The allowed lower precisions, checked: InputError naming an unknown one."""
    if allow is None:
        return ()
    items = [a.strip() for a in (allow.split(",") if isinstance(allow, str) else allow)]
    items = [a for a in items if a]
    bad = [a for a in items if a not in ALLOWABLE]
    if bad:
        raise InputError(f"allow_precisions: {', '.join(map(repr, bad))} cannot be allowed; "
                         f"expected any of {', '.join(ALLOWABLE)} (int8 comes from an int8 "
                         "export: `clipfast export --precision int8`)")
    return tuple(sorted(set(items)))


def candidates(precision: str, allow: tuple[str, ...], available: Iterable[str]
               ) -> list[Candidate]:
    """The CPU paths for an artifact of ``precision`` with ``allow`` lower precisions, among the
    backends in ``available`` (importable), in the order used when timings tie."""
    available = set(available)
    own = precision or "fp32"
    out = []
    if "onnxruntime" in available:
        out.append(Candidate("onnxruntime", own))
    if "openvino" in available:
        out.append(Candidate("openvino", own, (("ov_precision", "auto"),)))
        if "bf16" in allow and own in ("fp32", "fp16"):
            out.append(Candidate("openvino", "bf16", (("ov_precision", "bf16"),), lowered=True))
    return out


def host_fingerprint(threads: int) -> dict[str, Any]:
    """What a measured choice depends on besides the artifact."""
    import clipfast
    from clipfast.cpu import host_cpu

    versions = {"clipfast": clipfast.__version__}
    for module in ("onnxruntime", "openvino"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = None
    cpu = host_cpu()
    return {"cpu": cpu.model, "machine": cpu.machine, "isa": cpu.isa, "flags": list(cpu.flags),
            "threads": int(threads), "versions": versions}


def cache_file(manifest, fingerprint: dict[str, Any], allow: tuple[str, ...]) -> Path:
    """``<artifact cache>/tune/<16 hex digits>.json`` for this host and allowance."""
    from clipfast.artifact.cache import artifact_cache_dir

    key = json.dumps({"host": fingerprint, "allow": list(allow)}, sort_keys=True)
    name = hashlib.sha256(key.encode()).hexdigest()[:16]
    return artifact_cache_dir(manifest, CACHE_PURPOSE) / f"{name}.json"


def choose(timings: dict[str, float], order: list[str], tie: float = TIE) -> str:
    """The label with the smallest median time; timings within ``tie`` of the fastest go to
    the earliest label in ``order``."""
    if not timings:
        raise ValueError("no timed candidate to choose from")
    best = min(timings.values())
    close = [label for label in timings if timings[label] <= best * (1 + tie)]
    return min(close, key=order.index)


def time_rounds(backends: dict[str, Any], golden, rounds: int = ROUNDS,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per round (one image batch and one text batch of the golden inputs) per
    backend, rounds interleaved so that load from other processes hits every backend alike;
    one warm-up call each first (lazy allocations, first-shape compilation)."""
    import numpy as np

    text = {k: v.astype(np.int64) for k, v in golden.text.items()}
    for backend in backends.values():
        backend.run_image(golden.pixel_values)
        backend.run_text(text)
    samples: dict[str, list[float]] = {label: [] for label in backends}
    for _ in range(rounds):
        for label, backend in backends.items():
            t0 = clock()
            backend.run_image(golden.pixel_values)
            backend.run_text(text)
            samples[label].append(clock() - t0)
    return {label: statistics.median(s) for label, s in samples.items()}


def _read_cache(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("choice"), dict) else None


def _write_cache(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache costs a re-measurement next time, nothing more
        log.info("clipfast: cannot write the auto choice to %s (%s)", path, e)


def _attach(backend: Any, tuning: dict[str, Any]) -> None:
    """``backend.tuning = tuning`` (what ``Engine.describe()["auto"]`` shows), where the
    backend object takes attributes."""
    try:
        backend.tuning = tuning
    except AttributeError:
        pass


def resolve_cpu(manifest, *, load: Callable[[Candidate], Any],
                check: Callable[[Any, str], Any] | None, golden, threads: int,
                allow: tuple[str, ...], available: Iterable[str], fallback: bool = True,
                retune: bool = False,
                timer: Callable[[dict[str, Any], Any], dict[str, float]] | None = None,
                ) -> tuple[Any | None, list[tuple[str, str]]]:
    """``(backend or None, skipped)``: the measured choice among the CPU candidates, with
    ``backend.tuning`` describing it; None when no candidate runs (the caller goes on to the
    torch backend). ``load(candidate)`` loads one; ``timer(backends, golden)`` times them
    (``time_rounds`` by default; tests inject timings)."""
    cands = candidates(manifest.spec.precision, allow, available)
    by_label = {c.label: c for c in cands}
    order = [c.label for c in cands]
    fingerprint = host_fingerprint(threads)
    try:
        path: Path | None = cache_file(manifest, fingerprint, allow)
    except ClipfastError as e:
        log.info("clipfast: auto choice not cached: %s", e)
        path = None
    skipped: list[tuple[str, str]] = []

    def attempt(c: Candidate):
        try:
            backend = load(c)
            if check is not None:
                check(backend, f"backend {c.label} (cpu)")
            return backend
        except BackendUnavailable as e:
            if not fallback:
                raise
            skipped.append((c.label, str(e)))
        except FidelityError as e:
            if not fallback:
                raise
            skipped.append((c.label, f"self-check failed: {e}"))
        return None

    cached = _read_cache(path) if path is not None and not retune else None
    if cached is not None:
        c = by_label.get(str(cached.get("label")))
        backend = attempt(c) if c is not None else None
        if backend is not None:
            _attach(backend, {**cached, "cached": True, "file": str(path)})
            return backend, skipped
        skipped.clear()  # measured again below, with every candidate's outcome
    loaded = {}
    for c in cands:
        backend = attempt(c)
        if backend is not None:
            loaded[c.label] = backend
    if not loaded:
        return None, skipped
    if len(loaded) == 1 or golden is None:
        timings: dict[str, float] = {}
        label = next(iter(loaded))
        why = ("the only path that runs and passes its gates here" if len(loaded) == 1
               else "no golden inputs to time on (an older export): the first path kept")
    else:
        measured = (timer or time_rounds)(loaded, golden)
        timings = {k: float(v) for k, v in measured.items() if k in loaded}
        label = choose(timings, order)
        why = "fastest median round on the golden inputs"
    last_checked = next(reversed(loaded))
    backend = loaded.pop(label)
    loaded.clear()  # the others' memory goes now
    if check is not None and label != last_checked:
        # the caller keeps the figures of the last check it ran: make that the chosen path's
        check(backend, f"backend {label} (cpu)")
    record = {"choice": by_label[label].to_dict(), "label": label, "why": why,
              "seconds_per_round": {k: round(v, 6) for k, v in timings.items()},
              "rounds": ROUNDS if timings else 0, "allow_precisions": list(allow),
              "skipped": [list(s) for s in skipped], "host": fingerprint,
              "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if path is not None and timings:
        _write_cache(path, record)
    _attach(backend, {**record, "cached": False, "file": str(path) if path and timings
                      else None})
    log.info("clipfast: auto chose %s (%s)", label, why)
    return backend, skipped


def tune_artifact(artifact: str, *, allow: Iterable[str] | str | None = None,
                  threads: int | None = None) -> dict[str, Any]:
    """Measure the CPU paths of ``artifact`` afresh on this host (``clipfast tune``), cache the
    choice, and return the record (with ``skipped``)."""
    from clipfast.artifact.manifest import load_manifest
    from clipfast.artifact.selfcheck import load_golden, run_self_check
    from clipfast.backends import load_backend
    from clipfast.backends.onnxruntime import physical_cores

    if allow is None:
        from clipfast import settings

        allow = settings.CLIPFAST_ALLOW_PRECISIONS
    manifest = load_manifest(artifact)
    golden = load_golden(manifest)
    available = []
    for name in ("onnxruntime", "openvino"):
        try:
            __import__(name)
            available.append(name)
        except ImportError:
            pass

    def check(backend, label):
        run_self_check(backend, manifest, golden, label)

    backend, skipped = resolve_cpu(
        manifest, load=lambda c: load_backend(c.backend, manifest, "cpu", threads=threads,
                                              **dict(c.options)),
        check=check if golden is not None else None, golden=golden,
        threads=threads or physical_cores(), allow=parse_allow(allow), available=available,
        retune=True)
    if backend is None:
        raise BackendUnavailable("no CPU path runs this artifact here: " + "; ".join(
            f"{n}: {r}" for n, r in skipped))
    return {**backend.tuning, "skipped": [list(s) for s in skipped]}


def add_parser(sub) -> None:
    """``clipfast tune ARTIFACT``: the subcommand, registered by clipfast.cli."""
    t = sub.add_parser("tune", help="measure the CPU paths of an artifact on this host and "
                       "cache the fastest that passes its gates (what backend auto loads)")
    t.add_argument("artifact")
    t.add_argument("--allow", default=None, metavar="PRECISIONS",
                   help="precisions below the artifact's auto may choose: bf16 (default: "
                   "$CLIPFAST_ALLOW_PRECISIONS, else none)")
    t.add_argument("--threads", type=int, default=None,
                   help="threads per tower (default: the physical cores available)")
    t.add_argument("--json", action="store_true", help="print the record as JSON")
    t.set_defaults(fn=_cmd_tune)


def _cmd_tune(args) -> int:
    record = tune_artifact(args.artifact, allow=args.allow, threads=args.threads)
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    host = record["host"]
    print(f"host: {host['cpu']} ({host['isa']}), {host['threads']} threads; "
          f"allowed below the artifact: {', '.join(record['allow_precisions']) or 'none'}")
    times = record["seconds_per_round"]
    base = times.get("onnxruntime")
    for label, sec in sorted(times.items(), key=lambda kv: kv[1]):
        ratio = f"  {base / sec:5.2f}x onnxruntime" if base else ""
        mark = "  <- chosen" if label == record["label"] else ""
        print(f"  {label:20s} {sec * 1e3:9.1f} ms/round{ratio}{mark}")
    for label, reason in record["skipped"]:
        print(f"  {label:20s} skipped: {reason}")
    print(f"chosen: {record['label']} ({record['why']}); cached in {record['file']}")
    return 0


__all__ = ["ALLOWABLE", "Candidate", "cache_file", "candidates", "choose", "host_fingerprint",
           "parse_allow", "resolve_cpu", "time_rounds", "tune_artifact"]
