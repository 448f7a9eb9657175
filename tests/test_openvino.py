"""The OpenVINO backend: held-out parity against PyTorch per precision, the golden self-check on
its paths, the stated precision hint and the per-host compiled-model cache."""

from __future__ import annotations

import numpy as np
import pytest

import clipfast
from clipfast.artifact.fidelity import GATES, centred_relative_error, cosine, l2_normalize
from clipfast.artifact.samples import sample_captions, sample_images
from clipfast.errors import BackendUnavailable, FidelityError, InputError

pytest.importorskip("openvino")

from clipfast.backends import openvino as ovb  # noqa: E402


def _bf16_skip() -> None:
    reason = ovb.bf16_unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def held_out(small_clip_artifact, photos):
    """Inputs the export never saw (its calibration / golden sets use seed 0 images), and the
    fp32 PyTorch source's embeddings for them."""
    ref = clipfast.Engine(small_clip_artifact, backend="torch", self_check=False)
    images = [*sample_images(12, seed=7), *photos.values()]
    texts = [f"{c}, seen again" for c in sample_captions(12)]
    return images, texts, ref.encode_images(images), ref.encode_texts(texts)


def _parity(engine, held_out, gates) -> dict[str, float]:
    images, texts, ref_img, ref_txt = held_out
    img, txt = engine.encode_images(images), engine.encode_texts(texts)
    figures = {
        "image_centred_rel_error": float(centred_relative_error(img, ref_img).max()),
        "text_centred_rel_error": float(centred_relative_error(txt, ref_txt).max()),
        "image_cosine": float(cosine(img, ref_img).min()),
        "text_cosine": float(cosine(txt, ref_txt).min()),
    }
    for tower in ("image", "text"):
        assert figures[f"{tower}_centred_rel_error"] <= gates[f"{tower}_centred_rel_error_max"], \
            figures
        assert figures[f"{tower}_cosine"] >= gates[f"{tower}_cosine_min"], figures
    return figures


def test_fp32_parity_with_the_stated_hint(small_clip_artifact, held_out):
    engine = clipfast.Engine(small_clip_artifact, backend="openvino")
    d = engine.describe()
    # the hint is stated, and the compiled model's compute layers really run f32
    assert d["backend"] == "openvino" and d["inference_precision"] == "f32"
    assert d["compute_precision"] == "fp32"
    assert set(d["runtime_precisions"]["image"]) == {"f32"}
    assert engine.self_check_figures["passed"] is True
    figures = _parity(engine, held_out, engine.manifest.spec.gates.as_dict())
    # NOTE: fp32 kernels differ from PyTorch's in summation order only: round-off, ~1e-6
    assert figures["image_centred_rel_error"] < 1e-4


def test_bf16_parity_on_its_own_gates(small_clip_artifact, held_out):
    _bf16_skip()
    engine = clipfast.Engine(small_clip_artifact, backend="openvino",
                             backend_options={"ov_precision": "bf16"})
    d = engine.describe()
    assert d["inference_precision"] == "bf16" and d["compute_precision"] == "bf16"
    assert d["precision"] == "fp32"  # the artifact's, beside what really runs
    assert "bf16" in d["runtime_precisions"]["image"]
    # the self-check held bf16 to the artifact's bf16 gates, not the fp32 ones
    assert engine.self_check_figures["gates"]["image_centred_rel_error_max"] == \
        engine.manifest.spec.precision_gates["bf16"].image_centred_rel_error_max == \
        GATES["bf16"]["image_centred_rel_error_max"]
    figures = _parity(engine, held_out, GATES["bf16"])
    # bf16 really ran: an error well above fp32 round-off
    assert figures["image_centred_rel_error"] > 1e-4


def test_bf16_refused_with_the_reason_where_the_cpu_lacks_it(small_clip_artifact, monkeypatch):
    monkeypatch.setattr(ovb, "bf16_unavailable_reason",
                        lambda core=None: "bf16 needs a CPU with AVX512_BF16 or AMX; test CPU")
    with pytest.raises(BackendUnavailable, match="AVX512_BF16 or AMX; test CPU"):
        clipfast.Engine(small_clip_artifact, backend="openvino",
                        backend_options={"ov_precision": "bf16"})


