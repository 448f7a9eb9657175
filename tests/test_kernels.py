"""csrc/ kernels beside their references (clipfast.kernels).

- CPU (always): the numpy preprocessing reference against Pillow and clipfast.inputs.preprocess, the
  attention references against torch's SDPA, the loader's switches and its promise not to
  import torch or initialise CUDA.
- ``build`` (needs nvcc; slow): CMake builds libclipfast_kernels.so and its host-side checks
  answer through ctypes; the kernels themselves run on the CPU through csrc/emu/ (one OS thread
  per CUDA thread) and are compared with the references.
- ``gpu`` (needs a CUDA device and the built library): the kernels on the device.

Each comparison computes the reference first, then the kernel, on real CLIP shapes (tokens 50,
77, 197, 257, 577; head dims 64, 80, 128) and odd ones.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipfast.errors import BackendUnavailable
from clipfast.inputs.preprocess import PreprocessConfig, preprocess_batch
from clipfast.kernels import _lib
from clipfast.kernels.attention import attention, attention_reference, attention_torch_reference
from clipfast.kernels.preprocess import (
    _params,
    plan_geometry,
    preprocess,
    preprocess_reference,
    resize_reference,
    vertical_first,
)

ROOT = Path(__file__).resolve().parents[1]
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
               "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX,
               "hamming": Image.Resampling.HAMMING}
CLIP_TOKENS = (50, 77, 197, 257, 577, 33)
HEAD_DIMS = (64, 80, 128)


def _odd_images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {f"{h}x{w}": rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            for h, w in ((1, 1), (7, 5), (2000, 30), (769, 513))}


def _configs() -> list[PreprocessConfig]:
    """Every resize mode with the settings real checkpoints use, plus odd ones."""
    return [
        # open_clip / OpenAI CLIP: shortest side, center crop, bicubic.
        PreprocessConfig(image_size=(224, 224), resize_size=224, mean=OPENAI_MEAN,
                         std=OPENAI_STD),
        # ALIGN: resize 346, crop 289, bilinear, [-1, 1], floor crop offsets (transformers).
        PreprocessConfig(image_size=(289, 289), resize_size=346, interpolation="bilinear",
                         rescale=1 / 127.5, offset=-1.0, crop_rounding="floor"),
        # SigLIP: squash, mean / std 0.5.
        PreprocessConfig(image_size=(256, 256), resize_mode="squash", resize_size=(256, 256),
                         crop=False, mean=(0.5,) * 3, std=(0.5,) * 3),
        # open_clip "longest": fit inside, pad with a grey fill.
        PreprocessConfig(image_size=(224, 224), resize_mode="longest", resize_size=(224, 224),
                         fill_color=114, mean=OPENAI_MEAN, std=OPENAI_STD),
        # Non-square target, ResizeKeepRatio, lanczos.
        PreprocessConfig(image_size=(70, 90), resize_size=(70, 90), interpolation="lanczos"),
    ]


def _level(cfg: PreprocessConfig) -> float:
    """One uint8 level in normalised units (per channel, the largest)."""
    return abs(cfg.rescale) / min(abs(s) for s in cfg.std)


# --------------------------------------------------------------------------- CPU: resize


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_resize_reference_equals_pillow(photos, interpolation):
    """Pillow's Image.resize (reducing_gap=None) vs the numpy twin of the kernel, up and down."""
    images = {**photos, **_odd_images()}
    sizes = [(224, 224), (37, 301), (1000, 13), (1, 1), (3, 7), (289, 400)]
    worst, diff_pixels, total = 0, 0, 0
    for name, img in images.items():
        for size in sizes:
            ref = np.asarray(Image.fromarray(img).resize(
                size[::-1], PIL_FILTERS[interpolation], reducing_gap=None))
            got = resize_reference(img, size, interpolation)
            assert got.shape == ref.shape, (name, size)
            d = np.abs(got.astype(np.int16) - ref)
            assert d.max() <= 1, f"{name} -> {size}: max diff {d.max()} levels"
            worst = max(worst, int(d.max()))
            diff_pixels += int((d > 0).sum())
            total += d.size
    # The integer arithmetic is Pillow's own: in practice every pixel is identical.
    assert diff_pixels <= total * 1e-4, f"{diff_pixels} of {total} values differ (worst {worst})"


