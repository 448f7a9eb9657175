"""Load benchmark of ``clipfast serve`` on loopback: throughput and p50/p99 latency at several
client concurrencies, for texts and images, batched against an unbatched baseline
(``--max-batch 1``: one request, one forward pass), beside the offline Engine batch rate
measured in the same run; then p99/p50 at half the best throughput (open loop) and an
overload at 4x it (open loop: status counts, server memory).

Every level is bounded in requests and seconds. Clients are asyncio + httpx in this process,
on the same machine: they take CPU from the server, as any loopback test does.

    python benchmarks/serve_load.py --artifact /tmp/serve-vitb32 \
        --out benchmarks/results/serve-load-vit-b-32

writes ``OUT.json`` (every figure, the machine, the command) and ``OUT.md`` (tables).

``--reference-root DIR`` adds a "reference" server: the same batched settings, run from another
checkout (e.g. ``git worktree add /tmp/serve-old main``), measured interleaved with this one at
every level; the goals then include this code's throughput over the reference's, level by level
(median of the per-round ratios).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# -- payloads ---------------------------------------------------------------------------------
def make_texts(n: int) -> list[str]:
    words = ("cat dog car tree house river mountain city street beach bird flower person "
             "bicycle boat train table chair window sky cloud night morning red blue green "
             "small large old new happy").split()
    rng = random.Random(0)
    return [f"a photo of {' '.join(rng.choice(words) for _ in range(rng.randint(2, 12)))}"
            for _ in range(n)]


def make_images() -> list[bytes]:
    """JPEGs of the scikit-image photos (about 300x450 to 512x512), as a client would send."""
    from PIL import Image
    from skimage import data

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera", "cat"):
        arr = getattr(data, name)()
        buf = io.BytesIO()
        Image.fromarray(arr).convert("RGB").save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def data_url(b: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(b).decode()


# -- the server -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(artifact: str, args: list[str], root: str | None = None
                 ) -> tuple[subprocess.Popen, str, list[str]]:
    """``clipfast serve`` on a free loopback port (from the checkout ``root`` when given)."""
    import os

    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "clipfast.cli", "serve", artifact, "--port", str(port),
           "--log-level", "warning", *args]
    env = None
    if root is not None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(Path(root).resolve()), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    # From the other checkout's directory: ``python -m`` puts the working directory first on
    # the path, ahead of PYTHONPATH.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=root)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url, cmd
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server not ready after 180 s")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return -9


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RssSampler:
    def __init__(self, pid: int, every: float = 0.2):
        self.pid, self.every, self.samples = pid, every, []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            v = rss_mb(self.pid)
            if v is not None:
                self.samples.append(v)
            self._stop.wait(self.every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


# -- clients ----------------------------------------------------------------------------------
def payload(kind: str, i: int, texts: list[str], images: list[str], items: int) -> dict:
    if kind == "texts":
        inp = [texts[(i * items + k) % len(texts)] for k in range(items)]
        return {"model": "bench", "input": inp, "encoding_format": "base64"}
    inp = [images[(i * items + k) % len(images)] for k in range(items)]
    return {"model": "bench", "input": inp, "modality": "image", "encoding_format": "base64"}


def summarise(lat: list[float], statuses: dict[int, int], elapsed: float, items: int,
              retry_after: int) -> dict[str, Any]:
    ok = statuses.get(200, 0)
    arr = np.asarray(lat) if lat else np.asarray([np.nan])
    return {"requests": sum(statuses.values()), "ok": ok, "statuses": statuses,
            "seconds": round(elapsed, 3), "items_per_s": round(ok * items / elapsed, 2),
            "p50_ms": round(float(np.percentile(arr, 50)) * 1e3, 1),
            "p99_ms": round(float(np.percentile(arr, 99)) * 1e3, 1),
            "503_with_retry_after": retry_after}


async def _one(client, url, body, lat, statuses, counters) -> None:
    t0 = time.perf_counter()
    try:
        r = await client.post(url + "/v1/embeddings", json=body)
        code = r.status_code
        if code == 503 and r.headers.get("retry-after"):
            counters["retry_after"] += 1
    except Exception:
        code = -1  # connection error
    statuses[code] = statuses.get(code, 0) + 1
    if code == 200:
        lat.append(time.perf_counter() - t0)


async def closed_loop(url: str, kind: str, concurrency: int, max_requests: int,
                      max_seconds: float, texts, images, items: int = 1) -> dict[str, Any]:
    import httpx

    lat: list[float] = []
    statuses: dict[int, int] = {}
    counters = {"retry_after": 0, "next": 0}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        for w in range(min(concurrency, 4)):  # warm-up
            await client.post(url + "/v1/embeddings", json=payload(kind, w, texts, images, items))
        start = time.perf_counter()
        stop_at = start + max_seconds

        async def worker():
            while time.perf_counter() < stop_at:
                i = counters["next"]
                if i >= max_requests:
                    return
                counters["next"] += 1
                await _one(client, url, payload(kind, i, texts, images, items), lat, statuses,
                           counters)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return summarise(lat, statuses, elapsed, items, counters["retry_after"])


async def open_loop(url: str, kind: str, rate: float, max_requests: int, max_seconds: float,
                    texts, images, items: int = 1) -> dict[str, Any]:
    """Poisson arrivals at ``rate`` requests/s, whatever the answers (an open-loop load)."""
    import httpx

    lat: list[float] = []
    statuses: dict[int, int] = {}
    counters = {"retry_after": 0}
    rng = np.random.default_rng(1)
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        start = time.perf_counter()
        tasks, t, i = [], start, 0
        while i < max_requests and t - start < max_seconds:
            t += rng.exponential(1.0 / rate)
            delay = t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(client, url, payload(kind, i, texts, images,
                                                                       items), lat, statuses,
                                                  counters)))
            i += 1
        offered = i / max(1e-9, time.perf_counter() - start)
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    out = summarise(lat, statuses, elapsed, items, counters["retry_after"])
    out["offered_requests_per_s"] = round(offered, 2)
    return out


# -- offline ----------------------------------------------------------------------------------
class Offline:
    """The Engine's own batch rate, in this process: encode_texts / encode_images (from JPEG
    bytes, decode included, as the server does) on batches of ``batch``; the median of the
    calls' rates over ``seconds``. Measured right before each server level, so that the ratio
    of a level to it sees the same background load."""

    def __init__(self, artifact: str, texts: list[str], jpegs: list[bytes], batch: int):
        import clipfast

        self.engine = clipfast.Engine(artifact, backend="onnxruntime", batch_size=batch)
        self.batch = batch
        self.items = {"texts": [texts[i % len(texts)] for i in range(batch)],
                      "images": [jpegs[i % len(jpegs)] for i in range(batch)]}
        for kind in self.items:
            self._call(kind)  # warm-up

    def _call(self, kind: str) -> None:
        fn = self.engine.encode_texts if kind == "texts" else self.engine.encode_images
        fn(self.items[kind])

    def rate(self, kind: str, seconds: float) -> float:
        rates, t_end = [], time.perf_counter() + seconds
        while time.perf_counter() < t_end or len(rates) < 2:
            t0 = time.perf_counter()
            self._call(kind)
            rates.append(self.batch / (time.perf_counter() - t0))
        return round(float(np.median(rates)), 2)


# -- report -----------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    from clipfast.bench.machine import machine_info

    info = machine_info("cpu")
    info["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return info


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (kind, server, concurrency): the medians over rounds."""
    keys = sorted({(r["kind"], r["server"], r["concurrency"]) for r in rows},
                  key=lambda k: (k[0], k[1], k[2]))
    out = []
    for kind, server, c in keys:
        sel = [r for r in rows if (r["kind"], r["server"], r["concurrency"]) == (kind, server, c)]
        med = {f: round(float(np.median([r[f] for r in sel])), 3 if f == "of_offline" else 1)
               for f in ("items_per_s", "p50_ms", "p99_ms", "of_offline",
                         "offline_items_per_s")}
        out.append({"kind": kind, "server": server, "concurrency": c, "rounds": len(sel),
                    "requests": sum(r["requests"] for r in sel), **med})
    return out


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"# `clipfast serve` under load: {res['model']}", "",
             f"Command: `{res['command']}`", "",
             f"CPU: {m['cpu']}, ISA level {m['isa']}, {m['cores']} cores "
             f"(flags: {', '.join(f for f in m['cpu_features'])}).",
             f"Load before: `{res['uptime_before']}`; after: `{res['uptime_after']}`.", "",
             "Servers: " + "; ".join(f"{k}: `{' '.join(v['command'][3:])}`"
                                     for k, v in res["servers"].items()), "",
             "## Offline Engine batch rate (this process, measured before each level)", "",
             "| kind | batch | items/s (median) | min | max |", "|---|---|---|---|---|"]
    for kind, r in res["offline"].items():
        lines.append(f"| {kind} | {r['batch']} | {r['items_per_s_median']} | "
                     f"{r['items_per_s_min']} | {r['items_per_s_max']} |")
    lines += ["", "## Closed loop: one item per request (medians over rounds)", "",
              "`of offline`: the level's throughput over the offline rate measured just before "
              "it.", "",
              "| kind | server | concurrency | rounds | requests | items/s | of offline | "
              "p50 ms | p99 ms |", "|---|---|---|---|---|---|---|---|---|"]
    for row in res["summary"]:
        lines.append(f"| {row['kind']} | {row['server']} | {row['concurrency']} | "
                     f"{row['rounds']} | {row['requests']} | {row['items_per_s']} | "
                     f"{row['of_offline']} | {row['p50_ms']} | {row['p99_ms']} |")
    bad = [r for r in res["closed_loop"] if set(r["statuses"]) != {200}]
    lines += ["", "Statuses other than 200 in the closed loop: "
              + (", ".join(f"{r['kind']}/{r['server']}/c={r['concurrency']}: {r['statuses']}"
                           for r in bad) or "none") + "."]
    lines += ["", "## Goals", "", "| goal | kind | measured | target | met |",
              "|---|---|---|---|---|"]
    for g in res["goals"]:
        lines.append(f"| {g['goal']} | {g['kind']} | {g['measured']} | {g['target']} | "
                     f"{'yes' if g['met'] else 'NO'} |")
    lines += ["", "## Open loop at half the best throughput", "",
              "| kind | offered req/s | items/s | p50 ms | p99 ms | p99/p50 |",
              "|---|---|---|---|---|---|"]
    for kind, r in res["half_load"].items():
        lines.append(f"| {kind} | {r['offered_requests_per_s']} | {r['items_per_s']} | "
                     f"{r['p50_ms']} | {r['p99_ms']} | {r['p99_over_p50']} |")
    lines += ["", "## Overload: open loop at 4x the best throughput", "",
              "| kind | offered items/s | statuses | 503 with Retry-After | server RSS MB "
              "before / max / after | healthy after |", "|---|---|---|---|---|---|"]
    for kind, r in res["overload"].items():
        lines.append(f"| {kind} | {r['offered_items_per_s']} | {r['statuses']} | "
                     f"{r['503_with_retry_after']} | {r['rss_mb_before']} / {r['rss_mb_max']} / "
                     f"{r['rss_mb_after']} | {r['healthy_after']} |")
    if res.get("notes"):
        lines += ["", "## Notes", "", *res["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", required=True)
    p.add_argument("--out", required=True, help="OUT: writes OUT.json and OUT.md")
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--kinds", default="texts,images")
    p.add_argument("--max-requests", type=int, default=400, help="per level")
    p.add_argument("--max-seconds", type=float, default=15.0, help="per level")
    p.add_argument("--offline-seconds", type=float, default=4.0, help="before each level")
    p.add_argument("--rounds", type=int, default=1, help="repeats of the whole sweep")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--max-queue", type=int, default=128)
    p.add_argument("--overload-seconds", type=float, default=10.0)
    p.add_argument("--overload-items", type=int, default=4, help="items per overload request")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--reference-root", default=None, metavar="DIR",
                   help="also serve from this checkout (the previous code) and compare")
    p.add_argument("--no-half-load", action="store_true",
                   help="skip the open-loop half-load and overload phases")
    args = p.parse_args(argv)

    script = Path(sys.argv[0]).resolve()
    script_name = str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else sys.argv[0]
    command = "python " + " ".join(shlex.quote(a) for a in [
        script_name, *(argv if argv is not None else sys.argv[1:])])
    kinds = args.kinds.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    texts = make_texts(512)
    jpegs = make_images()
    images = [data_url(b) for b in jpegs]
    res: dict[str, Any] = {"model": Path(args.artifact).name, "command": command,
                           "machine": machine(), "uptime_before":
                           subprocess.run(["uptime"], capture_output=True, text=True
                                          ).stdout.strip(),
                           "args": vars(args), "servers": {}, "closed_loop": []}
    print("loading the offline Engine ...", flush=True)
    offline = Offline(args.artifact, texts, jpegs, args.max_batch)
    configs = {"batched": ["--max-batch", str(args.max_batch), "--max-wait-ms",
                           str(args.max_wait_ms), "--max-queue", str(args.max_queue),
                           "--model-name", "bench"]}
    if not args.no_baseline:
        configs["unbatched"] = ["--max-batch", "1", "--max-wait-ms", "0", "--max-queue",
                                str(args.max_queue), "--model-name", "bench"]
    roots = {}
    if args.reference_root:
        configs["reference"] = configs["batched"]
        roots["reference"] = args.reference_root
        res["reference_root"] = str(Path(args.reference_root).resolve())
        res["reference_commit"] = subprocess.run(
            ["git", "-C", args.reference_root, "rev-parse", "HEAD"], capture_output=True,
            text=True).stdout.strip()
    res["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                   capture_output=True, text=True).stdout.strip()
    servers = {}
    try:
        for name, extra in configs.items():
            proc, url, cmd = start_server(args.artifact, extra, roots.get(name))
            servers[name] = (proc, url)
            res["servers"][name] = {"command": ["python", *cmd[1:]]}
        # Interleaved: for each level, the offline rate, then each server, so that all three
        # see about the same background load; rounds repeat the whole sweep.
        offline_runs: dict[str, list[float]] = {k: [] for k in kinds}
        for rnd in range(args.rounds):
            for kind in kinds:
                for c in levels:
                    off = offline.rate(kind, args.offline_seconds)
                    offline_runs[kind].append(off)
                    # Odd rounds run the servers in reverse order, so that drifts in the
                    # machine's load fall on each alike.
                    order = list(servers.items())
                    for name, (_proc, url) in (order[::-1] if rnd % 2 else order):
                        r = asyncio.run(closed_loop(url, kind, c, args.max_requests,
                                                    args.max_seconds, texts, images))
                        row = {"kind": kind, "server": name, "concurrency": c, "round": rnd,
                               "offline_items_per_s": off, **r,
                               "of_offline": round(r["items_per_s"] / off, 3)}
                        res["closed_loop"].append(row)
                        print(json.dumps(row), flush=True)
        res["offline"] = {k: {"batch": args.max_batch, "measurements": v,
                              "items_per_s_median": round(float(np.median(v)), 2),
                              "items_per_s_min": min(v), "items_per_s_max": max(v)}
                          for k, v in offline_runs.items()}
        res["summary"] = summary(res["closed_loop"])
        best = {kind: max(r["items_per_s"] for r in res["summary"]
                          if r["kind"] == kind and r["server"] == "batched") for kind in kinds}
        for other in ("unbatched", "reference"):
            if other in servers:
                proc, _ = servers.pop(other)
                res["servers"][other]["exit_code_after_sigterm"] = stop_server(proc)
        proc, url = servers["batched"]
        res["half_load"], res["overload"] = {}, {}
        for kind in ([] if args.no_half_load else kinds):
            rate = best[kind] / 2
            r = asyncio.run(open_loop(url, kind, rate, int(rate * args.max_seconds) + 1,
                                      args.max_seconds, texts, images))
            r["p99_over_p50"] = round(r["p99_ms"] / r["p50_ms"], 2)
            r["best_items_per_s"] = best[kind]
            res["half_load"][kind] = r
            print("half", kind, json.dumps(r), flush=True)
        for kind in ([] if args.no_half_load else kinds):
            k = args.overload_items
            rate = 4 * best[kind] / k
            before = rss_mb(proc.pid)
            with RssSampler(proc.pid) as sampler:
                r = asyncio.run(open_loop(url, kind, rate, int(rate * args.overload_seconds) + 1,
                                          args.overload_seconds, texts, images, k))
            import httpx

            healthy = httpx.get(url + "/health", timeout=10).status_code == 200
            r.update({"items_per_request": k,
                      "offered_items_per_s": round(r["offered_requests_per_s"] * k, 1),
                      "rss_mb_before": round(before or 0, 1),
                      "rss_mb_max": round(max(sampler.samples or [0]), 1),
                      "rss_mb_after": round(rss_mb(proc.pid) or 0, 1),
                      "healthy_after": healthy})
            res["overload"][kind] = r
            print("overload", kind, json.dumps(r), flush=True)
    finally:
        for name, (proc, _) in servers.items():
            res["servers"][name]["exit_code_after_sigterm"] = stop_server(proc)
    res["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True
                                         ).stdout.strip()
    goals = []
    if args.reference_root:
        for kind in kinds:
            for c in levels:
                ratios = []
                for rnd in range(args.rounds):
                    sel = {r["server"]: r for r in res["closed_loop"] if (
                        r["kind"], r["concurrency"], r["round"]) == (kind, c, rnd)}
                    if sel.get("reference", {}).get("items_per_s"):
                        ratios.append(sel["batched"]["items_per_s"]
                                      / sel["reference"]["items_per_s"])
                if ratios:
                    ratio = round(float(np.median(ratios)), 3)
                    goals.append({"goal": f"c={c} items/s: this code / the reference (median "
                                  "of per-round ratios)", "kind": kind, "measured": ratio,
                                  "target": ">= 0.9", "met": ratio >= 0.9})
    for kind in kinds:
        at32 = {r["server"]: r for r in res["summary"]
                if r["kind"] == kind and r["concurrency"] == 32}
        if "batched" in at32:
            frac = at32["batched"]["of_offline"]
            goals.append({"goal": "c=32 throughput / offline Engine rate (median of rounds)",
                          "kind": kind, "measured": frac, "target": ">= 0.85",
                          "met": frac >= 0.85})
        if "batched" in at32 and "unbatched" in at32 and at32["unbatched"]["items_per_s"] > 0:
            ratio = round(at32["batched"]["items_per_s"] / at32["unbatched"]["items_per_s"], 2)
            goals.append({"goal": "c=32 batched / unbatched", "kind": kind,
                          "measured": ratio, "target": ">= 3", "met": ratio >= 3})
        h = res.get("half_load", {}).get(kind)
        if h:
            goals.append({"goal": "p99 / p50 at half the best throughput", "kind": kind,
                          "measured": h["p99_over_p50"], "target": "<= 3",
                          "met": h["p99_over_p50"] <= 3})
        o = res.get("overload", {}).get(kind)
        if o:
            only = set(o["statuses"]) <= {200, 503} and o["503_with_retry_after"] == o[
                "statuses"].get(503, 0) and o["healthy_after"]
            goals.append({"goal": "4x capacity: only 200/503 (+Retry-After), alive",
                          "kind": kind, "measured": o["statuses"], "target": "{200, 503}",
                          "met": bool(only)})
    res["goals"] = goals
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    Path(f"{out}.md").write_text(markdown(res))
    print(Path(f"{out}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