def test_options_are_checked(small_clip_artifact):
    with pytest.raises(InputError, match="ov_precision='fp8'"):
        clipfast.Engine(small_clip_artifact, backend="openvino",
                        backend_options={"ov_precision": "fp8"})
    with pytest.raises(InputError, match="ov_precison"):
        clipfast.Engine(small_clip_artifact, backend="openvino",
                        backend_options={"ov_precison": "f32"})
    with pytest.raises(BackendUnavailable, match="runs on the CPU"):
        clipfast.Engine(small_clip_artifact, backend="openvino", device="cuda")


def test_a_wrong_path_is_caught_at_load(small_clip_artifact, monkeypatch):
    """A path that computes differently from the source (here: activations rounded to a few
    bits, as a broken quantization would) fails the golden self-check at load."""
    real = ovb.OpenVinoBackend._infer

    def coarse(self, tower, feed):
        out = real(self, tower, feed)
        return np.round(out * 4) / 4

    monkeypatch.setattr(ovb.OpenVinoBackend, "_infer", coarse)
    with pytest.raises(FidelityError, match="backend openvino"):
        clipfast.Engine(small_clip_artifact, backend="openvino")


def test_a_bf16_path_is_held_to_the_bf16_gates_not_int8s(small_clip_artifact, monkeypatch):
    _bf16_skip()
    real = ovb.OpenVinoBackend._infer

    def noisy(self, tower, feed):  # an error int8's gate (0.15) would let through
        out = real(self, tower, feed)
        rng = np.random.default_rng(0)
        centred = out - out.mean(axis=0, keepdims=True)
        return out + 0.12 * np.linalg.norm(centred, axis=1, keepdims=True) * \
            rng.standard_normal(out.shape) / np.sqrt(out.shape[1])

    monkeypatch.setattr(ovb.OpenVinoBackend, "_infer", noisy)
    with pytest.raises(FidelityError, match="centred_rel_error"):
        clipfast.Engine(small_clip_artifact, backend="openvino",
                        backend_options={"ov_precision": "bf16"})


def test_compiled_models_are_cached_per_host(small_clip_artifact):
    engine = clipfast.Engine(small_clip_artifact, backend="openvino", self_check=False)
    cache = engine.describe()["cache_dir"]
    import openvino as ov

    assert cache.endswith(ovb.host_key(ov.__version__))
    from pathlib import Path

    assert any(Path(cache).iterdir())  # the compiled blobs
    again = clipfast.Engine(small_clip_artifact, backend="openvino")
    assert again.describe()["cache_dir"] == cache and again.self_check_figures["passed"]
    off = clipfast.Engine(small_clip_artifact, backend="openvino", self_check=False,
                          backend_options={"ov_cache": False})
    assert off.describe()["cache_dir"].startswith("off")


def test_host_key_names_the_version_and_changes_with_the_cpu(monkeypatch):
    from clipfast import cpu

    key = ovb.host_key("2026.4.1-22982-e213a147257")
    assert key.startswith("ov2026.4.1-")
    monkeypatch.setattr(cpu, "host_cpu", lambda: cpu.CpuInfo("x86_64", "Other", ("avx2",)))
    assert ovb.host_key("2026.4.1") != key


@pytest.fixture(scope="module")
def small_int8_artifact(tmp_path_factory):
    pytest.importorskip("torch")
    from hf_models import save_clip

    from clipfast.export.pipeline import ExportOptions, run_export

    root = tmp_path_factory.mktemp("ov-int8")
    src = save_clip(root / "src", "int8", seed=0)
    return run_export(ExportOptions(model=f"transformers:{src}", out=root / "art",
                                    precision="int8", progress=False))


