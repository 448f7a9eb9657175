"""Resolve a ``--model`` string to a loaded SourceModel."""

from __future__ import annotations

from typing import Any

from clipfast.errors import ExportError
from clipfast.export.source import SourceModel, weights_fingerprint

TRANSFORMERS_PREFIX = "transformers:"


def load_source(model: str, pretrained: str | None = None, *, seed: int = 0,
                device: str = "cpu", revision: str | None = None) -> SourceModel:
    """``model`` forms: an open_clip name (+ ``pretrained`` TAG | FILE | none),
    ``hf-hub:ORG/NAME`` (open_clip-format repo), ``transformers:ORG/NAME`` or ``transformers:DIR``.
    """
    if not model:
        raise ExportError("--model is required (e.g. ViT-B-32, hf-hub:ORG/NAME, transformers:DIR)")
    if model.startswith(TRANSFORMERS_PREFIX):
        from clipfast.export.sources_hf import load_transformers_source

        if pretrained not in (None, "", "none"):
            raise ExportError(
                f"--pretrained {pretrained!r} does not apply to transformers models: the weights "
                "come from the repo or directory named in --model"
            )
        src = load_transformers_source(model[len(TRANSFORMERS_PREFIX):], device=device,
                                       revision=revision)
    else:
        from clipfast.export.sources_openclip import load_open_clip_source

        src = load_open_clip_source(model, pretrained or "none", seed=seed, device=device)
    src.spec.setdefault("weights_sha256", weights_fingerprint(src))
    return src


def load_source_from_spec(spec: dict[str, Any], *, device: str = "cpu") -> SourceModel:
    """Load the source recorded in a manifest's ``source`` section and check it is the same
    weights (fingerprint), so a reference built from random weights is the exported one."""
    loader = spec.get("loader")
    if loader == "open_clip":
        src = load_source(spec["model"], spec.get("pretrained", "none"),
                          seed=int(spec.get("seed", 0)), device=device)
    elif loader == "transformers":
        # The exact hub commit that was exported, so a moved branch cannot change the reference.
        src = load_source(spec["model"], device=device, revision=spec.get("revision"))
    else:
        raise ExportError(f"manifest source loader {loader!r} is unknown")
    expected = spec.get("weights_sha256")
    if expected:
        got = src.spec["weights_sha256"]
        if got != expected:
            raise ExportError(
                f"the source model {spec['model']} loaded now has other weights than the one "
                f"exported (fingerprint {got[:12]} != {expected[:12]}): the checkpoint, the "
                "library version or the random-init order changed; re-export"
            )
    return src
