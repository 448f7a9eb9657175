"""Benchmark `clipfast embed` against a naive open_clip loop on 640 px and 12 MP JPEG folders.

    python benchmarks/embed_bench.py --artifact ARTIFACT [--rounds 3] [--n640 160] [--n12mp 40]

ARTIFACT: an fp32 ViT-B-32 export (``clipfast export --model ViT-B-32 --pretrained none``). The
JPEG folders are generated at run time from examples/images (resized up, with per-image noise
for detail; nothing big is committed). Methods, interleaved round by round on the same files
(the machine is shared: medians are quoted, with the load average of each round):

- naive: PIL open + open_clip's eval transform + eager PyTorch ``encode_image``, batch 32,
  torch threads = cores (what a user writes around open_clip);
- embed: ``clipfast embed`` (run_embed with the Engine loaded once, as the CLI does after start-up:
  enumeration, decode threads, tower, parquet shards with fsync), exact preprocessing;
- embed --fast-decode: the same with JPEG draft + reducing_gap. Its one-time fidelity
  measurement (16 images decoded both ways) is timed apart and reported, not in the rate;
- tower only: ``Engine.run_image_tower`` on ready pixels, batch 32: the ceiling.

A small sweep of decode threads x ONNX Runtime intra-op threads on both folders picks the
defaults. Writes benchmarks/results/embed-bench.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket"]


def make_folder(folder: Path, n: int, size: tuple[int, int], quality: int, seed: int) -> None:
    """n JPEGs of ``size`` (w, h) from the example photos, resized up, plus Gaussian noise
    (sigma 4 levels) so each file differs and carries camera-like high-frequency detail."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bases = [Image.open(ROOT / "examples" / "images" / f"{p}.jpg").convert("RGB")
             .resize(size, Image.Resampling.BICUBIC) for p in PHOTOS]
    for i in range(n):
        base = np.asarray(bases[i % len(bases)], dtype=np.int16)
        noise = rng.normal(0, 4, size=base.shape).astype(np.int16)
        arr = np.clip(base + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i:04d}.jpg", quality=quality)


def cpu_facts() -> dict:
    flags, model = set(), ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
    return {"model": model, "cores": os.cpu_count(),
            "avx512_vnni": "avx512_vnni" in flags, "avx512f": "avx512f" in flags,
            "avx2": "avx2" in flags, "python": platform.python_version()}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def naive_loop(paths: list[str], model, transform, torch, batch: int = 32) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(paths), batch):
            x = torch.stack([transform(Image.open(p)) for p in paths[s:s + batch]])
            e = model.encode_image(x)
            e = e / e.norm(dim=-1, keepdim=True)
    return len(paths) / (time.perf_counter() - t0)


def embed_job(engine, artifact: str, folder: Path, work: Path, fast: bool, workers: int
              ) -> tuple[float, float]:
    """(items/s excluding the fast-decode fidelity measurement, its seconds)."""
    from clipfast.embed import EmbedOptions, run_embed

    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    opts = EmbedOptions(artifact=artifact, sources=[str(folder)], out=str(out),
                        batch_size=32, workers=workers, fast_decode=fast, progress=False)
    t0 = time.perf_counter()
    s = run_embed(opts, engine=engine)
    dt = time.perf_counter() - t0
    fid = json.loads((out / "manifest.json").read_text()).get("fast_decode_fidelity") or {}
    extra = float(fid.get("seconds", 0.0))
    assert s.complete and s.failed == 0, s
    return s.items / (dt - extra), extra


