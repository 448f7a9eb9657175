"""A/B throughput of ``run_embed`` for whichever clipfast is importable (PYTHONPATH picks it).

    git archive REV clipfast | tar -x -C /tmp/old   # the reference tree
    PYTHONPATH=/tmp/old python benchmarks/embed_ab.py ARTIFACT FOLDER 2   # reference
    python benchmarks/embed_ab.py ARTIFACT FOLDER 2                       # this tree

Loads the Engine once (batch 32, ONNX Runtime), runs ``rounds`` fresh jobs on FOLDER into
temporary --out folders (defaults otherwise: every core for decode and tower) and prints one JSON
line: the code's path and each round's inputs/s. Alternate the two calls a few times on a
shared machine and compare medians.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time

import clipfast
from clipfast.embed import EmbedOptions, run_embed


def main() -> int:
    art, src, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    eng = clipfast.Engine(art, backend="onnxruntime", batch_size=32)
    rates = []
    for _ in range(rounds):
        root = tempfile.mkdtemp(prefix="embed-ab-")
        t = time.perf_counter()
        s = run_embed(EmbedOptions(artifact=art, sources=[src], out=f"{root}/o",
                                   progress=False), engine=eng)
        rates.append(s.items / (time.perf_counter() - t))
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"code": clipfast.__file__, "rates": rates}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