def test_int8_runs_clipfasts_graph_on_integer_kernels(small_int8_artifact):
    ref = clipfast.Engine(small_int8_artifact, backend="torch", self_check=False)
    images, texts = sample_images(10, seed=5), sample_captions(20)
    ref_img, ref_txt = ref.encode_images(images), ref.encode_texts(texts)
    ort = clipfast.Engine(small_int8_artifact, backend="onnxruntime")
    ov = clipfast.Engine(small_int8_artifact, backend="openvino")
    d = ov.describe()
    assert d["compute_precision"] == "int8" and d["inference_precision"] == "f32"
    # OpenVINO's low-precision transformations run the Q/DQ matmuls on its u8/i8 kernels
    assert set(d["runtime_precisions"]["image"]) & {"u8", "i8"}, d["runtime_precisions"]
    gates = ov.manifest.spec.gates.as_dict()
    _parity(ov, (images, texts, ref_img, ref_txt), gates)
    # the same integers as ONNX Runtime's int8 path: the errors agree closely
    err_ov = centred_relative_error(ov.encode_images(images), ref_img).max()
    err_ort = centred_relative_error(ort.encode_images(images), ref_img).max()
    assert abs(err_ov - err_ort) <= 0.1 * err_ort + 1e-3, (err_ov, err_ort)
    np.testing.assert_allclose(l2_normalize(ov.encode_texts(texts)),
                               l2_normalize(ort.encode_texts(texts)), atol=0.05)


_EMULATED = """
import json, sys
import clipfast
from clipfast.backends import openvino as ovb
from clipfast.cpu import host_cpu
e = clipfast.Engine(sys.argv[1], backend="openvino", backend_options={"ov_cache": False})
print(json.dumps({"isa": host_cpu().isa, "bf16": ovb.bf16_unavailable_reason(),
                  "self_check": e.self_check_figures}))
"""


@pytest.mark.slow
def test_fp32_passes_and_bf16_is_refused_on_emulated_avx2(small_clip_artifact):
    """Under ``qemu-x86_64 -cpu EPYC-Rome`` (AVX2 only; minutes under emulation): OpenVINO's
    AVX2 kernels pass the golden self-check, and bf16 is refused naming the CPU."""
    import json
    import os
    import platform
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import openvino

    from clipfast import settings

    exe = shutil.which("qemu-x86_64")
    if platform.machine() != "x86_64" or exe is None:
        if settings.CLIPFAST_REQUIRE_QEMU and platform.machine() == "x86_64":
            pytest.fail("qemu-x86_64 is required here (CLIPFAST_REQUIRE_QEMU=1)")
        pytest.skip("qemu-x86_64 not installed (apt-get install qemu-user)")
    # the interpreter's real file (qemu runs binaries, not a venv's symlink), with this
    # process's clipfast and openvino on its path
    path = [str(Path(clipfast.__file__).parents[1]), str(Path(openvino.__file__).parents[1])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    done = subprocess.run([exe, "-cpu", "EPYC-Rome", os.path.realpath(sys.executable), "-c",
                           _EMULATED, str(small_clip_artifact)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["isa"] == "AVX2"
    assert got["self_check"]["passed"] and got["self_check"]["image_centred_rel_error"] < 1e-4
    assert "AVX512_BF16 or AMX" in got["bf16"] and "AVX2" in got["bf16"]


def test_fp32_runs_a_dynamic_text_graph_at_every_length(small_clip_artifact):
    """On an artifact whose text graph has a dynamic sequence axis, the OpenVINO model compiled
    with the graph's own shapes runs each batch at its longest text (one word to past the
    context) and keeps fp32 parity with the PyTorch source at every length."""
    engine = clipfast.Engine(small_clip_artifact, backend="openvino")
    if not engine.text_dynamic:
        pytest.skip("the test artifact's text graph is fixed-length")
    ref = clipfast.Engine(small_clip_artifact, backend="torch", self_check=False)
    texts = ["a", "a red car", *(" ".join(["word"] * n) for n in (5, 12, 30, 60, 90))]
    got, want = engine.encode_texts(texts), ref.encode_texts(texts)
    assert float(centred_relative_error(got, want).max()) < 1e-4
    # the batches really ran shorter than the context
    ids, lengths = engine.tokenizer.encode(texts)
    assert int(np.min(lengths)) < next(iter(ids.values())).shape[1]
