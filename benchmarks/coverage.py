"""Coverage sweep: every open_clip config, random weights, exported fp32 and fp16, gated.

    python benchmarks/coverage.py --layers 2            # all configs, depth capped at 2 blocks
    python benchmarks/coverage.py --layers 0 --max-params 2e8   # full depth, small configs
    python benchmarks/coverage.py --render              # coverage.md + the README summary line

Each config runs in its own child process (``--child NAME``) with a timeout; the parent reads the
child's peak RSS from ``os.wait4`` and appends one JSON line per (config, depth) to
``benchmarks/results/coverage.jsonl``: a rerun skips what is already there (resumable).

In the child: the config is rewritten to build offline (``offline_families``:
local configs for hub text towers, stand-in tokenizers) and registered under ``NAME@L<n>`` (or
``NAME@offline`` at full depth), then exported with the real pipeline
(``clipfast.export.pipeline.run_export``, ``--pretrained none``), fp32 then fp16, each measured
against the PyTorch source and checked against the project's gates
(clipfast.artifact.fidelity.GATES).

Depth reduction (``--layers n``): transformer blocks per tower and blocks per convolutional stage
are capped at n; widths, heads, image size, patch size, pooling heads, activations and operators
are those of the real config, so what fails to export or to match at depth n fails for the same
reason at full depth. It does not show full-depth numerical drift (fp16 error grows with depth)
nor full-size memory/time; the table says per row at which depth it ran.

Parameters are counted at full depth on the meta device (no memory). At full depth
(``--layers 0``) a config over ``--max-params`` is recorded as too large for this machine with
that count, not built.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
JSONL = RESULTS / "coverage.jsonl"
MARKDOWN = RESULTS / "coverage.md"
PARAMS = RESULTS / "coverage_params.json"
README = ROOT / "README.md"
# the offline builders (local configs, stand-in tokenizers) are test scaffolding, kept in tests/
sys.path.insert(0, str(ROOT / "tests"))
# A full-depth export holds the fp32 model, the traced graph, an ORT session and the fp16 copy:
# measured ~2.2 GiB + 28 bytes per parameter at peak (coverage.md), so ~22 GiB holds ~7.5e8.
DEFAULT_MAX_PARAMS = 7.5e8
# fidelity measured on this many of the built-in generated images (and as many captions): a
# third of the export default (24), to fit 144 configs into the time a 2-core machine had
MEASURE_IMAGES = 8
FIGURE_KEYS = ("images", "pixel_levels", "token_ids_identical", "image_centred_rel_error",
               "image_cosine", "text_centred_rel_error", "text_cosine", "top1_agreement")


# -- child ---------------------------------------------------------------------------------------
def _short_error(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}"
    msg = re.sub(r"/tmp/[^\s:'\"]+", "<tmp>", msg)
    return msg if len(msg) <= 600 else msg[:600] + " ..."


def _measure_images(work: Path) -> Path:
    """MEASURE_IMAGES of the built-in generated images as PNG files, for ``--images``."""
    from PIL import Image

    from clipfast.artifact.samples import sample_images

    d = work / "images"
    if not d.is_dir():
        d.mkdir(parents=True)
        for i, a in enumerate(sample_images(MEASURE_IMAGES)):
            Image.fromarray(a).save(d / f"{i:02d}.png")
    return d


def _export_one(name: str, precision: str, work: Path, layers: int | None) -> dict[str, Any]:
    from offline_families import timm_depth

    from clipfast.artifact.manifest import load_manifest
    from clipfast.export.pipeline import ExportOptions, run_export

    out = work / f"artifact-{precision}"
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"passed": False}
    try:
        with timm_depth(layers):
            run_export(ExportOptions(model=name, out=out, pretrained="none", precision=precision,
                                     images=_measure_images(work), progress=False,
                                     overwrite=True))
        spec = load_manifest(out, verify_checksums=False).spec
        fid = spec.fidelity or {}
        rec.update(passed=bool(fid.get("passed")),
                   figures={k: fid[k] for k in FIGURE_KEYS if k in fid},
                   fused={w: getattr(spec.graph.tower(w), "fusion", None)
                          for w in ("image", "text")},
                   family=spec.family)
    except Exception as e:  # every failure is a result, with its reason
        rec["error"] = _short_error(e)
        rec["stage"] = type(e).__name__
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    shutil.rmtree(out, ignore_errors=True)
    for leftover in work.glob(f".artifact-{precision}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return rec


def run_child(model: str, layers: int, max_params: float, result: Path) -> None:
    """Build, count, export fp32 + fp16; write the record to ``result`` (JSON)."""
    import logging

    logging.disable(logging.WARNING)
    import torch

    torch.set_num_threads(int(os.environ.get("COVERAGE_THREADS", "2")))
    from offline_families import count_parameters, register_offline_config

    rec: dict[str, Any] = {"model": model, "layers": layers or "full"}
    work = Path(tempfile.mkdtemp(prefix="clipfast-coverage-"))
    try:
        full = register_offline_config(model, work / "cfg", None)
        rec["assumptions"] = full.assumptions
        try:
            rec["params_full"] = count_parameters(full.name)
        except Exception as e:
            rec["params_full"] = None
            rec["params_error"] = _short_error(e)
        if not layers and rec["params_full"] and rec["params_full"] > max_params:
            rec["status"] = "too_large"
            return
        if layers:
            reduced = register_offline_config(model, work / "cfg", layers)
            name = reduced.name
            with _timm(layers):
                try:
                    rec["params_built"] = count_parameters(name)
                except Exception:
                    rec["params_built"] = None
        else:
            name = full.name
            rec["params_built"] = rec["params_full"]
        for precision in ("fp32", "fp16"):
            rec[precision] = _export_one(name, precision, work, layers or None)
        rec["status"] = "ok"
    except Exception as e:
        rec["status"] = "error"
        rec["error"] = _short_error(e)
        rec["traceback"] = traceback.format_exc()[-2000:]
    finally:
        result.write_text(json.dumps(rec))
        shutil.rmtree(work, ignore_errors=True)


def _timm(layers: int):
    from offline_families import timm_depth

    return timm_depth(layers)


def count_all(path: Path) -> None:
    """Full-depth parameter count of every open_clip config (meta device, offline configs) into
    ``path`` (JSON ``{name: count or null}``): the too-large list needs no build."""
    import logging

    import open_clip
    from offline_families import count_parameters, register_offline_config

    logging.disable(logging.WARNING)
    counts: dict[str, int | None] = {}
    work = Path(tempfile.mkdtemp(prefix="clipfast-params-"))
    try:
        for name in open_clip.list_models():
            try:
                counts[name] = count_parameters(register_offline_config(name, work).name)
            except Exception as e:  # recorded as unknown, with the reason on stderr
                print(f"{name}: {_short_error(e)}", file=sys.stderr)
                counts[name] = None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path.write_text(json.dumps(counts, indent=0, sort_keys=True) + "\n")


# -- parent --------------------------------------------------------------------------------------
def _done(path: Path) -> set[tuple[str, str]]:
    done: set[tuple[str, str]] = set()
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done.add((r["model"], str(r["layers"])))
    return done


def run_parent(args: argparse.Namespace) -> None:
    import open_clip

    names = open_clip.list_models()
    if args.match:
        names = [n for n in names if re.search(args.match, n)]
    if args.order_by_size or args.order_by_family:
        sizes = _size_order()
        names.sort(key=lambda n: sizes.get(n, float("inf")))
    if args.order_by_family:
        # round robin over the families, each smallest first: every family's small members
        # run before any family's large ones
        from clipfast.export.families import family_for_open_clip_name

        groups: dict[str, list[str]] = {}
        for n in names:
            groups.setdefault(family_for_open_clip_name(n), []).append(n)
        names = [n for rank in range(max(map(len, groups.values())))
                 for g in groups.values() if rank < len(g) for n in [g[rank]]]
    if args.first:
        first = [n for n in args.first.split(",") if n in names]
        names = first + [n for n in names if n not in first]
    if args.shard:
        index, count = (int(x) for x in args.shard.split("/"))
        names = names[index::count]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    layers_key = str(args.layers or "full")
    done = set() if args.redo else _done(out)
    for name in names:
        if (name, layers_key) in done:
            continue
        if args.deadline and time.time() > args.deadline:
            print("deadline reached", flush=True)
            break
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            result = Path(f.name)
        cmd = [sys.executable, __file__, "--child", name, "--layers", str(args.layers),
               "--max-params", str(args.max_params), "--result", str(result)]
        rec, wall = _run_child(cmd, result, args.timeout)
        rec.setdefault("model", name)
        rec.setdefault("layers", layers_key)
        rec["host"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "memory_mib": round(_memory_mib())}
        rec["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        rec["commit"] = _commit()  # the code the child ran (it imports the tree afresh)
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"{name:40s} {rec['status']:9s} "
              f"fp32={_verdict(rec.get('fp32'))} fp16={_verdict(rec.get('fp16'))} "
              f"{wall:7.1f}s {rec['peak_rss_mib']} MiB", flush=True)


def _commit() -> str | None:
    """HEAD of the checkout this script is in, with "+dirty" when tracked files differ."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "clipfast", "export"],
                               cwd=root).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def _lower_autogroup(pid: int) -> None:
    """Give a child's new session (its scheduler autogroup on Linux) this process's niceness:
    with autogroups, ``nice`` only ranks processes inside one session, so a niced sweep whose
    children start sessions of their own would otherwise take an equal share of the CPUs."""
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(os.nice(0)))
    except OSError:
        pass  # no autogroups (or not Linux): plain nice applies


