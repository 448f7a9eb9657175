"""The Engine's GPU preprocessing (clipfast.inputs.gpu_preprocess) on CPU.

Without the kernel library it says why (and the Engine says which path it took). With the
kernel bindings replaced by the numpy reference they are checked against (and nvJPEG by
Pillow's decoder), its routing is what is under test: which items go to nvJPEG and which to the
CPU loader, per-item failures, order, and pixels equal to the CPU path's. The kernels and
nvJPEG themselves are tested on a GPU in test_kernels.py.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import clipfast
import clipfast.kernels
from clipfast.errors import BackendUnavailable, ImageLoadError
from clipfast.inputs.preprocess import PreprocessConfig, preprocess_image
from clipfast.kernels import _lib
from clipfast.kernels.preprocess import preprocess_path, preprocess_reference

torch = pytest.importorskip("torch")

CFG = PreprocessConfig(image_size=(32, 32), resize_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)


# --------------------------------------------------------------------------- saying why


def test_without_the_kernel_library_it_says_why(fresh_loader):
    from clipfast.inputs.gpu_preprocess import GpuPreprocessor

    fresh_loader.setenv("CLIPFAST_DISABLE_KERNELS", "1")
    with pytest.raises(BackendUnavailable,
                       match="GPU preprocessing off: .*CLIPFAST_DISABLE_KERNELS=1"):
        GpuPreprocessor(CFG, "cuda")
    _lib._reset_for_tests()
    fresh_loader.delenv("CLIPFAST_DISABLE_KERNELS")
    fresh_loader.setenv("CLIPFAST_KERNELS_LIB", "/nonexistent/libclipfast_kernels.so")
    with pytest.raises(BackendUnavailable, match="GPU preprocessing off: .*not built"):
        GpuPreprocessor(CFG, "cuda")


def test_one_dispatch_point_names_each_reason(monkeypatch):
    assert preprocess_path(CFG, "cpu") == ("reference", "device 'cpu' is not a CUDA device")
    nearest = PreprocessConfig(image_size=(8, 8), interpolation="nearest")
    path, why = preprocess_path(nearest, "cuda")
    assert path == "reference" and "interpolation 'nearest'" in why
    monkeypatch.setattr(_lib, "kernels_available", lambda: (False, "library says no"))
    assert preprocess_path(CFG, "cuda") == ("reference", "library says no")
    monkeypatch.setattr(_lib, "kernels_available", lambda: (True, "loaded"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert preprocess_path(CFG, "cuda") == ("reference", "no CUDA device visible to PyTorch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert preprocess_path(CFG, "cuda") == ("kernel", "csrc kernel via torch")


def _on_cuda(monkeypatch):
    """Engines built after this see their backend on CUDA (the towers are ONNX Runtime's)."""
    import clipfast.engine as engine_mod
    from clipfast.backends import Backend

    real = engine_mod.resolve_backend

    class OnCuda(Backend):
        name, device = "stand-in", "cuda"

        def __init__(self, inner):
            self.inner = inner

        def run_image(self, pixels):
            return self.inner.run_image(np.asarray(pixels, dtype=np.float32))

        def run_text(self, feed):
            return self.inner.run_text(feed)

        def describe(self):
            return {"backend": self.name}

    def resolve(*a, **kw):
        backend, fallbacks = real(*a, **kw)
        return OnCuda(backend), fallbacks

    monkeypatch.setattr(engine_mod, "resolve_backend", resolve)


def test_engine_says_which_preprocessing_path_it_took(vitb32_artifact, fresh_loader):
    cpu = clipfast.Engine(vitb32_artifact, backend="onnxruntime", self_check=False)
    assert cpu.describe()["preprocess"] == "cpu (Pillow): the towers run on the CPU"
    fresh_loader.setenv("CLIPFAST_DISABLE_KERNELS", "1")
    _on_cuda(fresh_loader)
    eng = clipfast.Engine(vitb32_artifact, backend="onnxruntime", self_check=False)
    reason = dict(eng.fallbacks)["gpu-preprocess"]
    assert "CLIPFAST_DISABLE_KERNELS=1" in reason
    assert eng.describe()["preprocess"] == f"cpu (Pillow): {reason}"
    assert eng._gpu_preprocess is None


# --------------------------------------------------------------------------- stand-in kernels


class _PillowJpeg:
    """nvJPEG stand-in: Pillow's decoder, packed as the binding packs (interleaved RGB, gray
    replicated); records what it was asked to decode."""

    def __init__(self, device=None, fail_on: bytes | None = None):
        self.seen: list[list[bytes]] = []
        self.fail_on = fail_on

    def decode(self, datas):
        self.seen.append(list(datas))
        if self.fail_on is not None and self.fail_on in datas:
            raise clipfast.kernels.KernelError("nvJPEG: bad stream 1", 3)
        arrays = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in datas]
        packed = torch.from_numpy(np.concatenate([a.reshape(-1) for a in arrays]))
        return packed, [a.shape for a in arrays]


