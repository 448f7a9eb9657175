"""A/B throughput of ``Engine.encode_images`` for whichever clipfast is importable (PYTHONPATH
picks it), as ``embed_ab.py`` does for ``run_embed``.

    PYTHONPATH=/tmp/old python benchmarks/encode_ab.py ARTIFACT FOLDER 2   # reference
    python benchmarks/encode_ab.py ARTIFACT FOLDER 2                       # this tree

Loads the Engine once (batch 32, ONNX Runtime), encodes FOLDER's *.jpg ``rounds`` times and
prints one JSON line: the code's path and each round's images/s. Alternate the two calls a few
times on a shared machine and compare medians.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import clipfast


def main() -> int:
    art, src, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    paths = sorted(str(p) for p in Path(src).glob("*.jpg"))
    eng = clipfast.Engine(art, backend="onnxruntime", batch_size=32)
    rates = []
    for _ in range(rounds):
        t = time.perf_counter()
        eng.encode_images(paths)
        rates.append(len(paths) / (time.perf_counter() - t))
    print(json.dumps({"code": clipfast.__file__, "rates": rates}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