def _run_child(cmd: list[str], result: Path, timeout: float) -> tuple[dict[str, Any], float]:
    """Run one child to completion or ``timeout``; ``(record, wall seconds)``. The child's own
    peak RSS comes from ``os.wait4`` (its rusage alone, not the sum over children)."""
    t0 = time.time()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        _lower_autogroup(proc.pid)
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                timed_out = True
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.5)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    wall = round(time.time() - t0, 1)
    try:
        rec = json.loads(result.read_text())
    except (OSError, ValueError):
        rec = {"status": "crashed", "error": stderr[-1500:] or f"exit {proc.returncode}"}
    result.unlink(missing_ok=True)
    if timed_out:
        rec.update(status="timeout", error=f"no result within {timeout:.0f} s")
    rec["returncode"] = proc.returncode
    rec["wall_seconds"] = wall
    rec["peak_rss_mib"] = usage.ru_maxrss // 1024  # Linux: KiB
    return rec, wall


def _size_order() -> dict[str, int]:
    """Rough size key from the config (width^2 * layers) without building anything."""
    import open_clip

    key = {}
    for n in open_clip.list_models():
        c = open_clip.get_model_config(n)
        v, t = c["vision_cfg"], c.get("text_cfg", {})
        vl = v.get("layers", 12)
        vl = sum(vl) if isinstance(vl, (list, tuple)) else vl
        key[n] = v.get("width", 768) ** 2 * vl + t.get("width", 512) ** 2 * t.get("layers", 12)
        if v.get("timm_model_name") or t.get("hf_model_name"):
            key[n] *= 4
    return key