def _reference_preprocess_gpu(images, cfg, *, device=None, dtype="float32"):
    return torch.from_numpy(preprocess_reference([np.asarray(a) for a in images], cfg))


def _reference_preprocess_packed_gpu(packed, shapes, cfg, *, dtype="float32", offsets=None):
    flat, pos, arrays = packed.numpy(), 0, []
    for h, w, c in shapes:
        arrays.append(flat[pos:pos + h * w * c].reshape(h, w, c))
        pos += h * w * c
    return torch.from_numpy(preprocess_reference(arrays, cfg))


@pytest.fixture
def stand_in_kernels(monkeypatch):
    """The library 'loads', torch 'sees' a GPU, the bindings are the numpy reference."""
    monkeypatch.setattr(_lib, "kernels_available", lambda: (True, "stand-in"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(clipfast.kernels, "preprocess_gpu", _reference_preprocess_gpu)
    monkeypatch.setattr(clipfast.kernels, "preprocess_packed_gpu",
                        _reference_preprocess_packed_gpu)
    decoders = []

    def decoder(device):
        decoders.append(_PillowJpeg(device))
        return decoders[-1]

    monkeypatch.setattr(clipfast.kernels, "JpegDecoder", decoder)
    return decoders


def _encoded(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(h: int, w: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return img.convert(mode) if mode != "RGB" else img


def _rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    return _encoded(_photo(20, 30, 5), exif=exif)


def _mixed(tmp_path):
    """(items, which of them nvJPEG decodes, which fail) for exif_transpose=True."""
    jpeg_file = tmp_path / "photo.jpg"
    jpeg_file.write_bytes(_encoded(_photo(41, 67, 3)))
    rgba = Image.new("RGBA", (12, 9), (200, 10, 10, 128))
    items = [
        _encoded(_photo(50, 80, 1)),                          # 0 RGB JPEG: nvJPEG
        _encoded(_photo(33, 21, 2), "PNG"),                   # 1 PNG: CPU
        _encoded(_photo(64, 48, 3, "L")),                     # 2 gray JPEG: nvJPEG
        _encoded(_photo(30, 30, 4).convert("CMYK")),          # 3 CMYK JPEG: CPU (Pillow converts)
        _rotated_jpeg(),                                      # 4 EXIF rotation to apply: CPU
        jpeg_file,                                            # 5 JPEG file: nvJPEG
        _photo(7, 5, 6),                                      # 6 PIL image: CPU
        np.asarray(_photo(1, 1, 7)),                          # 7 1x1 uint8 array: CPU
        b"junk",                                              # 8 failure
        _encoded(_photo(300, 17, 8), progressive=True),       # 9 progressive JPEG: nvJPEG
        str(tmp_path / "missing.jpg"),                        # 10 failure
        _encoded(rgba, "PNG"),                                # 11 RGBA PNG: CPU (alpha policy)
        Image.new("RGB", (0, 3)),                             # 12 failure: empty
    ]
    return items, [0, 2, 5, 9], [8, 10, 12]


def _bytes_of(item) -> bytes:
    return item.read_bytes() if hasattr(item, "read_bytes") else bytes(item)


def _cpu_path(items, indices, exif_transpose=True):
    return np.stack([preprocess_image(items[i], CFG, index=i, exif_transpose=exif_transpose)
                     for i in indices])


def _reference_of_cpu_loader(items, indices, exif_transpose=True):
    """The reference on what the CPU loader decodes: what the kernel path must give bitwise."""
    from clipfast.inputs.gpu_preprocess import load_host_image

    arrays = [load_host_image(items[i], i, exif_transpose=exif_transpose,
                              alpha_background=(255, 255, 255)) for i in indices]
    return preprocess_reference(arrays, CFG)


def test_routes_items_and_gives_the_cpu_paths_pixels(stand_in_kernels, tmp_path):
    from clipfast.inputs.gpu_preprocess import GpuPreprocessor

    items, to_nvjpeg, bad = _mixed(tmp_path)
    gp = GpuPreprocessor(CFG, "cuda")
    assert gp.describe() == "gpu (csrc kernel via torch, nvJPEG decode)"
    pixels, good, failures = gp(items, 100, "skip")

    (decoder,) = stand_in_kernels
    assert decoder.seen == [[_bytes_of(items[i]) for i in to_nvjpeg]]  # one batched call
    want_good = [i for i in range(len(items)) if i not in bad]
    assert good == [100 + i for i in want_good]
    assert [f.index for f in failures] == [100 + i for i in bad]
    assert "missing.jpg" in failures[1].item and "empty" in failures[2].error
    assert isinstance(pixels, torch.Tensor) and pixels.dtype == torch.float32
    got = pixels.numpy()
    # bitwise: the reference on the same decoded pixels, in input order
    np.testing.assert_array_equal(got, _reference_of_cpu_loader(items, want_good))
    # the CPU path (Pillow): the kernel's algorithm is Pillow's, within 1 level
    cpu = _cpu_path(items, want_good)
    level = CFG.rescale / min(CFG.std)
    assert np.abs(got - cpu).max() <= level * 1.001


def test_exif_off_sends_the_rotated_jpeg_to_nvjpeg(stand_in_kernels, tmp_path):
    from clipfast.inputs.gpu_preprocess import GpuPreprocessor, jpeg_bytes_for_gpu

    items, to_nvjpeg, bad = _mixed(tmp_path)
    assert jpeg_bytes_for_gpu(items[4], exif_transpose=True) is None
    assert jpeg_bytes_for_gpu(items[4], exif_transpose=False) == items[4]
    gp = GpuPreprocessor(CFG, "cuda", exif_transpose=False)
    pixels, good, _ = gp(items, 0, "skip")
    assert stand_in_kernels[0].seen == [[_bytes_of(items[i]) for i in sorted(to_nvjpeg + [4])]]
    want_good = [i for i in range(len(items)) if i not in bad]
    np.testing.assert_array_equal(pixels.numpy(),
                                  _reference_of_cpu_loader(items, want_good, False))


def test_size_limit_keeps_a_large_jpeg_off_nvjpeg_and_fails_it(stand_in_kernels, tmp_path):
    from clipfast.inputs.gpu_preprocess import GpuPreprocessor

    small = _encoded(_photo(8, 8, 1))
    big = tmp_path / "big.jpg"
    big.write_bytes(_encoded(_photo(200, 200, 2), quality=100))
    gp = GpuPreprocessor(CFG, "cuda", max_bytes=len(small) + 10)
    pixels, good, failures = gp([small, big], 0, "skip")
    assert stand_in_kernels[0].seen == [[small]]
    assert good == [0] and [f.index for f in failures] == [1]
    with pytest.raises(ImageLoadError, match="image 1"):
        gp([small, big], 0, "raise")


def test_a_failed_nvjpeg_batch_is_decoded_on_cpu(stand_in_kernels, tmp_path):
    from clipfast.inputs.gpu_preprocess import GpuPreprocessor

    items, to_nvjpeg, bad = _mixed(tmp_path)
    gp = GpuPreprocessor(CFG, "cuda")
    gp._jpeg = _PillowJpeg(fail_on=_bytes_of(items[2]))
    pixels, good, failures = gp(items, 0, "skip")
    want_good = [i for i in range(len(items)) if i not in bad]
    assert good == want_good and [f.index for f in failures] == bad
    np.testing.assert_array_equal(pixels.numpy(), _reference_of_cpu_loader(items, want_good))


def test_without_nvjpeg_every_item_goes_through_the_cpu_loader(stand_in_kernels, monkeypatch,
                                                                tmp_path):
    from clipfast.inputs.gpu_preprocess import GpuPreprocessor

    def no_nvjpeg(device):
        raise BackendUnavailable("libnvjpeg.so.12 not found")

    monkeypatch.setattr(clipfast.kernels, "JpegDecoder", no_nvjpeg)
    items, _, bad = _mixed(tmp_path)
    gp = GpuPreprocessor(CFG, "cuda")
    assert gp.describe() == ("gpu (csrc kernel via torch; nvJPEG unavailable, JPEGs decoded on "
                             "CPU: libnvjpeg.so.12 not found)")
    pixels, good, failures = gp(items, 0, "skip")
    want_good = [i for i in range(len(items)) if i not in bad]
    assert good == want_good and [f.index for f in failures] == bad
    np.testing.assert_array_equal(pixels.numpy(), _reference_of_cpu_loader(items, want_good))


def test_raise_names_the_first_bad_item(stand_in_kernels, tmp_path):
    from clipfast.inputs.gpu_preprocess import GpuPreprocessor

    items, _, _ = _mixed(tmp_path)
    gp = GpuPreprocessor(CFG, "cuda")
    with pytest.raises(ImageLoadError, match="image 18") as info:
        gp(items, 10, "raise")
    assert info.value.index == 18


def test_engine_with_stand_in_kernels_matches_the_cpu_engine(vitb32_artifact, stand_in_kernels,
                                                             monkeypatch, tmp_path):
    """End to end through the Engine: GPU path chosen and said, embeddings as on the CPU path
    (the reference equals Pillow within a level; the tower turns that into float noise)."""
    items, _, bad = _mixed(tmp_path)  # chunks of 5: each has a good image (an empty chunk's
    # zero-row tensor would be allocated on the CUDA device, which this machine lacks)
    ref = clipfast.Engine(vitb32_artifact, backend="onnxruntime", batch_size=5,
                          self_check=False)
    _on_cuda(monkeypatch)
    eng = clipfast.Engine(vitb32_artifact, backend="onnxruntime", batch_size=5,
                          self_check=False)
    assert eng.describe()["preprocess"] == "gpu (csrc kernel via torch, nvJPEG decode)"
    assert "gpu-preprocess" not in dict(eng.fallbacks)
    got = eng.encode_images(items, errors="skip")
    want = ref.encode_images(items, errors="skip")
    assert got.indices.tolist() == want.indices.tolist()
    assert got.failures == want.failures and [f.index for f in got.failures] == bad
    np.testing.assert_allclose(got.embeddings, want.embeddings, atol=1e-3)
