"""The bench run: for every artifact, backend, tower, mode and batch size one row (latency
percentiles, throughput, peak memory, FLOPs, utilisation, speedup against torch), gathered into
the results document that ``clipfast.bench.report`` writes.

By default one backend is loaded at a time (clean per-backend memory). With ``interleave`` they
are loaded together and their calls alternate, so every backend is timed under the same
background load.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from clipfast.bench.config import (
    BASELINE,
    BUSY_LOAD,
    SCHEMA,
    SCHEMA_VERSION,
    TEXT_LENGTHS,
    BenchConfig,
)
from clipfast.bench.flops import count_tower_flops
from clipfast.bench.machine import load_average, machine_info
from clipfast.bench.memory import MemoryProbe, current_rss_mb
from clipfast.bench.peak import measure_cpu_peak, measure_gpu_peak, peak_for
from clipfast.bench.stats import add_speedups, round_sig, summarize, time_interleaved
from clipfast.bench.workload import (
    Inputs,
    cuda_sync,
    load_engine,
    model_label,
    prepare_inputs,
    row_callable,
)
from clipfast.errors import ClipfastError


def run_bench(config: BenchConfig, *, log: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Run the benchmark; return the results document (see ``write_results``)."""
    config.validate()
    return _Run(config, log or logging.getLogger("clipfast.bench").info).run()


@dataclass
class _Artifact:
    """One artifact under measurement: ``path`` as given, its model label and precision, the
    FLOPs per item of each tower (None where not counted) and the inputs its rows slice."""

    index: int
    path: Path
    label: str
    precision: str
    flops_per_item: dict[str, float | None]
    inputs: Inputs
    rows_per_backend: int
    verified: bool = False  # checksums are verified on the first successful load only


