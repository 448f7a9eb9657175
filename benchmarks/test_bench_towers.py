"""Each tower per backend and batch size: onnxruntime, tensorrt (skipped until it exists or
where it cannot run) and torch, the eager source model, grouped so that pytest-benchmark shows
them side by side. ``extra_info`` carries items/s and the GFLOP/s reached (FLOPs counted from
the ONNX graph by clipfast.bench.count_flops)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from clipfast.errors import ClipfastError

BACKENDS = ["onnxruntime", "tensorrt", "torch"]
BATCHES = [1, 8, 32]
DEVICE = os.environ.get("CLIPFAST_BENCH_DEVICE", "cpu")
_engines: dict[str, object] = {}


def _engine(artifact, backend: str):
    if backend not in _engines:
        import clipfast

        try:
            _engines[backend] = clipfast.Engine(artifact, backend=backend, device=DEVICE,
                                                fallback=False, batch_size=max(BATCHES),
                                                verify_checksums=False)
        except (ClipfastError, ImportError) as e:
            _engines[backend] = e
    engine = _engines[backend]
    if isinstance(engine, Exception):
        pytest.skip(f"backend {backend} cannot run here: {engine}")
    return engine


@pytest.fixture(scope="module")
def flops(bench_artifact, manifest):
    """GFLOP per item of each tower, or None without onnx."""
    try:
        from clipfast.bench import count_flops, tower_shapes

        return {t: count_flops(manifest.path(manifest.spec.tower(t).file),
                               tower_shapes(manifest, t)).total / 1e9 for t in ("image", "text")}
    except ImportError:
        return {"image": None, "text": None}


@pytest.fixture(scope="module")
def pixels(manifest):
    from clipfast.artifact.samples import sample_images
    from clipfast.inputs.preprocess import preprocess_batch

    base = preprocess_batch(sample_images(12), manifest.spec.preprocess)
    return np.ascontiguousarray(np.resize(base, (max(BATCHES), *base.shape[1:])))


@pytest.fixture(scope="module")
def tokens(manifest):
    from clipfast.artifact.samples import CAPTIONS
    from clipfast.inputs.tokenizer import Tokenizer

    texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(max(BATCHES))]
    cfg = manifest.spec.tokenizer
    return Tokenizer(cfg, manifest.path(cfg.file))(texts)


def _record(benchmark, batch: int, gflop: float | None) -> None:
    median = benchmark.stats.stats.median
    benchmark.extra_info["items_per_s"] = round(batch / median, 2)
    if gflop:
        benchmark.extra_info["gflop_per_item"] = round(gflop, 4)
        benchmark.extra_info["gflops"] = round(gflop * batch / median, 2)


def _sync():
    if DEVICE == "cuda":
        import torch

        torch.cuda.synchronize()


def _bench_tower(benchmark, engine, tower: str, x, batch: int, gflop: float | None) -> None:
    """Time ``engine.run_{tower}_tower(x)`` (synchronised on CUDA) and record items/s."""
    run_tower = engine.run_image_tower if tower == "image" else engine.run_text_tower

    def run():
        out = run_tower(x)
        _sync()
        return out

    benchmark.group = f"{tower} tower batch {batch}"
    out = benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    assert out.shape == (batch, engine.embed_dim)
    _record(benchmark, batch, gflop)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", BATCHES)
def test_image_tower(benchmark, bench_artifact, pixels, flops, backend, batch):
    engine = _engine(bench_artifact, backend)
    _bench_tower(benchmark, engine, "image", pixels[:batch], batch, flops["image"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", BATCHES)
def test_text_tower(benchmark, bench_artifact, tokens, flops, backend, batch):
    engine = _engine(bench_artifact, backend)
    x = {k: v[:batch] for k, v in tokens.items()}
    _bench_tower(benchmark, engine, "text", x, batch, flops["text"])
