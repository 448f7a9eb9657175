"""``clipfast serve`` against infinity-emb on the same weights, on loopback.

One random-weight transformers CLIP (ViT-B/32 shapes by default, built by the tests' own
builder ``tests/hf_models.save_clip``) is saved once; clipfast exports it (fp32, ONNX Runtime,
defaults) and infinity-emb loads the same directory (``--engine torch --device cpu``,
defaults otherwise). Both servers run at once on 127.0.0.1; clients (``serve_load``'s closed
loop: one item per request) drive texts and images (JPEG data URLs) at
concurrency 1, 8 and 32, the two servers interleaved in rounds so both see the same background
load. Texts come in three workloads: short captions (7-16 tokens, end tokens included), long
texts (past the 77-token context: each server cuts them to what it runs) and, on request
(``--kinds``), texts of 18-20 tokens, which infinity-emb's default cut at 20 leaves whole.
Reported per level: items/s of each, and the median over rounds of clipfast / infinity. The
offline ceiling of each (its engine at batch 32, no HTTP, JPEG decode included for images) is
measured in the same run; the host's ISA and the load average during the run are recorded.

After the timed rounds both servers get the same checks: short and long texts and one image
against the source transformers model in fp32 (centred relative error, cosine; for long texts,
the token count that reproduces each server's answer), and bad images (a request with one good
and one undecodable image, a truncated JPEG), then whether the server still answers.

infinity-emb lives in its own virtual environment (its pins clash with clipfast's): pass its
Python with ``--infinity-python`` (or ``$INFINITY_PYTHON``). Without it the script says so and
exits 0 having measured nothing.

    python -m venv /tmp/venv-inf
    /tmp/venv-inf/bin/pip install "infinity-emb[all]==0.0.78" aiohttp  # images need aiohttp
    python benchmarks/serve_peer.py --infinity-python /tmp/venv-inf/bin/python \\
        --rounds 3 --seconds 5 --out benchmarks/results/serve-peer-vit-b-32
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
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
KINDS = ("texts", "long_texts", "images", "mid_texts")
DEFAULT_KINDS = ("texts", "long_texts", "images")
# infinity-emb reports usage to a remote service unless told not to; the machine is offline.
INFINITY_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}

# Offline ceiling of infinity: its own engine at batch 32, run by its own Python. Images go in
# as JPEG bytes so that decoding is timed, as it is for clipfast's ``encode_images``.
_INFINITY_OFFLINE = r"""
import asyncio, base64, json, sys, time
from infinity_emb import AsyncEmbeddingEngine, EngineArgs
model, kind, n, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
items = json.load(sys.stdin)
async def main():
    engine = AsyncEmbeddingEngine.from_args(EngineArgs(model_name_or_path=model, engine="torch",
                                                       device="cpu"))
    async with engine:
        batch = [items[i % len(items)] for i in range(n)]
        if kind == "images":
            batch = [base64.b64decode(b) for b in batch]
            call = lambda: engine.image_embed(images=batch)
        else:
            call = lambda: engine.embed(sentences=batch)
        await call()
        rates, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end or len(rates) < 2:
            t0 = time.perf_counter()
            await call()
            rates.append(n / (time.perf_counter() - t0))
        rates.sort()
        print(json.dumps({"items_per_s": rates[len(rates) // 2]}))
asyncio.run(main())
"""


def make_mid_texts(n: int) -> list[str]:
    """Texts of 16-18 words (18-20 tokens with the end tokens): the longest that infinity-emb's
    default cut at 20 tokens leaves whole, so both servers do the same work."""
    words = ("cat dog car tree house river mountain city street beach bird flower person "
             "bicycle boat train table chair window sky cloud night morning red blue").split()
    rng = random.Random(2)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(16, 18))) for _ in range(n)]


def make_long_texts(n: int) -> list[str]:
    """Texts of 80-100 words: past the 77-token context, so every server runs its cap."""
    words = ("the a cat dog sits on near under small large red blue green old new car tree "
             "house river mountain city street beach bird flower person bicycle boat train "
             "table chair window sky cloud night morning with and").split()
    rng = random.Random(1)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(80, 100))) for _ in range(n)]


class LoadSampler:
    """The 1-minute load average every few seconds while the run lasts."""

    def __init__(self, every: float = 5.0):
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(round(os.getloadavg()[0], 2))
            self._stop.wait(self.every)

    def __enter__(self) -> LoadSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    def summary(self) -> dict[str, Any]:
        s = self.samples or [float("nan")]
        return {"min": min(s), "median": float(np.median(s)), "max": max(s),
                "samples": len(self.samples)}


def infinity_python(given: str | None) -> tuple[str | None, str]:
    """The infinity venv's Python and its version, or (None, why not)."""
    python = given or os.environ.get("INFINITY_PYTHON")
    if not python:
        return None, "no --infinity-python given and $INFINITY_PYTHON unset"
    try:
        out = subprocess.run([python, "-c", "import infinity_emb; print(infinity_emb.__version__)"],
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, **INFINITY_ENV})
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{python}: {e}"
    if out.returncode != 0:
        return None, f"{python} cannot import infinity_emb: {out.stderr.strip()[-300:]}"
    return python, out.stdout.strip()


def start_infinity(python: str, model_dir: Path, log: Path) -> tuple[subprocess.Popen, str,
                                                                      list[str]]:
    """``infinity_emb v2`` on a free loopback port; its log goes to ``log`` (a pipe nobody
    reads would fill and stall it)."""
    import httpx

    port = free_port()
    cmd = [python, "-m", "infinity_emb.cli", "v2", "--model-id", str(model_dir),
           "--served-model-name", MODEL_NAME, "--engine", "torch", "--device", "cpu",
           "--host", "127.0.0.1", "--port", str(port), "--url-prefix", "/v1",
           "--log-level", "warning"]
    logf = open(log, "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **INFINITY_ENV})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"infinity exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            # /health stays at the root whatever --url-prefix says
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, cmd
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"infinity not ready after 300 s: {log.read_text()[-2000:]}")


def offline_clipfast(artifact: Path, items: dict[str, list], seconds: float
                     ) -> dict[str, float]:
    import clipfast

    engine = clipfast.Engine(artifact, backend="onnxruntime", batch_size=32)
    out = {}
    for kind in items:
        fn = engine.encode_images if kind == "images" else engine.encode_texts
        batch = [items[kind][i % len(items[kind])] for i in range(32)]
        fn(batch)
        rates, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end or len(rates) < 2:
            t0 = time.perf_counter()
            fn(batch)
            rates.append(len(batch) / (time.perf_counter() - t0))
        out[kind] = round(float(np.median(rates)), 2)
    return out


def offline_infinity(python: str, model_dir: Path, items: dict[str, list], seconds: float
                     ) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in items:
        send = items[kind]
        if kind == "images":
            send = [base64.b64encode(b).decode() for b in send]
        r = subprocess.run([python, "-c", _INFINITY_OFFLINE, str(model_dir), kind, "32",
                            str(seconds)], input=json.dumps(send), capture_output=True,
                           text=True, timeout=900, env={**os.environ, **INFINITY_ENV})
        try:
            out[kind] = round(json.loads(r.stdout.strip().splitlines()[-1])["items_per_s"], 2)
        except (IndexError, KeyError, ValueError):
            out[kind] = None
            out[f"{kind}_error"] = r.stderr.strip()[-500:]
    return out


# -- checks after the timed rounds ------------------------------------------------------------
def _post(url: str, body: dict, timeout: float = 120) -> tuple[int, Any]:
    import httpx

    try:
        r = httpx.post(url + "/v1/embeddings", json=body, timeout=timeout)
    except httpx.HTTPError as e:
        return -1, f"{type(e).__name__}: {e}"
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, r.text[:300]


def _answer(answer: Any) -> dict[str, Any]:
    """What came back for a mixed request: how many embeddings, and the rest of the body."""
    if isinstance(answer, dict) and isinstance(answer.get("data"), list):
        rest = {k: v for k, v in answer.items() if k not in ("data", "object")}
        return {"embeddings": len(answer["data"]),
                "indexes": [d.get("index") for d in answer["data"]], "rest": str(rest)[:300]}
    return {"answer": str(answer)[:300]}


def _vectors(answer: Any) -> np.ndarray | None:
    try:
        return np.asarray([d["embedding"] for d in answer["data"]], dtype=np.float64)
    except (TypeError, KeyError, ValueError):
        return None


class Reference:
    """The source transformers CLIP in fp32: what both servers should return."""

    def __init__(self, model_dir: Path):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        self.torch = torch
        self.model = CLIPModel.from_pretrained(model_dir).eval()
        self.proc = CLIPProcessor.from_pretrained(model_dir)
        self.cut_cache: dict[str, np.ndarray] = {}  # text -> its embeddings cut at 2..77 tokens

    def text_ids(self, texts: list[str], cap: int = 77) -> list[list[int]]:
        return self.proc.tokenizer(texts, truncation=True, max_length=cap)["input_ids"]

    def texts_from_ids(self, ids: list[list[int]]) -> np.ndarray:
        torch = self.torch
        out = []
        with torch.no_grad():
            for row in ids:  # one by one: no padding, whatever the pooling
                t = torch.tensor([row])
                f = self.model.get_text_features(input_ids=t, attention_mask=torch.ones_like(t))
                out.append(getattr(f, "pooler_output", f)[0].numpy())
        return np.asarray(out, dtype=np.float64)

    def images(self, jpegs: list[bytes]) -> np.ndarray:
        import io

        from PIL import Image

        ims = [Image.open(io.BytesIO(b)).convert("RGB") for b in jpegs]
        with self.torch.no_grad():
            px = self.proc.image_processor(images=ims, return_tensors="pt")["pixel_values"]
            f = self.model.get_image_features(pixel_values=px)
        return getattr(f, "pooler_output", f).numpy().astype(np.float64)


def _compare(got: np.ndarray | None, ref: np.ndarray) -> dict[str, Any]:
    from clipfast.artifact.fidelity import centred_relative_error, cosine, l2_normalize

    if got is None or got.shape != ref.shape:
        return {"error": "no embeddings" if got is None else f"shape {got.shape}"}
    got, ref = l2_normalize(got), l2_normalize(ref)
    return {"centred_error_max": float(centred_relative_error(got, ref).max()),
            "cosine_min": float(cosine(got, ref).min())}


def _tokens_run(got: np.ndarray, ref: Reference, text: str, cap: int) -> int:
    """How many tokens (end token included) reproduce ``got`` best: the length a server cut
    the text to."""
    from clipfast.artifact.fidelity import cosine

    if text not in ref.cut_cache:
        full = ref.text_ids([text], cap)[0]
        ref.cut_cache[text] = ref.texts_from_ids(
            [full[:n - 1] + [full[-1]] for n in range(2, len(full) + 1)])
    embs = ref.cut_cache[text]
    cos = cosine(np.repeat(got[None], len(embs), 0), embs)
    return int(np.argmax(cos)) + 2


def checks(servers: dict[str, str], ref: Reference, texts: list[str], long_texts: list[str],
           jpegs: list[bytes]) -> dict[str, Any]:
    """Fidelity against the source model, then bad images, on each server in turn."""
    short, long_ = texts[:4], long_texts[:4]
    ref_short = ref.texts_from_ids(ref.text_ids(short))
    ref_long = ref.texts_from_ids(ref.text_ids(long_))
    ref_img = ref.images(jpegs[:2])
    out: dict[str, Any] = {"long_text_tokens_source": [len(x) for x in ref.text_ids(long_)]}
    good = data_url(jpegs[0])
    not_image = "data:image/jpeg;base64," + base64.b64encode(b"not an image at all").decode()
    truncated = data_url(jpegs[1][: len(jpegs[1]) // 2])
    for name, url in servers.items():
        res: dict[str, Any] = {}
        code, ans = _post(url, {"model": MODEL_NAME, "input": short})
        res["short_texts"] = {"status": code, **_compare(_vectors(ans), ref_short)}
        code, ans = _post(url, {"model": MODEL_NAME, "input": long_})
        got = _vectors(ans)
        res["long_texts"] = {"status": code, **_compare(got, ref_long)}
        if got is not None and len(got) == len(long_):
            res["long_texts"]["tokens_run"] = [_tokens_run(g, ref, t, 77)
                                               for g, t in zip(got, long_)]
        code, ans = _post(url, {"model": MODEL_NAME, "modality": "image",
                                "input": [data_url(b) for b in jpegs[:2]]})
        res["images"] = {"status": code, **_compare(_vectors(ans), ref_img)}
        code, ans = _post(url, {"model": MODEL_NAME, "modality": "image",
                                "input": [good, not_image]}, timeout=60)
        res["good_plus_undecodable"] = {"status": code, **_answer(ans)}
        # Short timeouts from here: a server whose engine stopped on the truncated JPEG would
        # hold every later request.
        code, ans = _post(url, {"model": MODEL_NAME, "modality": "image",
                                "input": [truncated]}, timeout=20)
        res["truncated_jpeg"] = {"status": code, "answer": str(ans)[:300]}
        code, ans = _post(url, {"model": MODEL_NAME, "modality": "image", "input": [good]},
                          timeout=20)
        res["good_image_after"] = {"status": code, "answer": str(ans)[:120]}
        code, ans = _post(url, {"model": MODEL_NAME, "input": short[:1]}, timeout=20)
        res["text_after"] = {"status": code, "answer": str(ans)[:120]}
        import httpx

        for route in ("/health", "/ready"):
            try:
                res[f"GET {route}"] = httpx.get(url + route, timeout=10).status_code
            except httpx.HTTPError as e:
                res[f"GET {route}"] = f"{type(e).__name__}"
        out[name] = res
    return out


def ratios_of(rows: list[dict[str, Any]], rounds: int, kinds: list[str]
              ) -> list[dict[str, Any]]:
    out = []
    for kind in kinds:
        for c in LEVELS:
            per_round, med = [], {}
            for r in range(rounds):
                got = {x["server"]: x["items_per_s"] for x in rows
                       if (x["round"], x["kind"], x["concurrency"]) == (r, kind, c)}
                if got.get("infinity") and "clipfast" in got:
                    per_round.append(got["clipfast"] / got["infinity"])
            for server in ("clipfast", "infinity"):
                sel = [x for x in rows if (x["server"], x["kind"], x["concurrency"])
                       == (server, kind, c)]
                med[server] = {f: float(np.median([x[f] for x in sel])) if sel else None
                               for f in ("items_per_s", "p50_ms", "p99_ms")}
            out.append({"kind": kind, "concurrency": c, "per_round": per_round,
                        "median_ratio": float(np.median(per_round)) if per_round else None,
                        "medians": med})
    return out


def goals(ratios: list[dict[str, Any]], offline: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets: short captions >= 1.5x at every level, long texts >= 1.0x, images >= 1.2x,
    clipfast at c=32 >= 90% of its own offline rate."""
    want = {"texts": 1.5, "long_texts": 1.0, "mid_texts": 1.0, "images": 1.2}
    out = []
    for x in ratios:
        if x["median_ratio"] is not None:
            out.append({"goal": f"{x['kind']} c={x['concurrency']} clipfast/infinity >= "
                                f"{want[x['kind']]}", "value": round(x["median_ratio"], 2),
                        "met": x["median_ratio"] >= want[x["kind"]]})
    for x in ratios:
        base = offline["clipfast"].get(x["kind"])
        served = x["medians"]["clipfast"]["items_per_s"]
        if x["concurrency"] == 32 and base and served:
            out.append({"goal": f"{x['kind']} c=32 clipfast >= 90% of its offline rate",
                        "value": round(served / base, 2), "met": served / base >= 0.9})
    return out


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [f"# clipfast serve vs infinity-emb {doc['infinity_emb']} ({doc['size']})", "",
             f"Command: `{doc['command']}`", "",
             f"CPU: {m.get('cpu')}, ISA level {m.get('isa')}, {m.get('cores')} cores. "
             f"Load average (1 min) during the run: min {doc['load']['min']}, median "
             f"{doc['load']['median']}, max {doc['load']['max']}; before: "
             f"`{doc['uptime_before']}`.", "",
             "Servers: " + "; ".join(f"{k}: `{' '.join(v[2:])}`"
                                     for k, v in doc["servers"].items()), "",
             "One item per request, closed loop, servers interleaved in each round; "
             "ratio = median over rounds of the per-round clipfast / infinity items/s.", "",
             "| workload | concurrency | clipfast / infinity | per round | clipfast items/s | "
             "infinity items/s | clipfast p50 ms | infinity p50 ms |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for x in doc["ratios"]:
        med = "-" if x["median_ratio"] is None else f"{x['median_ratio']:.2f}x"
        a, b = x["medians"]["clipfast"], x["medians"]["infinity"]
        lines.append(f"| {x['kind']} | {x['concurrency']} | {med} | "
                     f"{', '.join(f'{v:.2f}' for v in x['per_round'])} | "
                     f"{a['items_per_s']:.1f} | {b['items_per_s']:.1f} | {a['p50_ms']:.0f} | "
                     f"{b['p50_ms']:.0f} |")
    off = doc["offline"]
    lines += ["", "Offline, batch 32 (engine only, no HTTP; images include JPEG decode), items/s:",
              "", "| workload | clipfast | infinity | ratio |", "|---|---:|---:|---:|"]
    for kind in doc["kinds"]:
        a, b = off["clipfast"].get(kind), off["infinity"].get(kind)
        lines.append(f"| {kind} | {a} | {b} | {f'{a / b:.2f}x' if a and b else '-'} |")
    lines += ["", "| goal | value | met |", "|---|---:|---|"]
    lines += [f"| {g['goal']} | {g['value']} | {'yes' if g['met'] else 'NO'} |"
              for g in doc["goals"]]
    if doc["checks"]:
        lines += ["", "Checks after the timed rounds (source transformers model, fp32):", "",
                  "```json", json.dumps(doc["checks"], indent=1), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--infinity-python", default=None)
    p.add_argument("--size", default="vit-b-32", help="hf_models.save_clip size")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0, help="per level, server and round")
    p.add_argument("--work", default=None,
                   help="folder to keep the model and artifact in (reused when present)")
    p.add_argument("--kinds", default=",".join(DEFAULT_KINDS),
                   help=f"workloads, comma-separated, of {', '.join(KINDS)}")
    p.add_argument("--skip-checks", action="store_true",
                   help="no fidelity and bad-image checks after the timed rounds")
    p.add_argument("--out", default=None, help="results path without suffix (.json and .md)")
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or set(kinds) - set(KINDS):
        p.error(f"--kinds: expected some of {', '.join(KINDS)}, got {args.kinds!r}")
    python, version = infinity_python(args.infinity_python)
    if python is None:
        print(f"serve_peer: skipped, infinity-emb is not available ({version})")
        return 0
    import hf_models

    from clipfast.export.pipeline import ExportOptions, run_export

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="serve-peer-"))
    src, art = work / f"src-{args.size}", work / f"art-{args.size}"
    if not (src / "config.json").exists():
        hf_models.save_clip(src, size=args.size)
    if (art / "manifest.json").exists():
        artifact = art
    else:
        artifact = run_export(ExportOptions(model=f"transformers:{src}", pretrained=None,
                                            out=art, progress=False))
    texts = make_texts(256)
    long_texts = make_long_texts(64)
    jpegs = make_images()
    images = [data_url(b) for b in jpegs]
    mid_texts = make_mid_texts(64)
    per_kind = {"texts": texts, "long_texts": long_texts, "mid_texts": mid_texts}
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    ours, url_ours, cmd_ours = start_server(str(artifact), ["--model-name", MODEL_NAME])
    theirs = url_theirs = cmd_theirs = None
    rows: list[dict[str, Any]] = []
    with LoadSampler() as load:
        try:
            theirs, url_theirs, cmd_theirs = start_infinity(python, src, work / "infinity.log")
            for r in range(args.rounds):
                for kind in kinds:
                    for c in LEVELS:
                        order = [("clipfast", url_ours), ("infinity", url_theirs)]
                        if (r + c) % 2:
                            order.reverse()
                        for name, url in order:
                            res = asyncio.run(closed_loop(
                                url, "images" if kind == "images" else "texts", c, 100_000,
                                args.seconds, per_kind.get(kind, texts), images))
                            rows.append({"round": r, "server": name, "kind": kind,
                                         "concurrency": c, "load1": os.getloadavg()[0], **res})
                            print(f"round {r} {kind:10s} c={c:2d} {name:8s} "
                                  f"{res['items_per_s']:8.2f} items/s p50 {res['p50_ms']} ms "
                                  f"statuses {res['statuses']}", flush=True)
            check: dict[str, Any] = {}
            if not args.skip_checks:
                check = checks({"clipfast": url_ours, "infinity": url_theirs}, Reference(src),
                               texts, long_texts, jpegs)
        finally:
            stop_server(ours)
            if theirs is not None:
                theirs.terminate()
                try:
                    theirs.wait(20)
                except subprocess.TimeoutExpired:  # its engine may have stopped (checks)
                    theirs.kill()
                    theirs.wait()
        items = {k: {"images": jpegs, **per_kind}[k] for k in kinds}
        offline = {"clipfast": offline_clipfast(artifact, items, args.seconds),
                   "infinity": offline_infinity(python, src, items, args.seconds)}
    ratios = ratios_of(rows, args.rounds, kinds)
    doc = {"benchmark": "serve_peer", "infinity_emb": version, "size": args.size, "kinds": kinds,
           "machine": machine(), "uptime_before": uptime_before, "load": load.summary(),
           "load_samples": load.samples,
           "command": "python benchmarks/serve_peer.py " + " ".join(argv or sys.argv[1:]),
           "servers": {"clipfast": cmd_ours, "infinity": cmd_theirs}, "rows": rows,
           "ratios": ratios, "offline": offline, "checks": check}
    doc["goals"] = goals(ratios, offline)
    for x in ratios:
        print(f"{x['kind']:10s} c={x['concurrency']:2d}: clipfast / infinity "
              f"{x['median_ratio'] if x['median_ratio'] is None else round(x['median_ratio'], 2)}"
              f" (rounds {[round(v, 2) for v in x['per_round']]})")
    print(f"offline batch 32 items/s: {offline}")
    for g in doc["goals"]:
        print(f"goal {g['goal']}: {g['value']} {'met' if g['met'] else 'MISSED'}")
    print(json.dumps(check, indent=1))
    print(f"load average during the run: {doc['load']}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
