"""Adversarial load on ``clipfast serve`` (loopback): how fast ``/health`` answers, and how much
memory the server takes, while hostile clients try to freeze or exhaust it.

Phases (each bounded in seconds; a prober on 127.0.0.1, in its own process so that the hostile
clients' work does not delay it, asks ``/health`` every 50 ms, 5 s timeout, and a sampler reads
the server's RSS every 50 ms):

- ``idle``: nothing else.
- ``slow_headers``: 600 connections from one address (127.0.0.2) that send part of their
  headers and then one byte a second, never finishing.
- ``slow_headers_8_addresses``: 512 such connections from 8 addresses (as many as
  ``--max-connections``); an API client on 127.0.0.1 counts its statuses.
- ``slow_bodies``: 400 connections (8 addresses, fewer than ``--max-connections``) that send
  complete headers announcing a 1 MB body, then one byte a second; this phase lasts at least
  35 s, past the default ``--body-timeout-s`` (30).
- ``huge_bodies``: 4 clients in a loop, each sending in turn a 32 MB body of 16 M integers,
  8 texts of 3.5 MB, a template ``{:>20000000}{{}}``, JSON nested 10,000 deep, a body
  announcing more than ``--max-body-bytes``.
- ``mix``: the slow headers, the slow bodies (300 each, 8 addresses) and the huge bodies at
  once, with 4 honest clients embedding texts (their statuses and latency are reported).

    python benchmarks/serve_adversarial.py --artifact /tmp/serve-bench/small-clip \\
        --out benchmarks/results/serve-adversarial-small-clip

writes ``OUT.json`` and ``OUT.md``. ``--reference-root DIR`` runs the same phases against the
server of another checkout afterwards (e.g. the previous code, ``git worktree add``), with the
same bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import ROOT, RssSampler, machine, rss_mb, start_server, stop_server  # noqa: E402


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


class Prober:
    """GET /health every ``every`` s from 127.0.0.1; latencies in ms, failures counted."""

    def __init__(self, url: str, every: float = 0.05):
        self.url, self.every = url, every
        self.ms: list[float] = []
        self.failures: dict[str, int] = {}

    async def run(self, stop: asyncio.Event) -> None:
        import httpx

        async with httpx.AsyncClient(base_url=self.url, timeout=5) as c:
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    r = await c.get("/health")
                    if r.status_code == 200:
                        self.ms.append((time.perf_counter() - t) * 1e3)
                    else:
                        key = str(r.status_code)
                        self.failures[key] = self.failures.get(key, 0) + 1
                except Exception as e:  # noqa: BLE001 - a timeout or a refused connection
                    key = type(e).__name__
                    self.failures[key] = self.failures.get(key, 0) + 1
                    self.ms.append((time.perf_counter() - t) * 1e3)
                with_pause = self.every - (time.perf_counter() - t)
                if with_pause > 0:
                    try:
                        await asyncio.wait_for(stop.wait(), with_pause)
                    except asyncio.TimeoutError:
                        pass

    def result(self) -> dict[str, Any]:
        return {"health_probes": len(self.ms) + sum(v for k, v in self.failures.items()
                                                     if k.isdigit()),
                "health_p50_ms": _pct(self.ms, 50), "health_p99_ms": _pct(self.ms, 99),
                "health_max_ms": round(max(self.ms), 1) if self.ms else None,
                "health_failures": self.failures}


def _probe_process(url: str, seconds: float, queue) -> None:
    """Run a Prober for ``seconds`` and put its result on ``queue`` (in a child process)."""
    async def main() -> dict[str, Any]:
        stop = asyncio.Event()
        prober = Prober(url)
        task = asyncio.create_task(prober.run(stop))
        await asyncio.sleep(seconds)
        stop.set()
        await task
        return prober.result()
    queue.put(asyncio.run(main()))


async def slow_client(port: int, source: str, head: bytes, stop: asyncio.Event,
                      outcome: dict[str, int]) -> None:
    """Send ``head``, then one byte a second until the server answers or closes, or ``stop``."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                       local_addr=(source, 0))
    except OSError as e:
        outcome[f"connect:{type(e).__name__}"] = outcome.get(f"connect:{type(e).__name__}",
                                                             0) + 1
        return
    try:
        writer.write(head)
        while not stop.is_set():
            try:
                data = await asyncio.wait_for(reader.read(64), 1.0)
                key = data[:12].decode("latin-1") if data else "closed"
                outcome[key] = outcome.get(key, 0) + 1
                return
            except asyncio.TimeoutError:
                writer.write(b"a")
                await writer.drain()
        outcome["held to the end"] = outcome.get("held to the end", 0) + 1
    except OSError:
        outcome["reset"] = outcome.get("reset", 0) + 1
    finally:
        writer.close()


