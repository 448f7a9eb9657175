"""The ceiling of batching on this machine: the offline Engine's rate at batch 32 over its rate
at batch 1 (texts, and images from JPEG bytes), interleaved in rounds; a server batching
requests cannot beat an unbatched one by more than this.

    python benchmarks/serve_batch_ceiling.py --artifact /tmp/serve-vitb32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import make_images, make_texts  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    args = p.parse_args(argv)
    import clipfast

    engine = clipfast.Engine(args.artifact, backend="onnxruntime", batch_size=32)
    jpegs = make_images()
    items = {"texts": make_texts(32), "images": [jpegs[i % len(jpegs)] for i in range(32)]}
    res: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for kind in ("texts", "images"):
            fn = engine.encode_texts if kind == "texts" else engine.encode_images
            for b in (1, 32):
                rates, t_end = [], time.perf_counter() + args.seconds
                while time.perf_counter() < t_end:
                    t0 = time.perf_counter()
                    fn(items[kind][:b])
                    rates.append(b / (time.perf_counter() - t0))
                res.setdefault((kind, b), []).append(float(np.median(rates)))
    for (kind, b), v in res.items():
        print(f"{kind:6s} batch {b:2d}: items/s per round {[round(x, 2) for x in v]}, "
              f"median {np.median(v):.2f}")
    for kind in ("texts", "images"):
        ratios = [a / b for a, b in zip(res[(kind, 32)], res[(kind, 1)])]
        print(f"{kind:6s} batch 32 / batch 1 per round: {[round(r, 2) for r in ratios]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
