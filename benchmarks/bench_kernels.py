"""Benchmark csrc/ kernels against the PyTorch they replace, on a CUDA machine.

    python benchmarks/bench_kernels.py                      # everything, default sizes
    python benchmarks/bench_kernels.py --what attention --batch 32 --repeats 100

- preprocessing: clipfast's fused kernel (one launch pair per batch, Pillow-exact resize) vs
  torchvision on the GPU (per-image antialiased resize + center crop + normalize, the usual GPU
  pipeline), on a batch of mixed-size uint8 images already on the device. Reported: images/s,
  effective GB/s (uint8 bytes read + output bytes written), and the max difference from the
  Pillow-exact reference in uint8 levels (fidelity next to speed).
- attention: clipfast_attention vs torch.nn.functional.scaled_dot_product_attention at CLIP
  shapes (batch, heads, tokens, head_dim), fp16 / bf16: microseconds per call and TFLOP/s.

Timing: warm-up calls, then N calls each bracketed by torch.cuda.synchronize(); median and
90th percentile. Results: JSON plus a markdown table in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# (name, batch multiplier, heads, tokens, head_dim, causal): real CLIP towers.
ATTENTION_SHAPES = [
    ("ViT-B/32 image", 12, 50, 64, False),
    ("CLIP text (B/L/H)", 8, 77, 64, True),
    ("ViT-B/16 image", 12, 197, 64, False),
    ("ViT-L/14 image", 16, 257, 64, False),
    ("ViT-H/14 image", 16, 257, 80, False),
    ("ViT-L/14@336 image", 16, 577, 64, False),
    ("head_dim 128, 577 tokens", 8, 577, 128, False),
]

# Typical photo sizes (h, w): web images, phone photos, thumbnails, a panorama.
IMAGE_SIZES = [(480, 640), (768, 1024), (375, 500), (1080, 1920), (640, 427), (256, 256),
               (3024, 4032), (600, 2400)]


def timeit(fn: Callable[[], Any], repeats: int, warmup: int) -> dict[str, float]:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"median_s": statistics.median(times), "p90_s": times[int(0.9 * (len(times) - 1))]}


def bench_preprocess(args, device) -> list[dict[str, Any]]:
    import torch
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    from clipfast.inputs.preprocess import PreprocessConfig
    from clipfast.kernels import preprocess_gpu, preprocess_reference

    cfg = PreprocessConfig(image_size=(224, 224), resize_size=224, mean=OPENAI_MEAN,
                           std=OPENAI_STD)
    rng = np.random.default_rng(0)
    host = [rng.integers(0, 256, (*IMAGE_SIZES[i % len(IMAGE_SIZES)], 3), dtype=np.uint8)
            for i in range(args.images)]
    dev = [torch.from_numpy(h).to(device) for h in host]
    chw = [d.permute(2, 0, 1) for d in dev]
    mean = torch.tensor(OPENAI_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=device).view(3, 1, 1)

    def clipfast_fn():
        return preprocess_gpu(dev, cfg, device=device)

    def torchvision_fn():
        out = []
        for img in chw:
            r = TF.resize(img, [224], interpolation=InterpolationMode.BICUBIC, antialias=True)
            r = TF.center_crop(r, [224, 224])
            out.append(((r.float() / 255.0) - mean) / std)
        return torch.stack(out)

    in_bytes = sum(h.nbytes for h in host)
    out_bytes = args.images * 3 * 224 * 224 * 4
    level = 1 / 255 / min(OPENAI_STD)
    ref = preprocess_reference(host[:8], cfg)
    rows = []
    for name, fn in (("clipfast fused kernel", clipfast_fn), ("torchvision GPU", torchvision_fn)):
        t = timeit(fn, args.repeats, args.warmup)
        fidelity = float(np.abs(fn()[:8].float().cpu().numpy() - ref).max() / level)
        rows.append({
            "bench": "preprocess", "impl": name, "images": args.images,
            "median_ms": t["median_s"] * 1e3, "p90_ms": t["p90_s"] * 1e3,
            "images_per_s": args.images / t["median_s"],
            "GB_per_s": (in_bytes + out_bytes) / t["median_s"] / 1e9,
            "max_levels_vs_pillow": fidelity,
        })
    return rows


def bench_attention(args, device) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    from clipfast.kernels import attention_gpu, attention_path

    dtype = getattr(torch, args.dtype)
    rows = []
    for name, heads, tokens, head_dim, causal in ATTENTION_SHAPES:
        b = args.batch
        q, k, v = (torch.randn(b, heads, tokens, head_dim, device=device, dtype=dtype)
                   for _ in range(3))
        flops = 4 * b * heads * tokens * tokens * head_dim * (0.5 if causal else 1.0)
        for impl, fn in (
            ("clipfast", lambda q=q, k=k, v=v, c=causal: attention_gpu(q, k, v, causal=c)),
            ("torch SDPA", lambda q=q, k=k, v=v, c=causal: F.scaled_dot_product_attention(
                q, k, v, is_causal=c)),
        ):
            t = timeit(fn, args.repeats, args.warmup)
            rows.append({
                "bench": "attention", "shape": name, "impl": impl,
                "batch_heads_tokens_dim": [b, heads, tokens, head_dim], "causal": causal,
                "dtype": args.dtype, "path": attention_path(tokens, head_dim),
                "median_us": t["median_s"] * 1e6, "p90_us": t["p90_s"] * 1e6,
                "TFLOP_per_s": flops / t["median_s"] / 1e12,
            })
    return rows


def _table(header: list[str], cells: list[list[str]]) -> list[str]:
    """The lines of a markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in cells)]


