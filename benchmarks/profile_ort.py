"""Where an ONNX Runtime tower spends its time: per-operator share of kernel time.

    python benchmarks/profile_ort.py artifacts/vit-b-32-int8 --tower image --batch 32

Runs the tower with the Engine's own session settings (clipfast.backends.onnxruntime) and ONNX
Runtime's built-in profiler on random inputs of the artifact's shapes, after warm-up calls, then
sums the profiler's ``*_kernel_time`` events by operator type. Used to see how much of an int8
tower is integer matrix multiplication and how much the float operators around it.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def profile(artifact: Path, tower: str, batch: int, calls: int, threads: int | None
            ) -> dict:
    import onnxruntime as ort

    from clipfast.artifact.manifest import load_manifest
    from clipfast.backends.onnxruntime import CPU_DISABLED_OPTIMIZERS, session_options

    manifest = load_manifest(artifact, verify_checksums=False)
    so = session_options(ort, threads)
    tmp = tempfile.mkdtemp(prefix="clipfast-prof-")
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tmp) / tower)
    session = ort.InferenceSession(str(manifest.path(manifest.spec.tower(tower).file)), so,
                                   providers=["CPUExecutionProvider"],
                                   disabled_optimizers=list(CPU_DISABLED_OPTIMIZERS))
    rng = np.random.default_rng(0)
    feed = {}
    for i in session.get_inputs():
        if tower == "image":
            dtype = np.float16 if "float16" in i.type else np.float32
            feed[i.name] = rng.standard_normal((batch, *manifest.spec.image.shape)).astype(dtype)
        else:
            length = manifest.spec.tokenizer.context_length
            dtype = np.int32 if "int32" in i.type else np.int64
            feed[i.name] = (rng.integers(1, 1000, (batch, length)).astype(dtype)
                            if "mask" not in i.name else np.ones((batch, length), dtype))
    for _ in range(2):
        session.run(None, feed)
    start = time.perf_counter()
    for _ in range(calls):
        session.run(None, feed)
    rate = batch * calls / (time.perf_counter() - start)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
    total = sum(per_op.values()) or 1
    return {"artifact": str(artifact), "tower": tower, "batch": batch,
            "items_per_s_while_profiling": round(rate, 1),
            "share": {op: round(d / total, 4) for op, d in per_op.most_common()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--tower", choices=("image", "text"), default="image")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    result = profile(args.artifact, args.tower, args.batch, args.calls, args.threads)
    print(f"{result['artifact']} {args.tower} tower, batch {args.batch}: "
          f"{result['items_per_s_while_profiling']} items/s while profiling")
    for op, share in list(result["share"].items())[:args.top]:
        print(f"  {op:28s} {100 * share:5.1f}%")


if __name__ == "__main__":
    main()