@pytest.mark.parametrize("interpolation", ["lanczos", "box", "hamming"])
def test_resize_reference_other_filters(photos, interpolation):
    img = photos["chelsea"]
    for size in [(224, 224), (600, 901), (31, 400)]:
        ref = np.asarray(Image.fromarray(img).resize(size[::-1], PIL_FILTERS[interpolation],
                                                     reducing_gap=None))
        assert np.abs(resize_reference(img, size, interpolation).astype(np.int16) - ref).max() <= 1


def test_vertical_first_follows_pillow():
    """Pillow 13 runs the vertical pass first when the height shrinks > 2x more than the width;
    the reference (and the kernel, through the flag) must use the same order."""
    # (512, 512) -> (37, 301): dh = 475 > 2 * 211, both passes needed.
    from clipfast.kernels.preprocess import pillow_vertical_first_rule

    expected = pillow_vertical_first_rule()
    assert vertical_first(512, 512, 37, 301) is expected
    assert vertical_first(512, 512, 224, 300) is False  # dh 288 < 2 * 212
    assert vertical_first(512, 512, 37, 512) is False  # one pass only
    assert vertical_first(20, 500, 10, 400) is False  # dh 10 < 2 * 100


# --------------------------------------------------------------------------- CPU: pipeline


@pytest.mark.parametrize("cfg", _configs(), ids=lambda c: f"{c.resize_mode}-{c.interpolation}")
def test_preprocess_reference_matches_cpu_path(photos, cfg):
    """The kernel's algorithm in numpy equals clipfast.inputs.preprocess (Pillow) within 1 level."""
    odd = _odd_images()
    images = [photos["astronaut"], photos["camera"], photos["coffee"], odd["7x5"], odd["1x1"],
              odd["2000x30"], odd["769x513"]]
    ref = preprocess_batch(images, cfg)
    got = preprocess_reference(images, cfg)
    assert got.shape == ref.shape == (len(images), 3, *cfg.image_size)
    assert got.dtype == np.float32
    err = np.abs(got - ref)
    assert err.max() <= _level(cfg) * 1.0001, f"max {err.max() / _level(cfg):.2f} levels"
    assert err.mean() <= _level(cfg) * 0.01


@pytest.mark.parametrize(
    ("mode", "rounding", "size", "expected"),
    [
        # shortest: a 301 x 200 (h x w) image is not resized for resize_size 200; crop 200 rows
        # from 301: d = 101, torchvision round(50.5) = 50 (half to even), floor 50.
        ("shortest", "round", (301, 200), (50, 0)),
        ("shortest", "floor", (301, 200), (50, 0)),
        # d = 103: round(51.5) = 52, floor 51.
        ("shortest", "round", (303, 200), (52, 0)),
        ("shortest", "floor", (303, 200), (51, 0)),
        # longest: 200 x 151 fits 200 x 200 unresized; pad 49 columns: torchvision puts
        # 49 // 2 = 24 before, transformers-style floor ceil(49 / 2) = 25.
        ("longest", "round", (200, 151), (0, -24)),
        ("longest", "floor", (200, 151), (0, -25)),
    ],
)
def test_crop_pad_placement(mode, rounding, size, expected):
    """Window offsets follow PreprocessConfig's rules; pixels land exactly there."""
    h, w = size
    cfg = PreprocessConfig(image_size=(200, 200), resize_mode=mode, resize_size=200 if mode ==
                           "shortest" else (200, 200), crop_rounding=rounding, fill_color=7,
                           rescale=1.0)
    rh, rw, top, left = plan_geometry(h, w, cfg)
    assert (rh, rw) == (h, w) and (top, left) == expected
    # Rows carry their index, columns their index + 100: placement is readable off the output.
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[:, :, 0] = (np.arange(h) % 256)[:, None]
    img[:, :, 1] = ((np.arange(w) + 100) % 256)[None, :]
    out = preprocess_reference([img], cfg)[0]  # rescale 1, mean 0, std 1: raw levels
    for oy in (0, 57, 199):
        for ox in (0, 13, 199):
            ry, rx = oy + top, ox + left
            if 0 <= ry < h and 0 <= rx < w:
                assert out[0, oy, ox] == ry % 256 and out[1, oy, ox] == (rx + 100) % 256
            else:
                assert out[0, oy, ox] == out[1, oy, ox] == out[2, oy, ox] == 7