def markdown(rows: list[dict[str, Any]], gpu: str) -> str:
    lines = [f"# clipfast kernels on {gpu}", ""]
    pre = [r for r in rows if r["bench"] == "preprocess"]
    if pre:
        lines += _table(
            ["preprocessing (224, bicubic, mixed sizes)", "images/s", "GB/s", "median ms",
             "p90 ms", "max levels vs Pillow"],
            [[r["impl"], f"{r['images_per_s']:.0f}", f"{r['GB_per_s']:.1f}",
              f"{r['median_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['max_levels_vs_pillow']:.1f}"]
             for r in pre])
        lines.append("")
    att = [r for r in rows if r["bench"] == "attention"]
    if att:
        lines += _table(
            ["attention shape", "(B, H, T, D)", "impl", "path", "median us", "p90 us",
             "TFLOP/s"],
            [[f"{r['shape']}{' causal' if r['causal'] else ''}",
              str(tuple(r["batch_heads_tokens_dim"])), r["impl"], r["path"],
              f"{r['median_us']:.1f}", f"{r['p90_us']:.1f}", f"{r['TFLOP_per_s']:.1f}"]
             for r in att])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", choices=["all", "preprocess", "attention"], default="all")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--images", type=int, default=64, help="preprocessing batch size")
    ap.add_argument("--batch", type=int, default=32, help="attention batch size")
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)

    import torch

    from clipfast.kernels import kernels_available

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark", file=sys.stderr)
        return 2
    ok, reason = kernels_available()
    if not ok:
        print(f"kernels not built: {reason}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device)
    rows: list[dict[str, Any]] = []
    if args.what in ("all", "preprocess"):
        rows += bench_preprocess(args, device)
    if args.what in ("all", "attention"):
        rows += bench_attention(args, device)

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    slug = gpu.replace(" ", "_").replace("/", "_")
    meta = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
            "library": reason, "python": platform.python_version(), "args": {
                k: str(v) for k, v in vars(args).items()}}
    (args.out / f"kernels-{slug}-{stamp}.json").write_text(
        json.dumps({"meta": meta, "results": rows}, indent=2))
    table = markdown(rows, gpu)
    (args.out / f"kernels-{slug}-{stamp}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