def slow_heads(n: int, addresses: int, body: bool) -> list[tuple[str, bytes]]:
    head = (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000\r\n\r\n{\"input\":\"" if body else
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    return [(f"127.0.0.{2 + i % addresses}", head) for i in range(n)]


def huge_bodies(max_body: int) -> list[tuple[str, bytes, dict[str, str]]]:
    ints = b'{"model":"m","input":[' + b"1," * (max_body // 2 - 16) + b"1]}"
    texts = json.dumps({"model": "m", "input": ["word " * 700_000] * 8}).encode()
    return [("/v1/embeddings", ints[:max_body - 2] + b"]}", {}),
            ("/v1/embeddings", texts, {}),
            ("/v1/classify", json.dumps({"input": ["aGk="], "labels": ["a"],
                                         "template": "{:>20000000}{{}}"}).encode(), {}),
            ("/v1/embeddings", b"[" * 10_000 + b"]" * 10_000, {}),
            ("/v1/embeddings", b"x" * 1000, {"content-length": str(max_body + 1)})]


async def hostile_poster(url: str, bodies, stop: asyncio.Event, outcome: dict[str, int]
                         ) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        i = 0
        while not stop.is_set():
            path, body, headers = bodies[i % len(bodies)]
            i += 1
            try:
                r = await c.post(path, content=body,
                                 headers={"content-type": "application/json", **headers})
                key = f"{r.status_code} {r.json().get('error', {}).get('code')}"
            except Exception as e:  # noqa: BLE001 - reported, not raised
                key = type(e).__name__
            outcome[key] = outcome.get(key, 0) + 1


async def honest_client(url: str, stop: asyncio.Event, outcome: dict[str, int],
                        ms: list[float]) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        i = 0
        while not stop.is_set():
            t = time.perf_counter()
            try:
                r = await c.post("/v1/embeddings", json={
                    "model": "m", "input": [f"a photo of thing {i}", "a dog"]})
                key = str(r.status_code)
                if r.status_code == 200:
                    ms.append((time.perf_counter() - t) * 1e3)
            except Exception as e:  # noqa: BLE001
                key = type(e).__name__
            outcome[key] = outcome.get(key, 0) + 1
            i += 1


async def api_watcher(url: str, stop: asyncio.Event, outcome: dict[str, int]) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=5) as c:
        while not stop.is_set():
            try:
                key = str((await c.get("/v1/models")).status_code)
            except Exception as e:  # noqa: BLE001
                key = type(e).__name__
            outcome[key] = outcome.get(key, 0) + 1
            await asyncio.sleep(0.25)


async def phase(name: str, url: str, pid: int, seconds: float, max_body: int) -> dict[str, Any]:
    port = int(url.rsplit(":", 1)[1])
    import multiprocessing

    stop = asyncio.Event()
    slow: dict[str, int] = {}
    hostile: dict[str, int] = {}
    honest: dict[str, int] = {}
    api: dict[str, int] = {}
    honest_ms: list[float] = []
    tasks: list[asyncio.Task] = []
    heads: list[tuple[str, bytes]] = []
    if name == "slow_headers":
        heads = slow_heads(600, 1, body=False)
    elif name == "slow_headers_8_addresses":
        heads = slow_heads(512, 8, body=False)
        tasks.append(asyncio.create_task(api_watcher(url, stop, api)))
    elif name == "slow_bodies":
        heads = slow_heads(400, 8, body=True)
        seconds = max(seconds, 35.0)
    elif name == "mix":
        heads = slow_heads(300, 8, body=False) + slow_heads(300, 8, body=True)
    for source, head in heads:
        tasks.append(asyncio.create_task(slow_client(port, source, head, stop, slow)))
    if name in ("huge_bodies", "mix"):
        bodies = huge_bodies(max_body)
        for k in range(4):
            rotated = bodies[k:] + bodies[:k]
            tasks.append(asyncio.create_task(hostile_poster(url, rotated, stop, hostile)))
    if name == "mix":
        for _ in range(4):
            tasks.append(asyncio.create_task(honest_client(url, stop, honest, honest_ms)))
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    probe = ctx.Process(target=_probe_process, args=(url, seconds, queue))
    with RssSampler(pid, every=0.05) as sampler:
        probe.start()
        await asyncio.sleep(seconds)
        stop.set()
        if tasks:
            await asyncio.wait(tasks, timeout=90)
        health = await asyncio.get_running_loop().run_in_executor(None, queue.get, True, 60)
        probe.join(10)
    out = {"phase": name, "seconds": seconds, **health,
           "rss_mb_max": round(max(sampler.samples or [0]), 1),
           "rss_mb_after": round(rss_mb(pid) or 0, 1)}
    if slow:
        out["slow_clients"] = slow
    if hostile:
        out["hostile_requests"] = hostile
    if api:
        out["api_statuses"] = api
    if honest:
        out["honest_statuses"] = honest
        out["honest_p50_ms"] = _pct(honest_ms, 50)
        out["honest_p99_ms"] = _pct(honest_ms, 99)
    return out


PHASES = ("idle", "slow_headers", "slow_headers_8_addresses", "slow_bodies", "huge_bodies",
          "mix")


def run_server(artifact: str, flags: list[str], root: str | None, seconds: float,
               max_body: int, phases: list[str]) -> dict[str, Any]:
    proc, url, cmd = start_server(artifact, flags, root)
    rows = []
    try:
        base = rss_mb(proc.pid)
        for name in phases:
            row = asyncio.run(phase(name, url, proc.pid, seconds, max_body))
            print(json.dumps(row), flush=True)
            rows.append(row)
            time.sleep(1.0)
    finally:
        code = stop_server(proc)
    return {"command": ["python", *cmd[1:]], "rss_mb_ready": round(base or 0, 1),
            "phases": rows, "exit_code_after_sigterm": code}


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"# `clipfast serve` under hostile clients: {res['model']}", "",
             f"Command: `{res['command']}`", "",
             f"CPU: {m['cpu']}, ISA level {m['isa']}, {m['cores']} cores "
             f"(flags: {', '.join(m['cpu_features'])}).",
             f"Load before: `{res['uptime_before']}`; after: `{res['uptime_after']}`.", ""]
    for name, srv in res["servers"].items():
        lines += [f"## {name} (`{' '.join(srv['command'][3:])}`)", "",
                  f"RSS when ready: {srv['rss_mb_ready']} MB; exit code after SIGTERM: "
                  f"{srv['exit_code_after_sigterm']}.", "",
                  "| phase | /health probes | p50 ms | p99 ms | max ms | failures | "
                  "peak RSS MB | RSS after MB |", "|---|---|---|---|---|---|---|---|"]
        for r in srv["phases"]:
            lines.append(f"| {r['phase']} | {r['health_probes']} | {r['health_p50_ms']} | "
                         f"{r['health_p99_ms']} | {r['health_max_ms']} | "
                         f"{r['health_failures'] or '-'} | {r['rss_mb_max']} | "
                         f"{r['rss_mb_after']} |")
        lines += ["", "What the clients got:", ""]
        for r in srv["phases"]:
            for k in ("slow_clients", "hostile_requests", "api_statuses", "honest_statuses"):
                if k in r:
                    extra = (f" (p50 {r['honest_p50_ms']} ms, p99 {r['honest_p99_ms']} ms)"
                             if k == "honest_statuses" else "")
                    lines.append(f"- {r['phase']}, {k.replace('_', ' ')}: `{r[k]}`{extra}")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", required=True)
    p.add_argument("--out", required=True, help="OUT: writes OUT.json and OUT.md")
    p.add_argument("--phase-seconds", type=float, default=12.0)
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--reference-root", default=None, metavar="DIR")
    p.add_argument("--reference-phases", default=None,
                   help="phases for the reference (default: the same)")
    args = p.parse_args(argv)
    script = Path(sys.argv[0]).resolve()
    script_name = str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else sys.argv[0]
    command = "python " + " ".join(shlex.quote(a) for a in [
        script_name, *(argv if argv is not None else sys.argv[1:])])
    max_body = 32 * 1024 * 1024  # the server's default --max-body-bytes
    flags = ["--model-name", "m"]
    res: dict[str, Any] = {"model": Path(args.artifact).name, "command": command,
                           "machine": machine(), "servers": {},
                           "uptime_before": subprocess.run(["uptime"], capture_output=True,
                                                           text=True).stdout.strip(),
                           "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse",
                                                     "HEAD"], capture_output=True,
                                                    text=True).stdout.strip()}
    phases = args.phases.split(",")
    res["servers"]["this code"] = run_server(args.artifact, flags, None, args.phase_seconds,
                                             max_body, phases)
    if args.reference_root:
        ref_phases = (args.reference_phases or args.phases).split(",")
        res["reference_commit"] = subprocess.run(
            ["git", "-C", args.reference_root, "rev-parse", "HEAD"], capture_output=True,
            text=True).stdout.strip()
        res["servers"]["reference"] = run_server(args.artifact, flags, args.reference_root,
                                                 args.phase_seconds, max_body, ref_phases)
    res["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True
                                         ).stdout.strip()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    Path(f"{out}.md").write_text(markdown(res))
    print(Path(f"{out}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
