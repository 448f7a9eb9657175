"""``clipfast serve`` against infinity-emb on the same weights, on loopback.

One random-weight transformers CLIP (ViT-B/32 shapes by default, built by the tests' own
builder ``tests/hf_models.save_clip``) is saved once; clipfast exports it (fp32, ONNX Runtime,
defaults) and infinity-emb loads the same directory (``--engine torch --device cpu``,
defaults otherwise). Both servers run at once on 127.0.0.1; clients (``serve_load``'s closed
loop: one item per request) drive texts (short captions) and images (JPEG data URLs) at
concurrency 1, 8 and 32, the two servers interleaved in rounds so both see the same background
load. Reported per level: items/s of each, and the median over rounds of clipfast / infinity.
The offline ceiling of each (its engine at batch 32, no HTTP) is measured in the same run.

infinity-emb lives in its own virtual environment (its pins clash with clipfast's): pass its
Python with ``--infinity-python`` (or ``$INFINITY_PYTHON``). Without it the script says so and
exits 0 having measured nothing.

    python -m venv /tmp/venv-inf && /tmp/venv-inf/bin/pip install "infinity-emb[all]==0.0.78"
    python benchmarks/serve_peer.py --infinity-python /tmp/venv-inf/bin/python \\
        --out benchmarks/results/serve-peer
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from serve_load import (  # noqa: E402
    closed_loop,
    data_url,
    free_port,
    machine,
    make_images,
    make_texts,
    start_server,
    stop_server,
)

MODEL_NAME = "bench"  # the name both servers answer to (``payload`` sends it)
LEVELS = (1, 8, 32)

# Offline ceiling of infinity: its own engine at batch 32, run by its own Python.
_INFINITY_OFFLINE = r"""
import asyncio, base64, io, json, sys, time
from infinity_emb import AsyncEmbeddingEngine, EngineArgs
from PIL import Image
model, kind, n, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
items = json.load(sys.stdin)
async def main():
    engine = AsyncEmbeddingEngine.from_args(EngineArgs(model_name_or_path=model, engine="torch",
                                                       device="cpu"))
    async with engine:
        call = engine.embed if kind == "texts" else engine.image_embed
        key = "sentences" if kind == "texts" else "images"
        batch = [items[i % len(items)] for i in range(n)]
        if kind != "texts":
            batch = [Image.open(io.BytesIO(base64.b64decode(b))) for b in batch]
        await call(**{key: batch})
        rates, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            await call(**{key: batch})
            rates.append(n / (time.perf_counter() - t0))
        rates.sort()
        print(json.dumps({"items_per_s": rates[len(rates) // 2]}))
asyncio.run(main())
"""


def infinity_python(given: str | None) -> tuple[str | None, str]:
    """The infinity venv's Python and its version, or (None, why not)."""
    python = given or os.environ.get("INFINITY_PYTHON")
    if not python:
        return None, "no --infinity-python given and $INFINITY_PYTHON unset"
    try:
        out = subprocess.run([python, "-c", "import infinity_emb; print(infinity_emb.__version__)"],
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{python}: {e}"
    if out.returncode != 0:
        return None, f"{python} cannot import infinity_emb: {out.stderr.strip()[-300:]}"
    return python, out.stdout.strip()


def start_infinity(python: str, model_dir: Path) -> tuple[subprocess.Popen, str, list[str]]:
    import httpx

    port = free_port()
    cmd = [python, "-m", "infinity_emb.cli", "v2", "--model-id", str(model_dir),
           "--served-model-name", MODEL_NAME, "--engine", "torch", "--device", "cpu",
           "--host", "127.0.0.1", "--port", str(port), "--url-prefix", "/v1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"infinity exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/v1/health", timeout=2).status_code == 200:
                return proc, url, cmd
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("infinity not ready after 300 s")


def offline_clipfast(artifact: Path, texts: list[str], images: list[bytes], seconds: float
                     ) -> dict[str, float]:
    import clipfast

    engine = clipfast.Engine(artifact, backend="onnxruntime", batch_size=32)
    out = {}
    for kind, fn, items in (("texts", engine.encode_texts, texts[:32]),
                            ("images", engine.encode_images,
                             [images[i % len(images)] for i in range(32)])):
        fn(items)
        rates, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            fn(items)
            rates.append(len(items) / (time.perf_counter() - t0))
        out[kind] = float(np.median(rates))
    return out


def offline_infinity(python: str, model_dir: Path, texts: list[str], images: list[bytes],
                     seconds: float) -> dict[str, Any]:
    import base64

    out: dict[str, Any] = {}
    for kind, items in (("texts", texts), ("images",
                                           [base64.b64encode(b).decode() for b in images])):
        r = subprocess.run([python, "-c", _INFINITY_OFFLINE, str(model_dir), kind, "32",
                            str(seconds)], input=json.dumps(items), capture_output=True,
                           text=True, timeout=900)
        try:
            out[kind] = json.loads(r.stdout.strip().splitlines()[-1])["items_per_s"]
        except (IndexError, KeyError, ValueError):
            out[kind] = None
            out[f"{kind}_error"] = r.stderr.strip()[-500:]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--infinity-python", default=None)
    p.add_argument("--size", default="vit-b-32", help="hf_models.save_clip size")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=8.0, help="per level, server and round")
    p.add_argument("--out", default=None, help="results path without suffix (.json and .md)")
    args = p.parse_args(argv)
    python, version = infinity_python(args.infinity_python)
    if python is None:
        print(f"serve_peer: skipped, infinity-emb is not available ({version})")
        return 0
    import hf_models

    from clipfast.export.pipeline import ExportOptions, run_export

    work = Path(tempfile.mkdtemp(prefix="serve-peer-"))
    src = hf_models.save_clip(work / "src", size=args.size)
    artifact = run_export(ExportOptions(model=f"transformers:{src}", pretrained=None,
                                        out=work / "art", progress=False))
    texts = make_texts(256)
    jpegs = make_images()
    images = [data_url(b) for b in jpegs]
    ours, url_ours, cmd_ours = start_server(str(artifact), [])
    theirs = url_theirs = cmd_theirs = None
    rows: list[dict[str, Any]] = []
    try:
        theirs, url_theirs, cmd_theirs = start_infinity(python, src)
        for r in range(args.rounds):
            for kind in ("texts", "images"):
                for c in LEVELS:
                    order = [("clipfast", url_ours), ("infinity", url_theirs)]
                    if r % 2:
                        order.reverse()
                    for name, url in order:
                        res = asyncio.run(closed_loop(url, kind, c, 100_000, args.seconds,
                                                      texts, images))
                        rows.append({"round": r, "server": name, "kind": kind,
                                     "concurrency": c, **res})
                        print(f"round {r} {kind:6s} c={c:2d} {name:8s} "
                              f"{res['items_per_s']:8.2f} items/s p50 {res['p50_ms']} ms "
                              f"statuses {res['statuses']}")
    finally:
        stop_server(ours)
        if theirs is not None:
            stop_server(theirs)
    offline = {"clipfast": offline_clipfast(artifact, texts, jpegs, args.seconds),
               "infinity": offline_infinity(python, src, texts, jpegs, args.seconds)}
    ratios = []
    for kind in ("texts", "images"):
        for c in LEVELS:
            per_round = []
            for r in range(args.rounds):
                got = {x["server"]: x["items_per_s"] for x in rows
                       if (x["round"], x["kind"], x["concurrency"]) == (r, kind, c)}
                if got.get("infinity"):
                    per_round.append(got["clipfast"] / got["infinity"])
            ratios.append({"kind": kind, "concurrency": c, "per_round": per_round,
                           "median_ratio": float(np.median(per_round)) if per_round else None})
    doc = {"benchmark": "serve_peer", "infinity_emb": version, "machine": machine(),
           "command": "python benchmarks/serve_peer.py " + " ".join(argv or sys.argv[1:]),
           "clipfast_server": cmd_ours, "infinity_server": cmd_theirs, "rows": rows,
           "ratios": ratios, "offline": offline}
    for x in ratios:
        print(f"{x['kind']:6s} c={x['concurrency']:2d}: clipfast / infinity "
              f"{x['median_ratio'] if x['median_ratio'] is None else round(x['median_ratio'], 2)}"
              f" (rounds {[round(v, 2) for v in x['per_round']]})")
    print(f"offline batch 32 items/s: {offline}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
        lines = [f"# clipfast serve vs infinity-emb {version}", "", f"Command: `{doc['command']}`",
                 "", "| modality | concurrency | clipfast / infinity (median of rounds) | "
                 "per round |", "|---|---:|---:|---|"]
        for x in ratios:
            med = "-" if x["median_ratio"] is None else f"{x['median_ratio']:.2f}x"
            lines.append(f"| {x['kind']} | {x['concurrency']} | {med} | "
                         f"{', '.join(f'{v:.2f}' for v in x['per_round'])} |")
        lines += ["", f"Offline, batch 32, items/s: {json.dumps(offline)}"]
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