def test_gray_images_replicate_to_rgb(photos):
    cfg = _configs()[0]
    gray = photos["camera"]
    out = preprocess_reference([gray, gray[:, :, None], np.repeat(gray[:, :, None], 3, 2)], cfg)
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])


def test_preprocess_dispatcher_cpu_is_reference(photos):
    cfg = _configs()[0]
    imgs = [photos["astronaut"], photos["rocket"]]
    np.testing.assert_array_equal(preprocess(imgs, cfg, "cpu"), preprocess_reference(imgs, cfg))


def test_reference_rejects_bad_inputs():
    cfg = _configs()[0]
    with pytest.raises(ValueError, match=r"images\[1\] must be \(H, W\)"):
        preprocess_reference([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 4), np.uint8)], cfg)
    with pytest.raises(ValueError, match="interpolation 'nearest' is not implemented"):
        preprocess_reference([np.zeros((4, 4, 3), np.uint8)],
                             PreprocessConfig(image_size=(2, 2), interpolation="nearest"))


# --------------------------------------------------------------------------- CPU: attention


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_attention_reference_matches_sdpa(head_dim, causal):
    """float64 numpy reference vs torch's float32 scaled_dot_product_attention."""
    import torch

    gen = torch.Generator().manual_seed(head_dim)
    for tokens in CLIP_TOKENS:
        q, k, v = (torch.randn(1, 2, tokens, head_dim, generator=gen) for _ in range(3))
        ref = attention_reference(q.numpy(), k.numpy(), v.numpy(), causal=causal)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        np.testing.assert_allclose(sdpa.numpy(), ref, rtol=1e-4, atol=2e-5,
                                   err_msg=f"tokens {tokens}")
        twin = attention_torch_reference(q, k, v, causal=causal)
        np.testing.assert_allclose(twin.numpy(), ref, rtol=1e-4, atol=2e-5)


def test_attention_dispatcher_cpu_and_strided():
    """numpy -> float64 reference; torch CPU and strided tensors -> the torch twin."""
    import torch

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 77, 3, 64, generator=gen)  # (batch, tokens, heads, head_dim)
    q = x.transpose(1, 2)  # strided (batch, heads, tokens, head_dim) view
    assert not q.is_contiguous()
    out = attention(q, q, q, causal=True, scale=0.1)
    ref = attention_reference(q.numpy(), q.numpy(), q.numpy(), causal=True, scale=0.1)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=2e-5)
    np.testing.assert_array_equal(attention(q.numpy(), q.numpy(), q.numpy(), True, 0.1), ref)


# --------------------------------------------------------------------------- CPU: loader


def test_loader_respects_disable(fresh_loader, caplog):
    fresh_loader.setenv("CLIPFAST_DISABLE_KERNELS", "1")
    with caplog.at_level(logging.INFO, logger="clipfast.kernels"):
        ok, reason = _lib.kernels_available()
        assert _lib.kernels_available() == (ok, reason)  # decided once
    assert not ok and "CLIPFAST_DISABLE_KERNELS=1" in reason
    assert _lib.load_library() is None
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1
    with pytest.raises(BackendUnavailable, match="CLIPFAST_DISABLE_KERNELS"):
        _lib.require_library()


def test_loader_reports_missing_and_broken_library(fresh_loader, tmp_path, caplog):
    fresh_loader.setenv("CLIPFAST_KERNELS_LIB", str(tmp_path / "nope.so"))
    fresh_loader.delenv("CLIPFAST_DISABLE_KERNELS", raising=False)
    ok, reason = _lib.kernels_available()
    assert not ok and "not built" in reason and "nope.so" in reason and "cmake" in reason

    _lib._reset_for_tests()
    caplog.clear()
    bad = tmp_path / "libclipfast_kernels.so"
    bad.write_bytes(b"not an ELF file")
    fresh_loader.setenv("CLIPFAST_KERNELS_LIB", str(bad))
    with caplog.at_level(logging.WARNING, logger="clipfast.kernels"):
        ok, reason = _lib.kernels_available()
    assert not ok and reason.startswith(f"cannot load {bad}")
    assert [r.levelno for r in caplog.records if r.name == "clipfast.kernels"] == [logging.WARNING]


