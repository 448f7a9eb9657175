"""The Engine on an exported ViT-B-32: input kinds, chunking, bad input, backends, artifacts."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import clipfast
from clipfast.artifact.fidelity import centred_relative_error, l2_normalize
from clipfast.errors import ArtifactError, BackendUnavailable, ImageLoadError, InputError


def _jpeg_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_every_input_kind_gives_the_same_embedding(vitb32_engine, photos, tmp_path):
    arr = photos["chelsea"]
    path = tmp_path / "chelsea.png"
    Image.fromarray(arr).save(path)
    items = [Image.fromarray(arr), str(path), path, _jpeg_bytes(arr), arr]
    emb = vitb32_engine.encode_images(items)
    assert emb.shape == (5, 512) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb, np.repeat(emb[:1], 5, axis=0), atol=1e-6)


def test_normalize_false_and_tower_access(vitb32_engine, photos):
    imgs = [photos["coffee"], photos["rocket"]]
    raw = vitb32_engine.encode_images(imgs, normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    np.testing.assert_allclose(l2_normalize(raw), vitb32_engine.encode_images(imgs), atol=1e-6)
    pixels = vitb32_engine.preprocess(imgs)
    assert pixels.shape == (2, 3, 224, 224) and pixels.dtype == np.float32
    np.testing.assert_allclose(vitb32_engine.run_image_tower(pixels), raw, atol=1e-5)
    with pytest.raises(InputError, match=r"\(N, 3, 224, 224\)"):
        vitb32_engine.run_image_tower(np.zeros((2, 3, 100, 100), np.float32))


def test_any_batch_size_is_chunked(vitb32_artifact, photos):
    small = clipfast.Engine(vitb32_artifact, backend="onnxruntime", batch_size=3)
    imgs = [p for p in photos.values()] + [photos["astronaut"][::2, ::2]] * 2
    big = clipfast.Engine(vitb32_artifact, backend="onnxruntime", batch_size=64)
    np.testing.assert_allclose(small.encode_images(imgs), big.encode_images(imgs), atol=1e-5)
    texts = [f"caption number {i}" for i in range(11)]
    np.testing.assert_allclose(small.encode_texts(texts), big.encode_texts(texts), atol=1e-5)


def test_empty_batches(vitb32_engine):
    assert vitb32_engine.encode_images([]).shape == (0, 512)
    assert vitb32_engine.encode_texts([]).shape == (0, 512)
    res = vitb32_engine.encode_images([], errors="skip")
    assert res.embeddings.shape == (0, 512) and res.failures == []


def test_bad_images_name_the_item(vitb32_engine, photos, tmp_path):
    good = photos["astronaut"]
    with pytest.raises(ImageLoadError, match=r"image 1 \(.*does-not-exist\.jpg\): file not found"):
        vitb32_engine.encode_images([good, str(tmp_path / "does-not-exist.jpg")])
    with pytest.raises(ImageLoadError, match=r"image 2 \(<bytes of 23 bytes>\): cannot identify"):
        vitb32_engine.encode_images([good, good, b"definitely not an image"])


def test_skip_keeps_the_good_rows(vitb32_engine, photos, tmp_path):
    full = io.BytesIO()
    Image.fromarray(photos["coffee"]).save(full, format="JPEG")
    truncated = full.getvalue()[: len(full.getvalue()) // 2]
    items = [photos["astronaut"], str(tmp_path / "missing.png"), photos["chelsea"], truncated,
             12345, photos["rocket"]]
    res = vitb32_engine.encode_images(items, errors="skip")
    assert res.indices.tolist() == [0, 2, 5]
    assert [f.index for f in res.failures] == [1, 3, 4]
    assert "missing.png" in res.failures[0].error
    alone = vitb32_engine.encode_images([items[i] for i in (0, 2, 5)])
    np.testing.assert_allclose(res.embeddings, alone, atol=1e-6)


def test_texts_bad_input(vitb32_engine):
    with pytest.raises(InputError, match=r"1.*int|int.*1"):
        vitb32_engine.encode_texts(["ok", 5])
    res = vitb32_engine.encode_texts(["a", None, "b"], errors="skip")
    assert res.indices.tolist() == [0, 2] and res.failures[0].index == 1
    with pytest.raises(InputError, match="list"):
        vitb32_engine.encode_texts("a single string")
    with pytest.raises(ValueError, match="errors"):
        vitb32_engine.encode_texts(["a"], errors="ignore")


def test_classify(vitb32_engine, photos):
    probs = vitb32_engine.classify([photos["chelsea"], photos["coffee"]], ["cat", "coffee", "dog"])
    assert probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    custom = vitb32_engine.classify([photos["chelsea"]], ["cat", "dog"], template="{}")
    assert custom.shape == (1, 2)
    with pytest.raises(InputError, match="must contain"):
        vitb32_engine.classify([photos["chelsea"]], ["cat"], template="no placeholder")


def test_torch_backend_matches_onnxruntime(vitb32_artifact, vitb32_engine, photos):
    ref = clipfast.Engine(vitb32_artifact, backend="torch")
    assert ref.backend == "torch"
    imgs = list(photos.values())
    err = centred_relative_error(vitb32_engine.encode_images(imgs), ref.encode_images(imgs))
    assert err.max() <= 1e-3
    texts = ["a photo of a cat", "a diagram", "the moon at night"]
    err = centred_relative_error(vitb32_engine.encode_texts(texts), ref.encode_texts(texts))
    assert err.max() <= 1e-3


def test_auto_falls_back_and_says_why(vitb32_artifact, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    monkeypatch.setitem(sys.modules, "openvino", None)
    eng = clipfast.Engine(vitb32_artifact, backend="auto")
    assert eng.backend == "torch"
    assert eng.fallbacks and eng.fallbacks[0][0] == "onnxruntime"
    assert "pip install onnxruntime" in eng.fallbacks[0][1]
    with pytest.raises(BackendUnavailable, match="onnxruntime"):
        clipfast.Engine(vitb32_artifact, backend="auto", fallback=False)
    with pytest.raises(BackendUnavailable, match="onnxruntime"):
        clipfast.Engine(vitb32_artifact, backend="onnxruntime")


def test_auto_on_cuda_walks_the_whole_chain_and_says_why(vitb32_artifact):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime has CUDA here: the chain stops earlier")
    eng = clipfast.Engine(vitb32_artifact, device="cuda")
    reasons = dict(eng.fallbacks)
    assert [n for n, _ in eng.fallbacks][:2] == ["tensorrt (cuda)", "onnxruntime (cuda)"]
    assert "onnxruntime-gpu" in reasons["onnxruntime (cuda)"]
    assert eng.backend == "onnxruntime" and eng.backend_device == "cpu"
    assert eng.describe()["requested_device"] == "cuda"
    # the CPU backend it fell back to computes what the CPU engine computes
    np.testing.assert_array_equal(eng.encode_texts(["a cat"]),
                                  clipfast.Engine(vitb32_artifact).encode_texts(["a cat"]))
    with pytest.raises(BackendUnavailable, match="(?i)tensorrt|cuda"):
        clipfast.Engine(vitb32_artifact, device="cuda", fallback=False)


def test_engine_chunks_to_the_backends_max_batch(vitb32_artifact, monkeypatch, photos):
    """A backend's max_batch caps the chunks; one with run_*_batches gets them all at once."""
    import clipfast.engine as engine_mod

    real = engine_mod.resolve_backend
    calls = []

    from clipfast.backends import Backend

    class Capped(Backend):
        def __init__(self, inner):
            self.inner, self.name, self.device, self.max_batch = inner, "capped", "cpu", 2

        def run_image(self, x):
            calls.append(("image", len(x)))
            return self.inner.run_image(x)

        def run_text(self, feed):
            raise AssertionError("text goes through run_text_batches")

        def run_text_batches(self, feeds):
            calls.append(("text-batches", [len(next(iter(f.values()))) for f in feeds]))
            return [self.inner.run_text(f) for f in feeds]

        def describe(self):
            return {"backend": self.name}

    def resolve(*a, **kw):
        backend, fallbacks = real(*a, **kw)
        return Capped(backend), fallbacks

    ref = clipfast.Engine(vitb32_artifact, backend="onnxruntime")
    monkeypatch.setattr(engine_mod, "resolve_backend", resolve)
    eng = clipfast.Engine(vitb32_artifact, backend="onnxruntime", batch_size=8)
    imgs = list(photos.values())  # 5 images -> chunks of 2, 2, 1
    np.testing.assert_allclose(eng.encode_images(imgs), ref.encode_images(imgs), atol=1e-5)
    assert calls == [("image", 2), ("image", 2), ("image", 1)]
    calls.clear()
    texts = ["a", "b", "c"]
    np.testing.assert_allclose(eng.encode_texts(texts), ref.encode_texts(texts), atol=1e-5)
    assert calls == [("text-batches", [2, 1])]
    assert eng.describe()["batch_size"] == 2


