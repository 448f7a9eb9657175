"""Same-run A/B of the Engine, ``clipfast embed`` and the text path: this checkout against a
reference checkout, for refactors that must not cost speed.

    git worktree add --detach /tmp/ref REV && python -m venv --system-site-packages /tmp/ref-venv
    (cd /tmp/ref && /tmp/ref-venv/bin/pip install --no-deps -e .)
    python benchmarks/engine_ab.py ARTIFACT --reference-python /tmp/ref-venv/bin/python

Each round runs one child process per side, alternating which goes first, so both see the same
machine load; every child loads the Engine (ONNX Runtime, batch 32) and times
``encode_images`` on the bundled photos (cycled to ``--images``, given as paths), ``encode_texts``
on short captions, and one ``run_embed`` job over a folder of those photos. Prints per-round
rates, the medians and this/reference ratios, with the host's ISA. Speed is never asserted: the
ratios are read by a person, and a run on a loaded machine says so in its load averages.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PHOTOS = sorted((HERE.parent / "examples" / "images").glob("*.jpg"))
CAPTIONS = ["a photo of a cat", "two dogs playing in the snow", "a red car parked on a street",
            "an aerial view of a city at night", "a bowl of fruit on a wooden table"]


def child(artifact: str, n_images: int, n_texts: int) -> dict:
    """One side's measurement, in this process (the side is whichever clipfast imports)."""
    import clipfast
    from clipfast.embed import EmbedOptions, run_embed

    eng = clipfast.Engine(artifact, backend="onnxruntime", batch_size=32)
    images = [str(PHOTOS[i % len(PHOTOS)]) for i in range(n_images)]
    texts = [CAPTIONS[i % len(CAPTIONS)] + f" {i}" for i in range(n_texts)]
    eng.encode_images(images[:32])  # warm-up: sessions, thread pools, page cache
    eng.encode_texts(texts[:32])
    out: dict = {"code": clipfast.__file__}
    t = time.perf_counter()
    eng.encode_images(images)
    out["images_per_s"] = n_images / (time.perf_counter() - t)
    t = time.perf_counter()
    eng.encode_texts(texts)
    out["texts_per_s"] = n_texts / (time.perf_counter() - t)
    root = Path(tempfile.mkdtemp(prefix="engine-ab-"))
    try:
        src = root / "src"
        src.mkdir()
        for i, p in enumerate(images):
            os.symlink(p, src / f"{i:05d}.jpg")
        t = time.perf_counter()
        s = run_embed(EmbedOptions(artifact=artifact, sources=[str(src)], out=str(root / "o"),
                                   progress=False), engine=eng)
        out["embed_per_s"] = s.items / (time.perf_counter() - t)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def isa() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    names = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
    return " ".join(n for n in names if n in flags) or "no avx2"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--reference-python", required=True,
                    help="the Python of a checkout of the reference revision (its venv)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--texts", type=int, default=512)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.artifact, args.images, args.texts)))
        return 0
    sides = {"this": sys.executable, "reference": args.reference_python}
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for side in order:
            # the child runs from outside the checkout, so each side imports its own clipfast
            res = subprocess.run([sides[side], str(Path(__file__).resolve()), args.artifact,
                                  "--reference-python", args.reference_python, "--child",
                                  "--images", str(args.images), "--texts", str(args.texts)],
                                 capture_output=True, text=True, check=True, cwd="/")
            runs[side].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(side, runs[side][-1], file=sys.stderr)
    report = {"isa": isa(), "load_average": os.getloadavg(), "rounds": args.rounds,
              "code": {k: v[0]["code"] for k, v in runs.items()}}
    for metric in ("images_per_s", "texts_per_s", "embed_per_s"):
        med = {k: statistics.median(x[metric] for x in v) for k, v in runs.items()}
        report[metric] = {"this": round(med["this"], 2), "reference": round(med["reference"], 2),
                          "ratio": round(med["this"] / med["reference"], 3)}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