def _verdict(r: dict[str, Any] | None) -> str:
    if not r:
        return "-"
    return "pass" if r.get("passed") else "FAIL"


# -- render --------------------------------------------------------------------------------------
def load_results(path: Path = JSONL) -> dict[str, dict[str, dict[str, Any]]]:
    """``{model: {depth key: newest record}}`` (depth key "1", "2", ..., or "full")."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out.setdefault(r["model"], {})[str(r["layers"])] = r
    return out


def _passed(rec: dict[str, Any] | None, precision: str) -> bool:
    return bool(((rec or {}).get(precision) or {}).get("passed"))


def _cell(rec: dict[str, Any] | None, precision: str) -> str:
    if rec is None:
        return "not run"
    if rec.get("status") == "too_large":
        return "too large"
    if rec.get("status") in ("timeout", "crashed", "error"):
        return rec["status"]
    return "pass" if _passed(rec, precision) else "**fail**"


def _err(rec: dict[str, Any] | None, precision: str) -> str:
    figs = ((rec or {}).get(precision) or {}).get("figures") or {}
    if "image_centred_rel_error" not in figs:
        return ""
    return f"{figs['image_centred_rel_error']:.1e} / {figs['text_centred_rel_error']:.1e}"


def _memory_mib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20


def _crash_note(rec: dict[str, Any]) -> str:
    """A crashed child's error; SIGKILL near the sweep host's memory (this host's, for rows that
    predate recording it) is the kernel's OOM killer."""
    error = rec.get("error", "")
    total = (rec.get("host") or {}).get("memory_mib") or _memory_mib()
    peak = rec.get("peak_rss_mib") or 0
    if rec.get("returncode") == -9 and rec.get("status") == "crashed" and peak > 0.85 * total:
        return (f"killed by SIGKILL at {peak} MiB peak RSS on a {total / 1024:.0f} GiB machine: "
                "out of memory")
    return error