def test_unknown_backend_and_device(vitb32_artifact):
    with pytest.raises(clipfast.ClipfastError, match="tensorflow"):
        clipfast.Engine(vitb32_artifact, backend="tensorflow")
    with pytest.raises(clipfast.ClipfastError, match="device"):
        clipfast.Engine(vitb32_artifact, device="tpu")
    with pytest.raises(clipfast.ClipfastError, match="CUDA_VISIBLE_DEVICES=1"):
        clipfast.Engine(vitb32_artifact, device="cuda:1")
    with pytest.raises(BackendUnavailable, match="CUDA|cuda"):
        clipfast.Engine(vitb32_artifact, backend="onnxruntime", device="cuda")


@pytest.fixture()
def artifact_copy(vitb32_artifact, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(vitb32_artifact, dst)
    return dst


def test_tampered_file_is_named(artifact_copy):
    tok = artifact_copy / "tokenizer.json"
    data = bytearray(tok.read_bytes())
    data[100] ^= 1
    tok.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="tokenizer.json.*sha256"):
        clipfast.Engine(artifact_copy)


def test_missing_file_is_named(artifact_copy):
    (artifact_copy / "text.onnx").unlink()
    with pytest.raises(ArtifactError, match="text.onnx.*missing"):
        clipfast.Engine(artifact_copy)


def test_other_format_version_is_refused(artifact_copy):
    p = artifact_copy / "manifest.json"
    d = json.loads(p.read_text())
    d["format_version"] = 99
    p.write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match="manifest.json.*format_version 99"):
        clipfast.Engine(artifact_copy)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        clipfast.Engine(tmp_path / "nope")
    with pytest.raises(ArtifactError, match="manifest.json"):
        clipfast.Engine(tmp_path)


def test_runtime_does_not_import_torch(vitb32_artifact):
    code = (
        "import sys, clipfast\n"
        f"e = clipfast.Engine({str(vitb32_artifact)!r}, backend='onnxruntime')\n"
        "e.encode_texts(['a cat']); import numpy as np\n"
        "e.encode_images([np.zeros((32, 32, 3), np.uint8)])\n"
        "assert 'torch' not in sys.modules, 'runtime imported torch'\n"
        "assert 'transformers' not in sys.modules and 'open_clip' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
