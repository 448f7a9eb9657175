"""The torch backend's kernel-attention swap computes what the source does (CPU: the dispatcher
runs the torch reference; the CUDA kernel itself is tested in tests/test_kernels.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipfast.backends.torch_attention import KernelSelfAttention, kernel_attention_tower
from clipfast.export.sources_openclip import OpenClipImageTower, OpenClipTextTower


@pytest.fixture(scope="module")
def small_model():
    import open_clip

    torch.manual_seed(0)
    torch.backends.mha.set_fastpath_enabled(False)
    return open_clip.create_model("ViT-S-32", pretrained=None).eval()


def test_swapped_towers_match_the_source(small_model):
    image, text = OpenClipImageTower(small_model), OpenClipTextTower(small_model)
    k_image, reason = kernel_attention_tower(image, "image")
    assert reason is None
    k_text, reason = kernel_attention_tower(text, "text")
    assert reason is None
    assert any(isinstance(m, KernelSelfAttention) for m in k_text.modules())
    assert not any(isinstance(m, KernelSelfAttention) for m in text.modules()), "source changed"
    x = torch.randn(3, 3, 224, 224)
    ids = torch.randint(1, 49000, (3, 77), dtype=torch.int32)
    ids[:, 0], ids[0, 5], ids[1, 20], ids[2, 76] = 49406, 49407, 49407, 49407
    ids[0, 6:] = 0
    with torch.no_grad():
        np.testing.assert_allclose(k_image(x).numpy(), image(x).numpy(), atol=2e-5)
        np.testing.assert_allclose(k_text(ids).numpy(), text(ids).numpy(), atol=2e-5)