def _reason(recs: dict[str, dict[str, Any]]) -> str:
    notes = []
    for depth, rec in sorted(recs.items()):
        tag = "full" if depth == "full" else f"L{depth}"
        if rec.get("status") == "too_large":
            continue
        if rec.get("status") in ("timeout", "crashed", "error"):
            notes.append(f"{tag}: {_crash_note(rec)[:300]}")
            continue
        for p in ("fp32", "fp16"):
            r = rec.get(p) or {}
            if not r.get("passed"):
                notes.append(f"{tag} {p}: {(r.get('error') or 'below gate')[:300]}")
            elif "dropped for fp16" in json.dumps(r.get("fused")):
                notes.append(f"{tag} {p}: ORT crashed on the fused fp16 graph, unfused used")
    return "; ".join(notes).replace("|", "\\|").replace("\n", " ")


def _family(name: str) -> str:
    from clipfast.export.families import family_for_open_clip_name

    return family_for_open_clip_name(name)


def _memory_fit(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Least-squares peak RSS = base + bytes x parameters over the full-depth runs."""
    import numpy as np

    pts = [(r["params_full"], r["peak_rss_mib"]) for recs in results.values()
           for d, r in recs.items() if d == "full" and r.get("status") == "ok"
           and r.get("params_full") and r.get("peak_rss_mib")]
    if len(pts) < 3:
        return "too few full-depth runs to fit the memory per parameter."
    x = np.array([p for p, _ in pts], dtype=float)
    y = np.array([m for _, m in pts], dtype=float) * 2**20
    slope, base = np.polyfit(x, y, 1)
    fits = (22 * 2**30 - base) / slope
    return (f"the {len(pts)} full-depth runs peaked at {base / 2**30:.1f} GiB + {slope:.0f} "
            f"bytes per parameter (fp32 + fp16 export in one process, "
            f"{min(x) / 1e6:.0f}-{max(x) / 1e6:.0f} M parameters), so 22 GiB (24 GiB less "
            f"the rest of the machine) holds about {fits / 1e6:.0f} M parameters.")


def _params() -> dict[str, int | None]:
    try:
        return json.loads(PARAMS.read_text())
    except (OSError, ValueError):
        return {}


def summary(results: dict[str, dict[str, dict[str, Any]]], names: list[str],
            params: dict[str, int | None], max_params: float) -> dict[str, Any]:
    too_large = sorted(n for n in names if (params.get(n) or 0) > max_params)
    s: dict[str, Any] = {"configs": len(names), "max_params_full_depth": max_params,
                         "too_large_full_depth": too_large}
    for depth in sorted({d for r in results.values() for d in r}):
        recs = [results[n][depth] for n in names if depth in results.get(n, {})]
        ran = [r for r in recs if r.get("status") != "too_large"]
        s[depth] = {
            "run": len(ran),
            "not_run": len(names) - len(ran) - (len(too_large) if depth == "full" else 0),
            "fp32_pass": sum(_passed(r, "fp32") for r in ran),
            "fp16_pass": sum(_passed(r, "fp16") for r in ran),
            "both_pass": sum(_passed(r, "fp32") and _passed(r, "fp16") for r in ran),
            # towers whose attention ONNX Runtime fused (fp32 export's graph record)
            "image_fused": sum(((r.get("fp32") or {}).get("fused") or {}).get("image") == "ok"
                               for r in ran),
            "text_fused": sum(((r.get("fp32") or {}).get("fused") or {}).get("text") == "ok"
                              for r in ran),
        }
    return s


def summary_line(s: dict[str, Any], reduced: str) -> str:
    r = s.get(reduced, {})
    full = s.get("full", {})
    line = (f"Coverage (random weights, offline): at depth {reduced} (every tower capped at "
            f"{reduced} block(s) per stack/stage, real widths), {r.get('both_pass', 0)} of "
            f"{r.get('run', 0)} open_clip configs run pass the fp32 and fp16 gates "
            f"(fp32 {r.get('fp32_pass', 0)}, fp16 {r.get('fp16_pass', 0)}); "
            f"{r.get('not_run', s['configs'])} of {s['configs']} not reached in the time")
    if full:
        line += (f"; at full depth {full.get('both_pass', 0)} of {full.get('run', 0)} run pass "
                 f"both")
    line += (f"; {len(s['too_large_full_depth'])} are too large to export at full depth on a "
             "24 GiB 2-core machine")
    return line + ". Table: benchmarks/results/coverage.md."


def render(reduced: str, max_params: float) -> None:
    import open_clip

    names = open_clip.list_models()
    results = load_results()
    params = _params()
    s = summary(results, names, params, max_params)
    images_note = (f"fidelity measured on {MEASURE_IMAGES} built-in generated images and "
                   f"{MEASURE_IMAGES} captions (`--images`; rows whose figures lack an image "
                   "count used the export default, 24)")
    lines = [
        "# Coverage: every open_clip config, exported and gated",
        "",
        "Generated by `python benchmarks/coverage.py --render` from `coverage.jsonl` "
        "(one JSON line per config and depth run; the newest wins). Random weights "
        "(`--pretrained none`), built offline; fp32 and fp16 exported by the real pipeline "
        "(`run_export`, fusion on, fp16 fallbacks on) and checked against the PyTorch source "
        "with the project's gates (`clipfast.artifact.fidelity.GATES`: fp32 centred error <= 1e-3 "
        "and "
        "cosine >= 0.99999, fp16 <= 1e-2 and >= 0.9995, identical token ids, pixels within 1 "
        f"level, top-1 agreement >= 0.95); {images_note}.",
        "",
        f"**{summary_line(s, reduced)}**",
        "",
        "## How it was run, and what it does not show",
        "",
        f"- **L{reduced}** (`--layers {reduced}`): every transformer stack capped at {reduced} "
        f"block(s), every convolutional stage at {reduced} block(s) (ModifiedResNet `layers`, "
        "timm `depth` / `depths` / FastViT `layers`, HF text `num_hidden_layers`). Widths, "
        "heads, image size, patch size, vocabulary, pooling heads, activations and operators "
        "are the real config's. This shows whether each family's operators, pooling and "
        "attention fusion export and match. It does not show full-depth fp16 drift (fp16 error "
        "grows with depth), nor full-size memory or time.",
        "- **full**: the real config, all blocks, smallest first, while time allowed. "
        "`not run` = no run was made (time), not a failure.",
        f"- **too large**: more than {max_params:.2g} parameters at full depth (counted on the "
        "meta device, `--count-params`). An export holds the fp32 model, the traced graph, an "
        f"ONNX Runtime session and the fp16 copy; {_memory_fit(results)} So these were not "
        "tried at full depth (an extrapolation, not a measured failure); their depth-capped "
        "rows are run.",
        "- **Offline assumptions**: hub text-tower configs (xlm-roberta, mt5, nllb, roberta) are "
        "transformers config classes with the released base sizes written out "
        "(`tests/offline_families.py` `HF_TEXT_CONFIGS`; transformers' class defaults are "
        "BERT-sized, e.g. XLMRobertaConfig vocab 30522, so they are not relied on). Hub "
        "tokenizers (SigLIP, SigLIP 2, CLIPA's BERT, worldwide XLM-V / mT5, the multilingual "
        "towers) are replaced by stand-in Unigram tokenizers with the released special-token "
        "ids and templates: those artifacts' token ids are not the real model's. Exports of "
        "real checkpoints read the real tokenizer.",
        "- **Random init**: `--pretrained none` ResNets get BatchNorm statistics calibrated on "
        "built-in images and LayerScale gammas < 1e-2 are set to 1 (the family's "
        "`random_init`): open_clip's own init maps every image to nearly one embedding, where "
        "the centred error is ill-conditioned (RN50 fp16: centred error 0.03 at cosine "
        "0.9999999 before, 3e-3 after).",
        "- Sweep host: 2 shared CPU cores, 24 GiB, no GPU; configs ran niced next to other "
        "work, so the times are upper bounds.",
        "",
        "## Summary",
        "",
        "| depth | configs run | not run | fp32 pass | fp16 pass | both pass | image tower "
        "fused | text tower fused |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for depth in sorted(k for k in s if k not in ("configs", "max_params_full_depth",
                                                   "too_large_full_depth")):
        d = s[depth]
        lines.append(f"| {'full' if depth == 'full' else 'L' + depth} | {d['run']} | "
                     f"{d['not_run']} | {d['fp32_pass']} | {d['fp16_pass']} | "
                     f"{d['both_pass']} | {d['image_fused']} | {d['text_fused']} |")
    lines += ["", *FINDINGS]
    lines += [
        "",
        f"Too large at full depth ({len(s['too_large_full_depth'])}): " + ", ".join(
            f"{n} ({params[n] / 1e9:.2f} B)" for n in s["too_large_full_depth"]) + ".",
        "",
        "## All configs",
        "",
        f"| config | family | params (full) | L{reduced} fp32 | L{reduced} fp16 | "
        f"L{reduced} err fp32 | L{reduced} err fp16 | full fp32 | full fp16 | full err fp16 | "
        "export s (fp32+fp16) | peak RSS MiB | failure / note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        recs = results.get(n, {})
        red, full = recs.get(reduced), recs.get("full")
        count = params.get(n) or (full or red or {}).get("params_full")
        size = f"{count / 1e6:,.0f} M" if count else "?"
        secs, peaks = [], []
        for tag, r in (("L" + reduced, red), ("full", full)):
            if r and r.get("status") == "ok":
                total = sum((r.get(p) or {}).get("seconds") or 0 for p in ("fp32", "fp16"))
                secs.append(f"{tag}: {total:.0f}")
            if r and r.get("peak_rss_mib") and r.get("status") != "too_large":
                peaks.append(f"{tag}: {r['peak_rss_mib']}")
        big = count is not None and count > max_params
        full32 = "too large" if big and not full else _cell(full, "fp32")
        full16 = "too large" if big and not full else _cell(full, "fp16")
        lines.append(
            f"| {n} | {_family(n)} | {size} | {_cell(red, 'fp32')} | {_cell(red, 'fp16')} | "
            f"{_err(red, 'fp32')} | {_err(red, 'fp16')} | {full32} | {full16} | "
            f"{_err(full, 'fp16')} | {', '.join(secs)} | {', '.join(peaks)} | "
            f"{_reason(recs)} |")
    MARKDOWN.write_text("\n".join(lines) + "\n")
    (RESULTS / "coverage_summary.json").write_text(json.dumps(s, indent=1) + "\n")
    _write_status(results)
    _readme_line(summary_line(s, reduced))
    print(summary_line(s, reduced))


def _write_status(results: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Per-config status for `clipfast models` (shipped in clipfast.export.families)."""
    from clipfast.export.families.cli import COVERAGE_FILE

    status: dict[str, Any] = {}
    for name, recs in sorted(results.items()):
        status[name] = {}
        for depth, r in recs.items():
            key = "full" if depth == "full" else f"L{depth}"
            entry = {"status": r.get("status")}
            for p in ("fp32", "fp16"):
                if r.get(p):
                    entry[p] = "pass" if r[p].get("passed") else "fail"
            status[name][key] = entry
    COVERAGE_FILE.write_text(json.dumps(status, indent=0, sort_keys=True) + "\n")


# What the runs taught (written from the results above; keep in step when rerunning).
FINDINGS = [
    "## Findings",
    "",
    "Each row records when it finished and, from 2 Dec 23:35 UTC on, the commit its child ran "
    "(`coverage.jsonl`). Rows that failed before a fix below were rerun after it; rows that "
    "passed were not rerun, so their figures are from the code of their time.",
    "",
    "- Fixed while sweeping: (1) `--pretrained none` on open_clip configs with a transformers "
    "text tower loaded the base text weights from the hub (open_clip's `pretrained_text` "
    "defaults to True): random weights now mean random everywhere. (2) ONNX Runtime 1.32 "
    "crashes the process (SIGSEGV, in its NCHWc layout transformer) creating a CPU session for "
    "some fp16 graphs: CoCa's fused image tower, ViT-M-16-alt's image tower. fp16 sessions now "
    "run without that transformer everywhere (runtime, export measurement, the export's crash "
    "probe; `FP16_DISABLED_OPTIMIZERS` in clipfast/backends/onnxruntime.py; it only serves fp32 "
    "Conv kernels): CoCa keeps its fused fp16 image tower and coca_ViT-B-32 and ViT-M-16-alt "
    "pass fp16 at full depth. The child-process crash probe stays as a guard. (3) open_clip's "
    "and timm's random init leave BatchNorm at identity statistics, zero ResNet's last "
    "BatchNorm per bottleneck and start LayerScale at 1e-4..1e-6: every image then maps to "
    "nearly one embedding and fp16 failed the centred-error gate at cosine 0.9999999. "
    "`--pretrained none` now calibrates image-tower BatchNorm on built-in images and sets small "
    "LayerScale gammas to 1. (4) fp16 of text towers past 2 GiB (the worldwide XLM-V 900k-token "
    "and mt5-xl embeddings): protobuf cannot even size such a graph in memory (`ByteSize` "
    "raises 'Failed to serialize proto'), so onnx's in-memory shape inference and the size "
    "check failed. Their types now come from path-based shape inference and their size from "
    "the initializers' payload (export/fp16.py, export/onnx_files.py). (5) The depth cap "
    "passed FastViT `layers` as 4 stages; MobileCLIP2-S3/S4's FastViT has 5. It now caps each "
    "stage where the variant builds them. (6) Full-depth ResNets from RN101 up missed the fp16 "
    "gate on random weights (RN101 image centred error 0.0137), and keeping the last 25-50% of "
    "weight operators fp32 did not move it: the stem's rounding is amplified by every layer "
    "after it (0.0064 with only the 3 stem convolutions fp32). The fp16 fallback now also "
    "keeps the first weight operators fp32 (first 5%, last 25%, first 25%, last 50%), and "
    "RN101 and RN50x4 pass at full depth.",
    "- Attention fusion applies to open_clip's own transformer blocks (ViT, the text towers of "
    "ResNet/ConvNeXt/EVA/... configs, CoCa's image tower); timm image towers, transformers text "
    "towers inside open_clip, non-causal or eos-pooled built-in text towers (SigLIP, CLIPA, "
    "worldwide) and LayerScale blocks export unfused, with the reason in the manifest: correct, "
    "not faster.",
    "- Open failures: MobileCLIP-S2 and MobileCLIP2-S2 (one text tower, non-causal, no padding "
    "mask): fp16 text centred error 0.0122 all fp16, 0.0100046 with the last half of the weight "
    "operators fp32, against the 0.01 gate. With random weights this tower maps every caption "
    "to nearly one embedding (mean pairwise cosine of the 8 captions' embeddings 0.993, against "
    "0.76 for ViT-B-32's text tower: the end-of-text token attends mostly to the identical "
    "padding), and the centred error divides by that small spread. It is a property of the "
    "random tower; a trained checkpoint is what to measure (not done: no hub access here). "
    "MobileCLIP2-S0 at full depth fails the same way (the same kind of text tower, 12 blocks: "
    "text centred error 0.0148 all fp16, 0.0105 with the first quarter of its weight operators "
    "fp32). "
    "ViT-bigG-14-worldwide and -378 could not be exported on this 24 GiB machine even at depth "
    "1: the child was killed by the kernel (exit -9) at 23.3 GiB. Their text tower's XLM-V "
    "embedding alone is 901k x 1280 = 1.15 B parameters (4.6 GB fp32), and the export holds "
    "several copies at once (the PyTorch model, the traced graph, the fp16 copy, ONNX Runtime "
    "sessions): the ViT-H-14 worldwide configs (901k x 1024) peaked at 20 GiB at depth 1. "
    "Lowering the export's peak (releasing the PyTorch tower before the fp16 step, one graph "
    "copy at a time) is the fix; not done.",
]


README_MARK = "<!-- coverage-summary -->"


def _readme_line(line: str) -> None:
    """Replace the line after the README's coverage marker (left alone if there is none)."""
    text = README.read_text()
    if README_MARK not in text:
        return
    head, _, tail = text.partition(README_MARK + "\n")
    rest = tail.split("\n", 1)[1] if "\n" in tail else ""
    README.write_text(head + README_MARK + "\n" + line + "\n" + rest)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=1,
                    help="cap depth at this many blocks per tower / stage; 0 = full depth")
    ap.add_argument("--match", help="only configs whose name matches this regex")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per config")
    ap.add_argument("--max-params", type=float, default=DEFAULT_MAX_PARAMS,
                    help="full depth: configs with more parameters are recorded as too large")
    ap.add_argument("--order-by-size", action="store_true", help="smallest configs first")
    ap.add_argument("--first", help="comma-separated configs to run before the others")
    ap.add_argument("--order-by-family", action="store_true",
                    help="round robin over families, each family smallest first")
    ap.add_argument("--deadline", type=float, help="unix time after which no config starts")
    ap.add_argument("--redo", action="store_true",
                    help="run configs already in the results again (the newest line wins)")
    ap.add_argument("--shard", help="I/N: run every N-th config starting at I (parallel sweeps "
                                    "appending to the same file)")
    ap.add_argument("--out", default=str(JSONL))
    ap.add_argument("--render", action="store_true",
                    help="write coverage.md and the README summary line from the JSONL")
    ap.add_argument("--reduced", default="1", help="--render: the reduced depth to tabulate")
    ap.add_argument("--count-params", action="store_true",
                    help=f"write every config's full-depth parameter count to {PARAMS.name}")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        run_child(args.child, args.layers, args.max_params, Path(args.result))
    elif args.count_params:
        count_all(PARAMS)
    elif args.render:
        render(args.reduced, args.max_params)
    else:
        run_parent(args)


if __name__ == "__main__":
    main()
