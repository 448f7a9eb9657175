"""What bf16 costs a CLIP tower: the figures behind ``clipfast.artifact.fidelity.GATES["bf16"]``.

Runs an fp32 artifact's towers through OpenVINO at ``INFERENCE_PRECISION_HINT=bf16`` and f32 on
the built-in generated images and captions (``clipfast.artifact.samples``) plus the artifact's
golden
inputs, and reports the centred relative error and cosine of each against the fp32 ONNX Runtime
path (itself within ~3e-6 of the PyTorch source, the export's figures). Needs a CPU with
AVX512_BF16 or AMX.

    python benchmarks/openvino_bf16_gate.py ARTIFACT \
        --out benchmarks/results/openvino-bf16-gate.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import clipfast
from clipfast.artifact.fidelity import centred_relative_error, cosine, l2_normalize
from clipfast.artifact.samples import sample_captions, sample_images
from clipfast.artifact.selfcheck import load_golden
from clipfast.cpu import host_cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--images", type=int, default=24)
    args = ap.parse_args(argv)
    ref = clipfast.Engine(args.artifact, backend="onnxruntime", self_check=False)
    golden = load_golden(ref.manifest)
    pixels = np.concatenate([ref.preprocess(sample_images(args.images)), golden.pixel_values])
    tokens = ref.tokenize(sample_captions(args.images))
    tokens = {k: np.concatenate([v, golden.text[k].astype(v.dtype)]) for k, v in tokens.items()}
    want = {"image": l2_normalize(ref.run_image_tower(pixels)),
            "text": l2_normalize(ref.run_text_tower(tokens))}
    rows = {}
    for precision in ("f32", "bf16"):
        eng = clipfast.Engine(args.artifact, backend="openvino", self_check=False,
                              backend_options={"ov_precision": precision, "ov_cache": False})
        got = {"image": l2_normalize(eng.run_image_tower(pixels)),
               "text": l2_normalize(eng.run_text_tower(tokens))}
        rows[precision] = {
            f"{t}_{k}": float(v) for t in ("image", "text") for k, v in (
                ("centred_rel_error_max", centred_relative_error(got[t], want[t]).max()),
                ("centred_rel_error_median", np.median(centred_relative_error(got[t], want[t]))),
                ("cosine_min", cosine(got[t], want[t]).min()))}
        rows[precision]["runtime_precisions"] = eng.describe()["runtime_precisions"]
    report = {"artifact": str(args.artifact), "source": ref.manifest.spec.source,
              "random_weights": ref.manifest.spec.random_weights,
              "images": int(pixels.shape[0]), "texts": int(len(next(iter(tokens.values())))),
              "reference": "clipfast fp32 on ONNX Runtime", "cpu": host_cpu().to_dict(),
              "openvino": rows}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
