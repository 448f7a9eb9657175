"""Image preprocessing per input size: CPU (Pillow path of clipfast.inputs.preprocess, from a
decoded
array and from JPEG bytes) and GPU (the fused csrc kernel through clipfast.kernels).

Sizes are what users feed: a thumbnail, web images, a Full-HD frame, a 12 MP phone photo.
Configs are the two real ones that differ most: open_clip ViT-B-32 (224, shortest side,
bicubic, crop) and ALIGN (289, squash to 346, bilinear, crop).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from clipfast.inputs.preprocess import PreprocessConfig, preprocess_image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIGS = {
    "openclip-224": PreprocessConfig(image_size=(224, 224), resize_size=224,
                                     interpolation="bicubic", mean=OPENAI_MEAN, std=OPENAI_STD),
    "align-289": PreprocessConfig(image_size=(289, 289), resize_mode="squash",
                                  resize_size=(346, 346), interpolation="bilinear",
                                  crop_rounding="floor", rescale=1 / 127.5, offset=-1.0),
}
SIZES = [(256, 256), (480, 640), (1080, 1920), (3024, 4032)]


def _sized(photo: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(photo).resize((hw[1], hw[0]), Image.Resampling.BICUBIC))


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_cpu_preprocess_array(benchmark, photo, size, config):
    """uint8 (H, W, 3) -> float32 (3, h, w): resize, crop, normalise."""
    img = _sized(photo, size)
    benchmark.group = f"preprocess cpu {config}"
    benchmark.extra_info["megapixels"] = round(size[0] * size[1] / 1e6, 2)
    out = benchmark(preprocess_image, img, CONFIGS[config])
    assert out.shape == (3, *CONFIGS[config].image_size)


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_cpu_decode_and_preprocess_jpeg(benchmark, photo, size):
    """JPEG bytes -> float32 (3, 224, 224): what a server does per request."""
    buf = io.BytesIO()
    Image.fromarray(_sized(photo, size)).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    benchmark.group = "decode + preprocess cpu openclip-224"
    benchmark.extra_info["jpeg_bytes"] = len(data)
    out = benchmark(preprocess_image, data, CONFIGS["openclip-224"])
    assert out.shape == (3, 224, 224)


def _gpu_or_skip():
    torch = pytest.importorskip("torch", reason="GPU preprocessing needs torch with CUDA")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible to torch")
    from clipfast.kernels import kernels_available

    ok, reason = kernels_available()
    if not ok:
        pytest.skip(f"clipfast CUDA kernels not loaded: {reason}")
    return torch


@pytest.mark.gpu
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_gpu_preprocess_batch(benchmark, photo, size, config):
    """A batch of 32 uint8 images already on the device -> float32 (32, 3, h, w) by the fused
    kernel; synchronised, so the time is the kernel's, not the launch's."""
    torch = _gpu_or_skip()
    from clipfast.kernels import preprocess_gpu

    imgs = [torch.from_numpy(_sized(photo, size)).cuda() for _ in range(32)]
    cfg = CONFIGS[config]

    def run():
        out = preprocess_gpu(imgs, cfg)
        torch.cuda.synchronize()
        return out

    benchmark.group = f"preprocess gpu {config} (batch 32)"
    benchmark.extra_info["images"] = 32
    out = benchmark.pedantic(run, rounds=20, warmup_rounds=3)
    assert tuple(out.shape) == (32, 3, *cfg.image_size)
