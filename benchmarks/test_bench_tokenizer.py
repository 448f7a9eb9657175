"""Tokenization: clipfast's torch-free tokenizer against the source's own (open_clip /
transformers), same captions, same batch, same run."""

from __future__ import annotations

import pytest

from clipfast.artifact.samples import CAPTIONS
from clipfast.inputs.tokenizer import Tokenizer

BATCHES = [1, 32, 1024]


def _captions(n: int) -> list[str]:
    # Distinct strings, so no tokenizer cache turns the benchmark into a dictionary lookup.
    return [f"{CAPTIONS[i % len(CAPTIONS)]} number {i}" for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer(manifest):
    cfg = manifest.spec.tokenizer
    return Tokenizer(cfg, manifest.path(cfg.file))


@pytest.fixture(scope="module")
def reference_tokenize(manifest):
    """The source's own tokenizer (needs the export extras), or None."""
    try:
        from clipfast.export.sources import load_source_from_spec
    except ImportError:
        return None
    return load_source_from_spec(manifest.spec.source).reference_tokenize


@pytest.mark.parametrize("batch", BATCHES)
def test_tokenize_clipfast(benchmark, tokenizer, batch):
    texts = _captions(batch)
    benchmark.group = f"tokenize batch {batch}"
    out = benchmark(tokenizer, texts)
    assert len(next(iter(out.values()))) == batch


@pytest.mark.parametrize("batch", BATCHES)
def test_tokenize_reference(benchmark, reference_tokenize, batch):
    if reference_tokenize is None:
        pytest.skip("the reference tokenizer needs the export extras (pip install "
                    "'clipfast[export]')")
    texts = _captions(batch)
    benchmark.group = f"tokenize batch {batch}"
    out = benchmark(reference_tokenize, texts)
    assert len(next(iter(out.values()))) == batch