class _Run:
    """The state of one run; ``run`` goes through the steps."""

    def __init__(self, config: BenchConfig, say: Callable[[str], Any]):
        self.config = config
        self.say = say
        self.notes: list[str] = []
        self.rows: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self.artifacts: list[dict[str, Any]] = []
        self.baselines_done: set[str] = set()  # models whose torch rows are measured already
        self.rss_per_row = True
        self.modes = ["tower"] + (["end_to_end"] if config.images is not None else [])
        self.batch_sizes = sorted(set(config.batch_sizes))
        self.peak: dict[str, Any] | None = None
        self.bar = None

    def run(self) -> dict[str, Any]:
        load_start = load_average()
        self.peak = self._measure_peak()
        self.bar = self._progress_bar()
        try:
            for i, art in enumerate(self.config.artifacts):
                self._bench_artifact(i, art)
                if i + 1 < len(self.config.artifacts):
                    gc.collect()  # the artifact's inputs and engines, before the next one loads
        finally:
            if self.bar is not None:
                self.bar.close()
        if not self.rows:
            reasons = "; ".join(f"{s['backend']}: {s['reason']}" for s in self.skipped)
            raise ClipfastError(f"bench: no backend could run ({reasons})")
        add_speedups(self.rows)
        load_end = load_average()
        self._closing_notes(load_start, load_end)
        return self._document(load_start, load_end)

    # ------------------------------------------------------------------ steps

    def _measure_peak(self) -> dict[str, Any] | None:
        if not self.config.peak:
            return None
        self.say("measuring the matrix-multiply peak")
        try:
            if self.config.device == "cuda":
                peak = measure_gpu_peak()
            else:
                peak = measure_cpu_peak(self.config.peak_size, threads=self.config.threads)
        except Exception as e:  # the peak is context, not the benchmark: say why it is missing
            self.notes.append(f"matrix-multiply peak not measured: {type(e).__name__}: {e}")
            return None
        self.notes.extend(peak.pop("notes", []))
        return peak

    def _progress_bar(self):
        if not self.config.progress:
            return None
        from tqdm.auto import tqdm

        c = self.config
        per_artifact = len(c.backends) * self._rows_per_backend()
        return tqdm(total=per_artifact * len(c.artifacts), unit="row", desc="bench",
                    file=sys.stderr)

    def _tick(self, n: int = 1) -> None:
        if self.bar is not None and n:
            self.bar.update(n)

    def _bench_artifact(self, index: int, art: Path) -> None:
        from clipfast.artifact.manifest import load_manifest

        c = self.config
        manifest = load_manifest(art, verify_checksums=False)
        label = model_label(manifest)
        info: dict[str, Any] = {
            "path": str(Path(art)), "model": label, "family": manifest.spec.family,
            "precision": manifest.spec.precision,
            "random_weights": manifest.spec.random_weights,
            "embed_dim": manifest.spec.embed_dim, "flops": {},
        }
        self.artifacts.append(info)
        flops = self._count_flops(manifest, label, info["flops"])
        inputs = prepare_inputs(manifest, self.batch_sizes[-1], c.images, c.towers)
        a = _Artifact(index, art, label, manifest.spec.precision, flops, inputs,
                      self._rows_per_backend())
        # Sequential: one backend loaded at a time (clean per-backend memory figures).
        # Interleaved: all loaded, calls alternating, so every backend sees the same load.
        wanted = [b for b in c.backends
                  if c.interleave or not (b == BASELINE and label in self.baselines_done)]
        self._tick(a.rows_per_backend * (len(c.backends) - len(wanted)))
        for group in [wanted] if c.interleave else [[b] for b in wanted]:
            engines, loads = self._load_group(a, group)
            if not engines:
                continue
            self._time_group(a, engines, loads)
            del engines
            gc.collect()

    def _count_flops(self, manifest, label: str, into: dict[str, Any]
                     ) -> dict[str, float | None]:
        """FLOPs per item of each tower (None where not counted); the counts' details go
        ``into`` the artifact's entry, what could not be counted into the notes."""
        per_item: dict[str, float | None] = {t: None for t in self.config.towers}
        if not self.config.flops:
            return per_item
        for tower in self.config.towers:
            self.say(f"counting FLOPs of the {label} {tower} tower")
            try:
                fc = count_tower_flops(manifest, tower)
            except ImportError as e:  # no onnx: the run goes on without FLOP figures
                note = (f"FLOPs not counted: {e}; the GFLOP/item and utilisation columns are "
                        "empty")
                if note not in self.notes:
                    self.notes.append(note)
                break
            except Exception as e:
                self.notes.append(f"{label} {tower}: FLOPs not counted: "
                                  f"{type(e).__name__}: {e}")
                continue
            into[tower] = fc.to_dict()
            per_item[tower] = fc.total if fc.total > 0 else None
            if fc.unresolved or fc.uncounted_ops:
                self.notes.append(f"{label} {tower}: {len(fc.unresolved)} compute nodes with "
                                  f"unknown shapes, uncounted ops {fc.uncounted_ops}: FLOPs "
                                  "are a lower bound")
        return per_item

    def _load_group(self, a: _Artifact, group: list[str]
                    ) -> tuple[dict[str, Any], dict[str, tuple[float, float | None]]]:
        """Load ``a`` on every backend of ``group``: (engines, (load seconds, load RSS MiB) per
        backend). A backend that cannot load is skipped with the reason."""
        engines: dict[str, Any] = {}
        loads: dict[str, tuple[float, float | None]] = {}
        for backend in group:
            self.say(f"loading {a.label} ({a.precision}) on {backend}")
            rss0 = current_rss_mb()
            t0 = time.perf_counter()
            try:
                engines[backend] = load_engine(a.path, backend, self.config,
                                               verify=not a.verified)
            except (ClipfastError, ImportError, OSError) as e:
                self.skipped.append({"artifact": str(a.path), "model": a.label,
                                     "backend": backend, "reason": str(e)})
                self._tick(a.rows_per_backend)
                continue
            a.verified = True
            rss1 = current_rss_mb()
            loads[backend] = (time.perf_counter() - t0,
                              round(rss1 - rss0, 1) if rss0 is not None and rss1 else None)
            if backend == BASELINE:
                self.baselines_done.add(a.label)
        return engines, loads

    def _time_group(self, a: _Artifact, engines: dict[str, Any],
                    loads: dict[str, tuple[float, float | None]]) -> None:
        sync = cuda_sync(self.config.device)
        probe = MemoryProbe(self.config.device)
        for tower in self.config.towers:
            for mode in self.modes:
                for length in self._text_lengths(a, tower, mode):
                    for batch in self.batch_sizes:
                        self._time_rows(a, engines, loads, (tower, mode, batch, length), sync,
                                        probe)

    def _rows_per_backend(self) -> int:
        c = self.config
        per_tower = {t: len(self.modes) + (len(TEXT_LENGTHS) - 1 if t == "text" else 0)
                     for t in c.towers}
        return sum(per_tower.values()) * len(self.batch_sizes)

    @staticmethod
    def _text_lengths(a: _Artifact, tower: str, mode: str) -> list[int | None]:
        """Text tower rows: one set per text length (``TEXT_LENGTHS``); others: one."""
        if tower == "text" and mode == "tower" and a.inputs.texts_by_length:
            return sorted(a.inputs.texts_by_length)
        return [None]

    def _time_rows(self, a: _Artifact, engines: dict[str, Any],
                   loads: dict[str, tuple[float, float | None]],
                   where: tuple[str, str, int, int | None],
                   sync: Callable[[], Any] | None, probe: MemoryProbe) -> None:
        """Time one tower, mode, batch size (and text length) on every loaded backend
        (interleaved when more than one is loaded) and add their rows."""
        c = self.config
        tower, mode, batch, length = where
        if self.bar is not None:
            self.bar.set_postfix_str(f"{a.label} {'+'.join(engines)} {tower} {mode} b{batch}"
                                     + (f" L{length}" if length else ""))
        fns = {b: row_callable(e, tower, mode, batch, a.inputs, length)
               for b, e in engines.items()}
        probe.start()
        timed = time_interleaved(fns, warmup=c.warmup, min_iters=c.min_iters,
                                 max_iters=c.max_iters, min_seconds=c.min_seconds, sync=sync)
        mem = probe.stop()
        self.rss_per_row = self.rss_per_row and probe.resettable
        for backend, times in timed.items():
            self._tick()
            if isinstance(times, Exception) or not times:
                # One row failing (out of memory at a large batch) must not lose the others:
                # record it, with the reason.
                self.skipped.append({"artifact": str(a.path), "model": a.label,
                                     "backend": backend, "tower": tower, "mode": mode,
                                     "batch_size": batch,
                                     "reason": f"{type(times).__name__}: {times}"})
                continue
            row = self._row(a, backend, engines[backend], where, times, mem, loads[backend])
            if c.interleave:
                row["group"] = a.index
            self.rows.append(row)

    def _row(self, a: _Artifact, backend: str, engine, where: tuple[str, str, int, int | None],
             times: list[float], mem: dict[str, Any], load: tuple[float, float | None]
             ) -> dict[str, Any]:
        tower, mode, batch, length = where
        # what the towers compute in (bf16 on an fp32 artifact is said, not implied)
        info = engine.backend_info()
        precision = "fp32" if backend == BASELINE else info.precision
        stats = summarize(times, batch)
        row: dict[str, Any] = {
            "model": a.label, "artifact": str(a.path), "backend": backend,
            "device": self.config.device, "precision": precision, "tower": tower, "mode": mode,
            "batch_size": batch, "warmup": self.config.warmup,
        }
        flops = a.flops_per_item.get(tower)
        if length is not None:
            ids, _ = a.inputs.texts_by_length[length]
            context = next(iter(ids.values())).shape[1]
            # tokens the tower actually ran per text: the length on the dynamic path (the torch
            # baseline pads to the context)
            ran = length if (getattr(engine, "text_dynamic", False) and backend != BASELINE) \
                else context
            row.update(text_length=length, tokens_run=ran)
            if flops is not None:  # counted at the context; linear in tokens to within the
                flops = flops * ran / context  # attention scores' share (a few % at 77)
        row.update({k: (round_sig(v, 6) if isinstance(v, float) else v)
                    for k, v in stats.items()})
        row.update(mem)
        row["load_s"] = round(load[0], 2)
        row["load_rss_mb"] = load[1]
        if engine.backend == "onnxruntime":
            row["providers"] = list(info.providers) if info.providers is not None else None
        if info.tuning:
            row["auto_choice"] = info.tuning.get("label")
        row.update(_utilisation(flops, stats["items_per_s"],
                                peak_for(precision, self.peak)))
        return row

    # ------------------------------------------------------------------ the document

    def _closing_notes(self, load_start: list[float] | None, load_end: list[float] | None
                       ) -> None:
        c, notes = self.config, self.notes
        if not any(r["backend"] == BASELINE for r in self.rows) and BASELINE in c.backends:
            notes.append("the torch baseline did not run (see skipped): no speedups")
        busy = max((load_start or [0])[0], (load_end or [0])[0])
        if busy > BUSY_LOAD:
            notes.append(f"load average {busy:.2f} > {BUSY_LOAD} while measuring (start "
                         f"{load_start}, end {load_end}): other jobs were running on this "
                         "machine, timings are noisy")
        if c.interleave:
            notes.append("--interleave: the backends were loaded together and their calls "
                         "alternated; peak RSS is the whole process's (every backend's "
                         "weights), load_rss_mb in the JSON is what each backend's load added")
        over = [r for r in self.rows if (r.get("utilisation") or 0) > 1.0]
        if over:
            notes.append(f"{len(over)} row(s) above 100% of the measured matrix-multiply peak: "
                         "the peak (best of a few GEMMs at the start) was depressed by other "
                         "load, or those calls ran in a quiet moment; compare utilisation on an "
                         "idle machine")
        if not self.rss_per_row:
            notes.append("the RSS high-water mark could not be reset per row (no "
                         "/proc/self/clear_refs): peak RSS is the process-lifetime maximum")
        for s in self.skipped:
            where = (f" {s['tower']} {s['mode']} batch {s['batch_size']}" if "tower" in s
                     else "")
            notes.append(f"{s['model']}: backend {s['backend']}{where} skipped: {s['reason']}")

    def _document(self, load_start: list[float] | None, load_end: list[float] | None
                  ) -> dict[str, Any]:
        c = self.config
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": c.command(),
            "machine": machine_info(c.device),
            "load_average": {"start": load_start, "end": load_end},
            "settings": {"device": c.device, "threads": c.threads or os.cpu_count(),
                         "warmup": c.warmup, "min_iters": c.min_iters,
                         "max_iters": c.max_iters, "min_seconds": c.min_seconds,
                         "batch_sizes": self.batch_sizes, "towers": list(c.towers),
                         "backends": list(c.backends), "modes": self.modes,
                         "interleave": c.interleave,
                         "images": str(c.images) if c.images else None},
            "peak": self.peak,
            "artifacts": self.artifacts,
            "rows": self.rows,
            "skipped": self.skipped,
            "notes": self.notes,
        }


def _utilisation(flops: float | None, items_per_s: float, peak_g: float | None
                 ) -> dict[str, Any]:
    """A row's FLOP columns: GFLOP per item, GFLOP/s reached, the peak it is compared with and
    the fraction of it (None where FLOPs or throughput are unknown)."""
    out: dict[str, Any] = {"gflop_per_item": round_sig(flops / 1e9) if flops else None}
    if flops and math.isfinite(items_per_s):
        achieved = flops * items_per_s / 1e9
        out["achieved_gflops"] = round_sig(achieved)
        out["peak_gflops"] = peak_g
        out["utilisation"] = round_sig(achieved / peak_g) if peak_g else None
    else:
        out["achieved_gflops"] = out["peak_gflops"] = out["utilisation"] = None
    return out