def test_gpu_entry_points_say_why_without_library(fresh_loader):
    fresh_loader.setenv("CLIPFAST_DISABLE_KERNELS", "1")
    from clipfast.kernels import attention_gpu, preprocess_gpu

    with pytest.raises(BackendUnavailable, match="disabled by CLIPFAST_DISABLE_KERNELS"):
        preprocess_gpu([np.zeros((4, 4, 3), np.uint8)], _configs()[0])
    with pytest.raises(BackendUnavailable, match="disabled by CLIPFAST_DISABLE_KERNELS"):
        attention_gpu(None, None, None)


def test_import_neither_imports_torch_nor_initialises_cuda():
    code = (
        "import sys\n"
        "import numpy as np\n"
        "import clipfast.kernels as k\n"
        "assert 'torch' not in sys.modules, 'import clipfast.kernels imported torch'\n"
        "ok, reason = k.kernels_available()\n"
        "assert 'torch' not in sys.modules, 'kernels_available imported torch'\n"
        "import torch\n"
        "from clipfast.inputs.preprocess import PreprocessConfig\n"
        "k.preprocess([np.zeros((9, 9, 3), np.uint8)], PreprocessConfig(image_size=(4, 4)))\n"
        "print(torch.cuda.is_initialized())\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


# --------------------------------------------------------------------------- build


def _nvcc() -> str | None:
    return os.environ.get("CUDACXX") or shutil.which("nvcc")


def _cuda_include() -> Path | None:
    """The CUDA toolkit's include folder (for the CPU emulator's cuda_fp16.h / cuda_bf16.h)."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = _nvcc()
    if nvcc:
        cands.insert(0, str(Path(nvcc).resolve().parents[1]))
    for c in cands:
        if c and (Path(c) / "include" / "cuda_fp16.h").is_file():
            return Path(c) / "include"
    return None


@pytest.fixture(scope="module")
def built_library(tmp_path_factory) -> Path:
    if _nvcc() is None:
        pytest.skip("nvcc not found (no CUDA compiler): csrc/ cannot be built here")
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found")
    build = tmp_path_factory.mktemp("cmake-build")
    for cmd in (["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"],
                ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)]):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-4000:]}{res.stderr}"
    lib = build / _lib.LIB_NAME
    assert lib.is_file()
    return lib


HOST_CHECKS = r"""
import ctypes, sys
from clipfast.kernels import _lib, kernels_available
ok, reason = kernels_available()
assert ok, reason
lib = _lib.load_library()
print(lib.clipfast_build_info().decode())
p = ctypes.c_void_p(256)  # never dereferenced: the host checks fail first
rc = lib.clipfast_attention(p, p, p, ctypes.c_void_p(4096), 1, 12, 197, 96, 1, 0.125, 0, None)
print(rc, lib.clipfast_last_error().decode())
print(lib.clipfast_attention_path(577, 72), lib.clipfast_last_error().decode())
prm = _lib.PreprocessParams(224, 224, 3, 0, 0, 0, 1 / 255, 0.0, (0, 0, 0), (1, 1, 1), 0.0)
desc = (_lib.ImageDesc * 1)(_lib.ImageDesc(0, 10, 10, 4, 224, 224, 0, 0, 0))
rc = lib.clipfast_preprocess(p, 400, desc, 1, ctypes.byref(prm), p, None)
print(rc, lib.clipfast_last_error().decode())
prm.filter = 0
rc = lib.clipfast_preprocess(p, 400, desc, 1, ctypes.byref(prm), p, None)
print(rc, lib.clipfast_last_error().decode())
import torch
print(torch.cuda.is_initialized())
"""


@pytest.mark.build
def test_cmake_build_and_host_checks(built_library):
    """The library builds, loads through CLIPFAST_KERNELS_LIB, and its host-side checks name the
    argument and the rule (they return before any CUDA call, so no GPU is needed)."""
    env = {**os.environ, "CLIPFAST_KERNELS_LIB": str(built_library), "PYTHONPATH": str(ROOT)}
    env.pop("CLIPFAST_DISABLE_KERNELS", None)
    res = subprocess.run([sys.executable, "-c", HOST_CHECKS], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("clipfast_kernels abi 1 ") and " archs " in lines[0]
    assert lines[1] == "1 head_dim must be one of 64, 80, 128, got 96"
    assert lines[2] == "0 head_dim must be one of 64, 80, 128, got 72"
    assert lines[3].startswith("1 images[0].channels must be 1 (gray) or 3 (RGB), got 4")
    assert lines[4].startswith("1 params.filter must be one of LANCZOS=1")
    assert lines[5] == "False"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    """csrc/emu/emulate.cpp: the kernels compiled for the CPU (see csrc/emu/cuda_emu.h)."""
    inc = _cuda_include()
    if _nvcc() is None or inc is None:
        pytest.skip("nvcc / CUDA headers not found: the CPU emulation of csrc/ needs them")
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    exe = tmp_path_factory.mktemp("emu") / "emulate"
    cmd = ["g++", "-std=c++20", "-O2", "-pthread", "-I", str(ROOT / "csrc"), "-I", str(inc),
           str(ROOT / "csrc" / "emu" / "emulate.cpp"), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return exe


def _run_emulator(exe: Path, what: str, blob: bytes) -> tuple[bytes, str]:
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "in", Path(d) / "out"
        src.write_bytes(blob)
        res = subprocess.run([str(exe), what, str(src), str(dst)], capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 0, res.stderr
        return dst.read_bytes(), res.stdout


def _emulate_preprocess(exe: Path, images: list[np.ndarray], cfg: PreprocessConfig,
                        dtype: str = "float32") -> np.ndarray:
    """Same descs and params as preprocess_packed_gpu builds for the library."""
    descs = (_lib.ImageDesc * len(images))()
    flats, pos = [], 0
    for i, img in enumerate(images):
        a = img if img.ndim == 3 else img[:, :, None]
        h, w, c = a.shape
        rh, rw, top, left = plan_geometry(h, w, cfg)
        flags = _lib.VERTICAL_FIRST if vertical_first(h, w, rh, rw) else 0
        descs[i] = _lib.ImageDesc(pos, h, w, c, rh, rw, top, left, flags)
        flats.append(np.ascontiguousarray(a).reshape(-1))
        pos += a.size
    src = np.concatenate(flats)
    blob = (np.int32(len(images)).tobytes() + bytes(_params(cfg, dtype)) + bytes(descs)
            + np.int64(src.size).tobytes() + src.tobytes())
    raw, _ = _run_emulator(exe, "preprocess", blob)
    np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]
    return np.frombuffer(raw, dtype=np_dtype).reshape(len(images), 3, *cfg.image_size)


@pytest.mark.build
def test_emulated_preprocess_kernel_equals_reference(emulator, photos):
    """The CUDA preprocessing kernel, run on the CPU, is bit-exact with preprocess_reference:
    same integer resampling, same float32 normalisation table (fp16 output: the reference
    rounded to fp16). Covers crop, pad, squash, gray, 1x1, heavy downscaling and the
    vertical-first pass order (2000x30 -> 64x64, 300x500 -> 20x400)."""
    odd = _odd_images()
    rng = np.random.default_rng(3)
    images = [photos["chelsea"][::2, ::2], photos["camera"][:200], odd["7x5"], odd["1x1"],
              odd["2000x30"], rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)]
    # _configs() at a quarter of the size (one emulated CUDA thread is one OS thread).
    cfgs = [
        PreprocessConfig(image_size=(56, 56), resize_size=56, mean=OPENAI_MEAN, std=OPENAI_STD),
        PreprocessConfig(image_size=(73, 73), resize_size=87, interpolation="bilinear",
                         rescale=1 / 127.5, offset=-1.0, crop_rounding="floor"),
        PreprocessConfig(image_size=(64, 64), resize_mode="squash", resize_size=(64, 64),
                         crop=False, mean=(0.5,) * 3, std=(0.5,) * 3),
        PreprocessConfig(image_size=(56, 56), resize_mode="longest", resize_size=(56, 56),
                         fill_color=114, mean=OPENAI_MEAN, std=OPENAI_STD),
        PreprocessConfig(image_size=(35, 45), resize_size=(35, 45), interpolation="lanczos"),
        PreprocessConfig(image_size=(20, 400), resize_mode="squash", resize_size=(20, 400),
                         crop=False, interpolation="hamming"),
    ]
    for cfg in cfgs:
        ref = preprocess_reference(images, cfg)
        got = _emulate_preprocess(emulator, images, cfg)
        np.testing.assert_array_equal(got, ref, err_msg=f"{cfg.resize_mode} {cfg.interpolation}")
    half = _emulate_preprocess(emulator, images[:2], cfgs[0], dtype="float16")
    ref16 = preprocess_reference(images[:2], cfgs[0]).astype(np.float16)
    np.testing.assert_array_equal(half, ref16)


def _emulate_attention(exe: Path, q, k, v, causal: bool, scale: float, smem_optin: int):
    import torch

    b, h, t, d = q.shape
    dtype = _lib.DTYPES["float16" if q.dtype == torch.float16 else "bfloat16"]
    head = (np.array([b, h, t, d, dtype, int(causal), smem_optin], dtype=np.int32).tobytes()
            + np.float32(scale).tobytes())
    body = b"".join(x.contiguous().view(torch.int16).numpy().tobytes() for x in (q, k, v))
    raw, info = _run_emulator(exe, "attention", head + body)
    out = torch.from_numpy(np.frombuffer(raw, dtype=np.int16).copy()).view(q.dtype)
    return out.reshape(q.shape), info.split()[1]


# Opt-in shared memory per block of H100 (227 KB) and RTX 40xx / L4 (99 KB): both paths.
H100_SMEM, ADA_SMEM = 232448, 101376


@pytest.mark.build
@pytest.mark.parametrize(
    ("tokens", "head_dim", "causal", "dtype", "smem", "path"),
    [
        (50, 64, False, "float16", H100_SMEM, "1"),
        (77, 64, True, "bfloat16", H100_SMEM, "1"),
        (33, 80, False, "bfloat16", ADA_SMEM, "1"),
        (197, 64, False, "float16", ADA_SMEM, "2"),
        (130, 128, True, "float16", ADA_SMEM, "2"),
        (257, 80, True, "bfloat16", H100_SMEM, "1"),
    ],
)
def test_emulated_attention_kernel_matches_reference(emulator, tokens, head_dim, causal, dtype,
                                                     smem, path):
    """The attention kernel on the CPU (both the resident and the tiled path).

    NOTE: tolerance = flash-attention's rule with PyTorch's CPU SDPA in the same dtype as the
    yardstick: error against the float64 reference at most 2x PyTorch's own error (the kernel
    rounds P to fp16 / bf16 before P V, as flash-attention does; the emulator's tensor-core
    stand-in accumulates in fp32, like the hardware).
    """
    import torch

    tdtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(tokens * head_dim)
    q, k, v = (torch.randn(1, 2, tokens, head_dim, generator=gen).to(tdtype) for _ in range(3))
    scale = head_dim ** -0.5
    ref = attention_reference(q.float().numpy(), k.float().numpy(), v.float().numpy(), causal)
    out, used = _emulate_attention(emulator, q, k, v, causal, scale, smem)
    assert used == path
    pt = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    err = np.abs(out.float().numpy() - ref).max()
    err_pt = np.abs(pt.float().numpy() - ref).max()
    assert err <= 2 * err_pt, f"kernel error {err:.3g} > 2 x PyTorch's {err_pt:.3g}"


# --------------------------------------------------------------------------- GPU


@pytest.fixture(scope="module")
def cuda_kernels():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ok, reason = _lib.kernels_available()
    if not ok:
        pytest.skip(f"kernels not built: {reason}")
    return torch.device("cuda", torch.cuda.current_device())


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", _configs(), ids=lambda c: f"{c.resize_mode}-{c.interpolation}")
def test_gpu_preprocess_matches_reference(cuda_kernels, photos, cfg):
    """NOTE: tolerance: mean |diff| <= 1 level and max <= 1 level. The kernel's integer
    resampling is the reference's, so bit-exact results are expected; one level is left for
    lanczos / hamming, whose weights use the GPU's sin / cos."""
    import torch

    from clipfast.kernels import preprocess_gpu

    odd = _odd_images()
    images = [photos["astronaut"], photos["camera"], photos["coffee"], *odd.values()]
    ref = preprocess_reference(images, cfg)
    got = preprocess_gpu(images, cfg, device=cuda_kernels).cpu().numpy()
    err = np.abs(got - ref)
    assert err.mean() <= _level(cfg) and err.max() <= _level(cfg) * 1.0001
    # Device inputs (torch tensors) and fp16 output take the same path.
    dev_imgs = [torch.from_numpy(np.ascontiguousarray(i)).to(cuda_kernels) for i in images]
    half = preprocess_gpu(dev_imgs, cfg, device=cuda_kernels, dtype="float16")
    assert half.dtype == torch.float16
    np.testing.assert_allclose(half.float().cpu().numpy(), got, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_gpu_nvjpeg_decode_then_preprocess(cuda_kernels, photos):
    """NOTE: tolerance: mean |diff| <= 1 level, max <= 3 levels: nvJPEG's IDCT and chroma
    upsampling differ from libjpeg-turbo (Pillow) by a few levels before the resize."""
    from clipfast.kernels import JpegDecoder, preprocess_packed_gpu

    try:
        decoder = JpegDecoder(cuda_kernels)
    except _lib.KernelError as exc:
        pytest.skip(f"nvJPEG unavailable: {exc}")
    blobs, decoded = [], []
    # 4:2:0, 4:4:4, gray, progressive (the hardware engine hands that one to the CUDA backend)
    for img, kw in [(photos["astronaut"], {"subsampling": 2}),
                    (photos["coffee"], {"subsampling": 0}),
                    (photos["camera"], {}),
                    (photos["chelsea"], {"progressive": True})]:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90, **kw)
        blobs.append(buf.getvalue())
        decoded.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    packed, shapes = decoder.decode(blobs)
    assert [s[:2] for s in shapes] == [d.shape[:2] for d in decoded]
    cfg = _configs()[0]
    got = preprocess_packed_gpu(packed, shapes, cfg).cpu().numpy()
    ref = preprocess_reference(decoded, cfg)
    err = np.abs(got - ref) / _level(cfg)
    assert err.mean() <= 1.0 and err.max() <= 3.0001, (err.mean(), err.max())
    decoder.close()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_gpu_attention_matches_reference(cuda_kernels, head_dim, causal, dtype):
    """NOTE: tolerance (flash-attention's rule): the kernel's max error against the float64
    reference is at most twice that of PyTorch's own fp16 / bf16 SDPA on the same GPU and
    inputs."""
    import torch

    from clipfast.kernels import attention_gpu, attention_path

    tdtype = getattr(torch, dtype)
    gen = torch.Generator(device=cuda_kernels).manual_seed(head_dim)
    for tokens in CLIP_TOKENS:
        q, k, v = (torch.randn(2, 3, tokens, head_dim, device=cuda_kernels, generator=gen,
                               dtype=tdtype) for _ in range(3))
        ref = attention_reference(q.float().cpu().numpy(), k.float().cpu().numpy(),
                                  v.float().cpu().numpy(), causal=causal)
        out = attention_gpu(q, k, v, causal=causal)
        pt = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        err = np.abs(out.float().cpu().numpy() - ref).max()
        err_pt = np.abs(pt.float().cpu().numpy() - ref).max()
        assert err <= 2 * err_pt, (
            f"tokens {tokens} ({attention_path(tokens, head_dim)}): error {err:.3g} > 2 x "
            f"PyTorch's {err_pt:.3g}")


@pytest.mark.gpu
def test_gpu_attention_dispatch_and_checks(cuda_kernels):
    import torch

    from clipfast.kernels import attention_gpu

    x = torch.randn(2, 77, 8, 64, device=cuda_kernels, dtype=torch.float16)
    q = x.transpose(1, 2)  # strided: the dispatcher takes the torch twin
    ref = attention_torch_reference(q, q, q, causal=True)
    torch.testing.assert_close(attention(q, q, q, causal=True), ref)
    with pytest.raises(ValueError, match="q must be contiguous"):
        attention_gpu(q, q, q)
    bad = torch.randn(1, 2, 50, 96, device=cuda_kernels, dtype=torch.float16)
    with pytest.raises(ValueError, match="head_dim must be one of 64, 80, 128, got 96"):
        attention_gpu(bad, bad, bad)
