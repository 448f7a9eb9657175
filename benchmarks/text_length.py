"""Text towers on the dynamic sequence path against padding every text to the context.

One artifact whose text tower takes the dynamic path (``text.sequence == "dynamic"``), one
ONNX Runtime Engine; for each workload the same token ids run two ways, timed call by call in
rotation (``clipfast.bench.stats.time_interleaved``) so both see the same background load:

- ``dynamic``: ``Engine.run_text_tower(ids, lengths)``: batches grouped by length, each padded
  to its longest text (what ``encode_texts``, the server and ``embed`` now do);
- ``padded``: the same call told every text is ``context_length`` long: every batch padded to
  77 through the same graph, which is what the fixed ``[batch, 77]`` graphs did.

Workloads: texts of exactly 8, 16, 32 and 77 tokens; the sample captions (short); and 31 short
captions plus one 77-token text in each batch of 32 (the case length grouping is for).
Reported: per round the median ms of each, their ratio; over rounds the median ratio.

    clipfast export --model ViT-B-32 --pretrained none --out /tmp/vitb32
    python benchmarks/text_length.py --artifact /tmp/vitb32 \
        --out benchmarks/results/text-length-vit-b-32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def workloads(engine, batch: int) -> dict[str, tuple[dict[str, np.ndarray], np.ndarray]]:
    """``{name: (ids, lengths)}`` of ``batch`` rows each."""
    from clipfast.artifact.samples import CAPTIONS
    from clipfast.bench.workload import texts_of_length

    tok = engine.tokenizer
    out = {}
    for n in (8, 16, 32, 77):
        ids, lengths = texts_of_length(tok, n, batch)
        out[f"{min(n, tok.context_length)} tokens"] = (ids, lengths)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
    out["sample captions"] = tok.encode(captions)
    long_text = " ".join(["a long caption about many things"] * 20)
    mixed = [long_text if i % 32 == 31 else CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
    out["31 captions + 1 long"] = tok.encode(mixed)
    return out


def _ratios(rounds: list[dict]) -> str:
    return ", ".join(f"{r['speedup']:.2f}" for r in rounds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", required=True)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0, help="per workload and round")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="results path without suffix (.json and .md)")
    args = p.parse_args(argv)

    import clipfast
    from clipfast.bench.stats import time_interleaved
    from clipfast.cpu import host_cpu

    engine = clipfast.Engine(args.artifact, backend="onnxruntime", batch_size=args.batch,
                             threads=args.threads)
    if not engine.text_dynamic:
        print(f"{args.artifact}: text tower is not on the dynamic path "
              f"({engine.manifest.spec.text.sequence_reason or 'exported before it existed'})")
        return 2
    context = engine.tokenizer.context_length
    loads = {}
    results = []
    t_start = time.time()
    with open("/proc/loadavg") as f:
        loads["start"] = f.read().split()[:3]
    for name, (ids, lengths) in workloads(engine, args.batch).items():
        full = np.full(len(lengths), context, dtype=np.int64)
        same = np.allclose(engine.run_text_tower(ids, lengths), engine.run_text_tower(ids, full),
                           rtol=1e-4, atol=1e-5)
        fns = {"dynamic": lambda ids=ids, lengths=lengths: engine.run_text_tower(ids, lengths),
               "padded": lambda ids=ids, full=full: engine.run_text_tower(ids, full)}
        rounds = []
        for _ in range(args.rounds):
            times = time_interleaved(fns, warmup=1, min_iters=3, max_iters=500,
                                     min_seconds=args.seconds)
            med = {k: float(np.median(v)) for k, v in times.items()}
            rounds.append({"dynamic_ms": med["dynamic"], "padded_ms": med["padded"],
                           "speedup": med["padded"] / med["dynamic"]})
        row = {"workload": name, "batch": args.batch,
               "mean_tokens": float(np.mean(lengths)), "max_tokens": int(np.max(lengths)),
               "same_embeddings": bool(same), "rounds": rounds,
               "dynamic_ms": float(np.median([r["dynamic_ms"] for r in rounds])),
               "padded_ms": float(np.median([r["padded_ms"] for r in rounds])),
               "speedup": float(np.median([r["speedup"] for r in rounds]))}
        results.append(row)
        print(f"{name:22s} mean {row['mean_tokens']:5.1f} tokens: dynamic "
              f"{row['dynamic_ms']:8.2f} ms, padded to {context} {row['padded_ms']:8.2f} ms, "
              f"speedup {row['speedup']:.2f}x (rounds "
              f"{_ratios(rounds)}), same embeddings {same}")
    with open("/proc/loadavg") as f:
        loads["end"] = f.read().split()[:3]
    cpu = host_cpu()
    doc = {"benchmark": "text_length", "artifact": str(args.artifact),
           "model": engine.manifest.spec.source.get("model"),
           "precision": engine.manifest.spec.precision,
           "backend": engine.backend, "describe_threads": args.threads,
           "cpu": cpu.to_dict(), "isa": cpu.isa, "loadavg": loads,
           "seconds": round(time.time() - t_start, 1),
           "command": "python benchmarks/text_length.py " + " ".join(argv or sys.argv[1:]),
           "results": results}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
        lines = [f"# Text tower: dynamic sequence vs padding to {context}", "",
                 f"Command: `{doc['command']}`", "",
                 f"- model {doc['model']} ({doc['precision']}), backend {doc['backend']}, "
                 f"batch {args.batch}, {args.rounds} interleaved rounds",
                 f"- CPU: {cpu.model}, ISA {cpu.isa}; load average {loads['start']} -> "
                 f"{loads['end']}", "",
                 "| workload | mean tokens | dynamic ms | padded ms | speedup (median of "
                 "rounds) | per round | same embeddings |", "|---|---|---|---|---|---|---|"]
        for r in results:
            lines.append(f"| {r['workload']} | {r['mean_tokens']:.1f} | {r['dynamic_ms']:.2f} | "
                         f"{r['padded_ms']:.2f} | {r['speedup']:.2f}x | "
                         f"{_ratios(r['rounds'])} | "
                         f"{r['same_embeddings']} |")
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        print(f"results: {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
