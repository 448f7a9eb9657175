"""Golden outputs: an artifact proves its fidelity on the host that runs it, without torch.

An export stores a few inputs, exactly as the towers receive them (``GOLDEN_IMAGES`` generated
images as preprocessed pixels, ``GOLDEN_TEXTS`` captions as token ids), and the fp32 PyTorch
source's embeddings for them, in ``golden.npz`` (listed in the manifest with its sha256).
``Engine`` runs them through the backend it chose and compares the result with the artifact's
embedding gates before serving anything: on a CPU whose int8 kernels differ from the exporting
host's, on a GPU engine built by another TensorRT, or after weights were edited and the
manifest rehashed, the figures say so at load instead of in the embeddings later.

Only the embedding gates apply here (centred relative error, cosine). Pixels, token ids and
ranking agreement need the source's preprocessing and tokenizer and more pairs than a load-time
check should cost; ``clipfast verify`` with the export extras measures those.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipfast.artifact.fidelity import (
    GATES,
    centred_relative_error,
    check_gates,
    cosine,
    l2_normalize,
)
from clipfast.artifact.spec import GoldenSection
from clipfast.errors import ArtifactError, FidelityError

log = logging.getLogger("clipfast")

GOLDEN_FILE = "golden.npz"
GOLDEN_IMAGES = 8
GOLDEN_TEXTS = 16
# The gate keys a self-check can measure: embeddings of each tower against the source's.
EMBEDDING_GATES = ("image_centred_rel_error_max", "image_cosine_min",
                   "text_centred_rel_error_max", "text_cosine_min")
# Precisions from strictest to loosest gates: a backend that computes in a lower precision than
# the artifact states (the torch backend in fp16 on CUDA running an fp32 artifact, OpenVINO in
# bf16) is held to the looser of the two: the artifact's ``precision_gates`` for that precision
# when it records them, else clipfast.artifact.fidelity.GATES.
_PRECISION_ORDER = ("fp32", "fp16", "bf16", "int8")


@dataclass
class Golden:
    """Golden inputs and the fp32 source's outputs for them.

    pixel_values: float32 ``(n_images, 3, H, W)``; text: ``{input name: int32 (n_texts, L)}``;
    image_embeds / text_embeds: float32 ``(n, D)``, the source towers' raw outputs.
    """

    pixel_values: np.ndarray
    text: dict[str, np.ndarray]
    image_embeds: np.ndarray
    text_embeds: np.ndarray


def write_golden(directory: str | Path, golden: Golden) -> GoldenSection:
    """Write ``golden.npz`` into ``directory``; return the manifest's ``golden`` section."""
    arrays = {"pixel_values": np.ascontiguousarray(golden.pixel_values, dtype=np.float32),
              "image_embeds": np.ascontiguousarray(golden.image_embeds, dtype=np.float32),
              "text_embeds": np.ascontiguousarray(golden.text_embeds, dtype=np.float32)}
    for name, ids in golden.text.items():
        arrays[f"text.{name}"] = np.ascontiguousarray(ids, dtype=np.int32)
    np.savez(Path(directory) / GOLDEN_FILE, **arrays)
    return GoldenSection(file=GOLDEN_FILE, images=int(golden.pixel_values.shape[0]),
                         texts=int(golden.text_embeds.shape[0]),
                         reference="fp32 PyTorch source towers on these exact inputs")


def load_golden(manifest) -> Golden | None:
    """The artifact's golden data, or None for an artifact exported without it."""
    section = manifest.spec.golden
    if section is None:
        return None
    path = manifest.path(section.file)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: cannot read the golden outputs ({e})") from e
    names = list(manifest.spec.text.inputs)
    missing = [k for k in ("pixel_values", "image_embeds", "text_embeds",
                           *(f"text.{n}" for n in names)) if k not in data]
    if missing:
        raise ArtifactError(f"{path}: golden outputs lack {missing}; re-export the artifact")
    g = Golden(data["pixel_values"], {n: data[f"text.{n}"] for n in names},
               data["image_embeds"], data["text_embeds"])
    rows = {g.pixel_values.shape[0], g.image_embeds.shape[0]}
    if len(rows) != 1 or g.text_embeds.shape[0] != next(iter(g.text.values())).shape[0] \
            or min(g.image_embeds.shape[0], g.text_embeds.shape[0]) < 2:
        raise ArtifactError(f"{path}: golden inputs and outputs disagree in row counts; "
                            "re-export the artifact")
    return g


def self_check_gates(manifest, backend_precision: str | None = None) -> dict[str, Any]:
    """The embedding gates a self-check applies: the artifact's own, or those of the backend's
    arithmetic where it is looser (see _PRECISION_ORDER)."""
    precision = manifest.spec.precision
    gates = manifest.spec.gates.as_dict() or dict(GATES.get(precision, {}))
    if backend_precision in _PRECISION_ORDER and precision in _PRECISION_ORDER and \
            _PRECISION_ORDER.index(backend_precision) > _PRECISION_ORDER.index(precision):
        stated = manifest.spec.precision_gates.get(backend_precision)
        gates = (stated.as_dict() if stated else {}) or dict(GATES[backend_precision])
    return {k: v for k, v in gates.items() if k in EMBEDDING_GATES}