def tower_only(engine, n: int) -> float:
    h, w = engine.preprocess_config.image_size
    x = np.random.default_rng(0).standard_normal((32, 3, h, w)).astype(np.float32)
    engine.run_image_tower(x)  # warm-up
    t0 = time.perf_counter()
    done = 0
    while done < n:
        engine.run_image_tower(x)
        done += 32
    return done / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n640", type=int, default=160)
    ap.add_argument("--n12mp", type=int, default=40)
    ap.add_argument("--data", default=None, help="folder for the generated JPEGs (kept)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "embed-bench"))
    args = ap.parse_args()

    import open_clip
    import torch

    import clipfast

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    data = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="embed-bench-"))
    folders = {"640px": (data / "640px", args.n640, (640, 480), 90),
               "12MP": (data / "12mp", args.n12mp, (4032, 3024), 92)}
    for name, (folder, n, size, q) in folders.items():
        if len(list(folder.glob("*.jpg"))) != n:
            shutil.rmtree(folder, ignore_errors=True)
            print(f"generating {n} {name} JPEGs in {folder}", file=sys.stderr)
            make_folder(folder, n, size, q, seed=len(name))
    work = Path(tempfile.mkdtemp(prefix="embed-bench-out-"))
    model, _, transform = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    model.eval()
    engines = {t: clipfast.Engine(args.artifact, backend="onnxruntime", threads=t,
                                  batch_size=32) for t in sorted({1, cores})}
    eng = engines[cores]
    results: dict[str, dict[str, list[float]]] = {k: {} for k in folders}
    fidelity_seconds: dict[str, list[float]] = {k: [] for k in folders}
    loads = []
    sweep = [] if args.no_sweep else [(w, t) for w in sorted({1, cores, cores + 1})
                                      for t in sorted({1, cores}) if (w, t) != (cores, cores)]

    def rec(folder: str, method: str, value: float) -> None:
        results[folder].setdefault(method, []).append(value)
        print(f"  {folder:6s} {method:34s} {value:7.2f} img/s", file=sys.stderr)

    for r in range(args.rounds):
        loads.append(uptime())
        print(f"round {r + 1}/{args.rounds}: {loads[-1]}", file=sys.stderr)
        for name, (folder, n, _, _) in folders.items():
            paths = sorted(str(p) for p in folder.glob("*.jpg"))
            rec(name, "naive open_clip loop", naive_loop(paths, model, transform, torch))
            rec(name, "clipfast embed", embed_job(eng, args.artifact, folder, work, False,
                                                  cores)[0])
            rate, extra = embed_job(eng, args.artifact, folder, work, True, cores)
            rec(name, "clipfast embed --fast-decode", rate)
            fidelity_seconds[name].append(extra)
            rec(name, "tower only (Engine.run_image_tower)", tower_only(eng, n))
            if r == 0:
                for w, t in sweep:
                    for fast in (False, True):
                        label = (f"sweep workers={w} threads={t}"
                                 + (" --fast-decode" if fast else ""))
                        rec(name, label, embed_job(engines[t], args.artifact, folder, work,
                                                   fast, w)[0])
    loads.append(uptime())

    fid_docs = {}
    for name, (folder, *_rest) in folders.items():
        from clipfast.embed.decode import ImagePolicy, measure_fast_decode

        paths = sorted(str(p) for p in folder.glob("*.jpg"))[:16]
        fid_docs[name] = measure_fast_decode(eng, paths, ImagePolicy.of(eng, fast=True))

    med = {f: {m: statistics.median(v) for m, v in ms.items()} for f, ms in results.items()}
    goals = {
        "12MP fast-decode / exact (goal >= 2)": med["12MP"]["clipfast embed --fast-decode"]
        / med["12MP"]["clipfast embed"],
        "12MP fast-decode / naive (goal >= 3)": med["12MP"]["clipfast embed --fast-decode"]
        / med["12MP"]["naive open_clip loop"],
        "640px embed / tower only (goal >= 0.9)": med["640px"]["clipfast embed"]
        / med["640px"]["tower only (Engine.run_image_tower)"],
        "640px embed / naive": med["640px"]["clipfast embed"]
        / med["640px"]["naive open_clip loop"],
    }
    doc = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "cpu": cpu_facts(),
        "artifact": {"path": args.artifact, "family": eng.manifest.spec.family,
                     "precision": eng.manifest.spec.precision,
                     "architecture": eng.manifest.spec.architecture
                     if hasattr(eng.manifest, "raw") else None},
        "versions": {"onnxruntime": __import__("onnxruntime").__version__,
                     "torch": torch.__version__, "open_clip": open_clip.__version__,
                     "pillow": Image.__version__},
        "images": {k: {"count": v[1], "size": list(v[2]), "jpeg_quality": v[3]}
                   for k, v in folders.items()},
        "rounds": args.rounds,
        "load": loads,
        "img_per_s": results,
        "median_img_per_s": med,
        "ratios": goals,
        "fast_decode_fidelity": fid_docs,
        "fast_decode_measure_seconds": fidelity_seconds,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "# clipfast embed benchmark", "",
        f"Command: `{doc['command']}`", "",
        f"CPU: {doc['cpu']['model']}, {doc['cpu']['cores']} cores, AVX-512 VNNI "
        f"{doc['cpu']['avx512_vnni']}, AVX2 {doc['cpu']['avx2']}. Artifact: ViT-B-32 "
        f"{eng.manifest.spec.precision} (random weights), ONNX Runtime CPU. "
        f"{args.rounds} interleaved rounds, medians in img/s.", "",
        "Load (`uptime`) before each round and at the end:", "",
        *[f"- `{x}`" for x in loads], "",
        "| method | " + " | ".join(folders) + " |",
        "|---|" + "---|" * len(folders),
    ]
    methods = list(results["640px"])
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(
            f"{med[f].get(m, float('nan')):.2f}" for f in folders) + " |")
    lines += ["", "| ratio | value |", "|---|---|",
              *[f"| {k} | {v:.2f} |" for k, v in goals.items()], "",
              "--fast-decode fidelity (16 images of each folder vs the exact path): ", ""]
    for k, v in fid_docs.items():
        lines.append(f"- {k}: pixel max {v.get('pixel_max_levels')} levels (mean "
                     f"{v.get('pixel_mean_abs_levels')}), centred relative error max "
                     f"{v.get('centred_rel_error_max', float('nan')):.4f} (mean "
                     f"{v.get('centred_rel_error_mean', float('nan')):.4f}), cosine min "
                     f"{v.get('cosine_min', float('nan')):.5f}")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
