"""Run each csrc/ kernel once on a few CLIP shapes and check it against its reference.

The driver benchmarks/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck), small
enough to finish there in a minute.

    python benchmarks/gpu_kernels_smoke.py [--what preprocess|attention|all]

Exit status 0 when every case matches its reference (attention: within max(2x PyTorch's own
fp16 error against the fp32 reference, 2e-3); preprocessing: within 1 uint8 level of the
Pillow-exact reference), 1 otherwise; one JSON line per case on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (batch, heads, tokens, head_dim, causal): ViT-B/32 image, text, ViT-B/16, ViT-L/14@336, odd
ATTENTION_CASES = [(2, 12, 50, 64, False), (2, 8, 77, 64, True), (1, 12, 197, 64, False),
                   (1, 16, 577, 64, False), (1, 4, 257, 80, False), (1, 2, 33, 128, True)]
# (height, width) of source images: odd sizes, upscale and downscale, portrait and landscape
IMAGE_SIZES = [(480, 640), (97, 131), (1000, 333), (224, 224), (31, 500)]


def _attention() -> list[dict]:
    import torch

    from clipfast.kernels.attention import attention_gpu, attention_torch_reference

    out = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for b, h, t, d, causal in ATTENTION_CASES:
        q, k, v = (torch.randn(b, h, t, d, device="cuda", generator=gen) for _ in range(3))
        ref = attention_torch_reference(q, k, v, causal=causal).float()
        half = [x.half() for x in (q, k, v)]
        sdpa = torch.nn.functional.scaled_dot_product_attention(*half, is_causal=causal)
        torch_err = (sdpa.float() - ref).abs().max()
        got = attention_gpu(*half, causal=causal).float()
        torch.cuda.synchronize()
        err = float((got - ref).abs().max())
        # NOTE: the kernel may be at most twice PyTorch's own fp16 error against the same fp32
        # reference (flash-attention's rule), with a floor for shapes where that error is ~0
        tol = max(2 * float(torch_err), 2e-3)
        out.append({"kernel": "attention", "shape": [b, h, t, d], "causal": causal,
                    "max_error": err, "tolerance": tol, "ok": err <= tol})
    return out


def _preprocess() -> list[dict]:
    from clipfast.inputs.preprocess import PreprocessConfig
    from clipfast.kernels.preprocess import preprocess, preprocess_gpu

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (hh, ww, 3), dtype=np.uint8) for hh, ww in IMAGE_SIZES]
    out = []
    for interpolation in ("bicubic", "bilinear"):
        cfg = PreprocessConfig(image_size=(224, 224), interpolation=interpolation)
        ref = preprocess(images, cfg, device="cpu")
        got = preprocess_gpu(images, cfg, device="cuda").cpu().numpy()
        std = np.asarray(cfg.std, dtype=np.float64).reshape(1, 3, 1, 1)
        levels = float((np.abs(got - ref) / (cfg.rescale / std)).max())
        out.append({"kernel": "preprocess", "interpolation": interpolation,
                    "images": len(images), "max_levels": levels, "tolerance": 1.0,
                    "ok": levels <= 1.0})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", choices=["all", "preprocess", "attention"], default="all")
    args = ap.parse_args(argv)
    cases = []
    if args.what in ("all", "attention"):
        cases += _attention()
    if args.what in ("all", "preprocess"):
        cases += _preprocess()
    for case in cases:
        print(json.dumps(case))
    return 0 if all(c["ok"] for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