def golden_texts() -> list[str]:
    """The golden captions: ``GOLDEN_TEXTS`` of them, from one word to past any context length,
    so that a text tower wrongly exported as padding-independent (``text.sequence``
    "dynamic") fails the self-check: its short texts, run padded only to their own length,
    would differ from the source's outputs at the full context."""
    from clipfast.artifact.samples import sample_captions

    long = ("a long and detailed caption of a busy city street at night with many people "
            "cars shops lights signs trees dogs bicycles buses and rain")
    tail = ["a", "cat", long, " ".join([long] * 4)]
    return sample_captions(GOLDEN_TEXTS - len(tail)) + tail


def _run_golden_texts(backend, text: dict[str, np.ndarray], manifest) -> tuple[np.ndarray, int]:
    """The golden ids through ``backend``: on the dynamic path each row padded only to its own
    length (or the next length the backend accepts), as the Engine runs them; else as stored.
    Returns ``(embeddings, distinct lengths run)``."""
    inputs = {k: v.astype(np.int64) for k, v in text.items()}
    if manifest is None or not manifest.spec.text.dynamic:
        return backend.run_text(inputs), 1
    from clipfast.backends.batching import plan_text_batches, run_planned
    from clipfast.inputs.text_batching import row_lengths

    tok = manifest.spec.tokenizer
    lengths = row_lengths(inputs, pad_id=tok.pad_id, padding_side=tok.padding_side,
                          pad_may_end=tok.kind == "hf")
    # no per-call overhead: every distinct length is its own batch, the strictest check
    plan = plan_text_batches(lengths, len(lengths), context=tok.context_length,
                             allowed=getattr(backend, "text_lengths", None), overhead=0)
    out = run_planned(lambda chunks: [backend.run_text(c) for c in chunks], inputs, plan,
                      int(manifest.spec.embed_dim))
    return out, len({b.length for b in plan})


def measure_golden(backend, golden: Golden, manifest=None) -> dict[str, Any]:
    """Run the golden inputs through ``backend``; the figures against the stored outputs.
    ``manifest``: the artifact's, for its text tower's sequence path (None: ids as stored)."""
    t0 = time.perf_counter()
    img = l2_normalize(backend.run_image(golden.pixel_values))
    raw_txt, text_lengths = _run_golden_texts(backend, golden.text, manifest)
    txt = l2_normalize(raw_txt)
    ref_img, ref_txt = l2_normalize(golden.image_embeds), l2_normalize(golden.text_embeds)
    if img.shape != ref_img.shape or txt.shape != ref_txt.shape:
        raise ArtifactError(f"golden outputs have shapes {ref_img.shape} / {ref_txt.shape}, the "
                            f"towers give {img.shape} / {txt.shape}; re-export the artifact")
    return {
        "image_centred_rel_error": float(centred_relative_error(img, ref_img).max()),
        "image_cosine": float(cosine(img, ref_img).min()),
        "text_centred_rel_error": float(centred_relative_error(txt, ref_txt).max()),
        "text_cosine": float(cosine(txt, ref_txt).min()),
        "images": int(ref_img.shape[0]),
        "texts": int(ref_txt.shape[0]),
        "text_lengths_run": text_lengths,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def run_self_check(backend, manifest, golden: Golden | None, label: str) -> dict[str, Any] | None:
    """Check ``backend`` against the golden outputs with the artifact's embedding gates.

    Returns the figures (with ``gates`` and ``passed``), or None when the artifact has no golden
    data. Raises FidelityError naming the backend, the failed figures and the host's CPU.
    """
    if golden is None:
        return None
    gates = self_check_gates(manifest, getattr(backend, "precision", None))
    figures = measure_golden(backend, golden, manifest)
    failures = check_gates(figures, gates)
    figures.update(gates=gates, passed=not failures)
    if failures:
        from clipfast.cpu import host_cpu

        where = getattr(backend, "device", "cpu")
        error = FidelityError(
            f"{label} fails the self-check of {manifest.directory} ({manifest.spec.precision}) on "
            f"this host: {'; '.join(failures)}. The backend's outputs for the artifact's golden "
            f"inputs differ from the PyTorch source's. Device {where}; CPU "
            f"{host_cpu().describe()}. Causes: weights changed after export, or kernels of this "
            "host that compute differently from the exporting one's (int8 on another CPU "
            "family, an engine from another TensorRT)")
        error.figures = figures  # type: ignore[attr-defined]
        raise error
    log.info("clipfast: %s self-check passed in %.2f s (image error %.2e, text error %.2e)",
             label, figures["seconds"], figures["image_centred_rel_error"],
             figures["text_centred_rel_error"])
    return figures
