"""Fixtures of the pytest-benchmark suite. NOT part of the CI test run (pyproject's testpaths is
``tests``); run it on purpose, on a quiet machine::

    pip install -e ".[export,bench]"
    pytest benchmarks/ --benchmark-only --benchmark-group-by=group
    pytest benchmarks/ -k tokenize --benchmark-json tokenize.json

The towers come from ``CLIPFAST_BENCH_ARTIFACT`` (an artifact directory) when set; otherwise
ViT-B-32 with random weights is exported once into ``CLIPFAST_BENCH_CACHE`` (default
``~/.cache/clipfast/bench``) and reused. Weights do not change speed, so random weights measure
the real architecture. ``clipfast bench`` is the end-to-end tool with percentiles, the torch
baseline and reports; this suite times the parts one by one.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    """Name the CPU's ISA level (AVX2, AVX-512 VNNI, AMX, aarch64, ...) and its relevant flags in
    pytest-benchmark's saved machine info: int8 kernels and their speed depend on it."""
    from clipfast.cpu import host_cpu

    machine_info["clipfast_cpu"] = host_cpu().to_dict()


def _cache_dir() -> Path:
    default = Path.home() / ".cache" / "clipfast" / "bench"
    return Path(os.environ.get("CLIPFAST_BENCH_CACHE", default))


@pytest.fixture(scope="session")
def bench_artifact() -> Path:
    """An artifact directory: $CLIPFAST_BENCH_ARTIFACT, or a cached ViT-B-32 export."""
    given = os.environ.get("CLIPFAST_BENCH_ARTIFACT")
    if given:
        return Path(given)
    out = _cache_dir() / "vit-b-32-random"
    if not (out / "manifest.json").is_file():
        try:
            from clipfast.export.pipeline import ExportOptions, run_export
        except ImportError as e:
            pytest.skip(f"no artifact: set CLIPFAST_BENCH_ARTIFACT or install the export "
                        f"extras to build one ({e})")
        out.parent.mkdir(parents=True, exist_ok=True)
        run_export(ExportOptions(model="ViT-B-32", pretrained="none", out=out, overwrite=True,
                                 progress=False))
    return out


@pytest.fixture(scope="session")
def manifest(bench_artifact):
    from clipfast.artifact.manifest import load_manifest

    return load_manifest(bench_artifact, verify_checksums=False)


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A real photograph (uint8 (H, W, 3)), resized per benchmark to the size under test."""
    try:
        from skimage import data

        return data.astronaut()
    except ImportError:  # scikit-image is a test extra; a smooth synthetic image will do
        yy, xx = np.mgrid[0:512, 0:512]
        return np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
