"""The artifact manifest's schema: typed sections that the export writes and the runtime reads.

One set of dataclasses for both sides (as timm's ``PretrainedCfg`` and open_clip's
``PreprocessCfg`` serve both their writers and readers): ``ArtifactSpec.from_dict`` validates a
manifest and raises ArtifactError naming the field; ``to_dict`` writes it back. Fields unknown to
this version (a newer minor version's additions) are kept in ``extra`` and written back unchanged,
so reading and rewriting a manifest (``clipfast build-engines`` adds its ``tensorrt`` section)
never drops them. File I/O, checksums and containment live in ``clipfast.artifact.manifest``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from clipfast.errors import ArtifactError

LOGIT_KINDS = ("softmax", "sigmoid")
TOWERS = ("image", "text")
# text.sequence: "dynamic" (any length up to context_length, padding-independent) or "fixed"
SEQUENCE_KINDS = ("dynamic", "fixed")


def _fail(where: str, field_name: str, problem: str) -> ArtifactError:
    return ArtifactError(f"{where}: {field_name} {problem}")


@dataclass(frozen=True)
class LogitsConfig:
    """How similarities become logits: ``kind`` is "softmax" (CLIP, ALIGN) or "sigmoid" (SigLIP).

    logits = scale * cos_sim + bias  (bias only for sigmoid models).
    """

    kind: str
    scale: float
    bias: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "scale": self.scale, "bias": self.bias}

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest") -> LogitsConfig:
        if not isinstance(d, dict):
            raise _fail(where, "'logits'", f"must be an object, got {type(d).__name__}")
        if d.get("kind") not in LOGIT_KINDS:
            raise _fail(where, "logits.kind", f"must be one of {LOGIT_KINDS}, got "
                        f"{d.get('kind')!r}")
        try:
            scale = float(d["scale"])
            bias = None if d.get("bias") is None else float(d["bias"])
        except (KeyError, TypeError, ValueError) as e:
            raise _fail(where, "logits.scale / logits.bias", f"must be numbers ({e!r})") from e
        return cls(kind=d["kind"], scale=scale, bias=bias)


@dataclass(frozen=True)
class ImageTower:
    """The image tower's graph: ``file`` takes ``input`` float ``(batch, *shape)`` and gives
    ``output`` ``(batch, embed_dim)``."""

    file: str
    shape: tuple[int, ...]
    input: str = "pixel_values"
    output: str = "image_embeds"
    dtype: str = "float32"
    output_dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "input": self.input, "output": self.output,
                "shape": list(self.shape), "dtype": self.dtype,
                "output_dtype": self.output_dtype}


@dataclass(frozen=True)
class TextTower:
    """The text tower's graph: ``file`` takes ``inputs`` int ``(batch, context_length)`` and
    gives ``output`` ``(batch, embed_dim)``.

    sequence: "dynamic" when the graph takes ``(batch, L)`` for any ``L <= context_length`` and
    its result does not depend on trailing padding (the runtime then pads each batch only to its
    longest text); "fixed" (artifacts exported before the field existed, and towers whose result
    depends on padding) when every row must be padded to ``context_length``.
    sequence_reason: why the export chose it, in words.
    """

    file: str
    inputs: tuple[str, ...]
    output: str = "text_embeds"
    dtype: str = "int32"
    output_dtype: str = "float32"
    sequence: str = "fixed"
    sequence_reason: str = ""

    @property
    def dynamic(self) -> bool:
        return self.sequence == "dynamic"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "inputs": list(self.inputs), "output": self.output,
                "dtype": self.dtype, "output_dtype": self.output_dtype,
                "sequence": self.sequence, "sequence_reason": self.sequence_reason}


@dataclass
class GoldenSection:
    """Golden inputs and the fp32 source's outputs (``clipfast.artifact.selfcheck``)."""

    file: str
    images: int
    texts: int
    reference: str = ""
    figures_at_export: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "images": self.images, "texts": self.texts,
                "reference": self.reference, "figures_at_export": self.figures_at_export}


def _str(d: dict, key: str, where: str, section: str, default: str | None = None) -> str:
    value = d.get(key, default)
    if not isinstance(value, str):
        raise _fail(where, f"{section}.{key}", f"must be a string, got {value!r}")
    return value


def parse_image(d: Any, where: str) -> ImageTower:
    if not isinstance(d, dict):
        raise _fail(where, "'image'", f"must be an object, got {type(d).__name__}")
    shape = d.get("shape")
    if not isinstance(shape, list) or not shape or not all(
            isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in shape):
        raise _fail(where, "image.shape", f"must be a list of positive integers, got {shape!r}")
    return ImageTower(file=_str(d, "file", where, "image"), shape=tuple(shape),
                      input=_str(d, "input", where, "image", "pixel_values"),
                      output=_str(d, "output", where, "image", "image_embeds"),
                      dtype=_str(d, "dtype", where, "image", "float32"),
                      output_dtype=_str(d, "output_dtype", where, "image", "float32"))


def parse_text(d: Any, where: str) -> TextTower:
    if not isinstance(d, dict):
        raise _fail(where, "'text'", f"must be an object, got {type(d).__name__}")
    inputs = d.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(n, str) for n in inputs):
        raise _fail(where, "text.inputs", f"must be a non-empty list of names, got {inputs!r}")
    sequence = _str(d, "sequence", where, "text", "fixed")
    if sequence not in SEQUENCE_KINDS:
        raise _fail(where, "text.sequence", f"must be one of {SEQUENCE_KINDS}, got {sequence!r}")
    return TextTower(file=_str(d, "file", where, "text"), inputs=tuple(inputs),
                     output=_str(d, "output", where, "text", "text_embeds"),
                     dtype=_str(d, "dtype", where, "text", "int32"),
                     output_dtype=_str(d, "output_dtype", where, "text", "float32"),
                     sequence=sequence,
                     sequence_reason=_str(d, "sequence_reason", where, "text", ""))


def parse_golden(d: Any, where: str) -> GoldenSection | None:
    if not d:
        return None
    if not isinstance(d, dict):
        raise _fail(where, "'golden'", f"must be an object, got {type(d).__name__}")
    counts = {k: d.get(k, 0) for k in ("images", "texts")}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
               for v in counts.values()):
        raise _fail(where, "golden.images / golden.texts", f"must be counts, got {counts}")
    figures = d.get("figures_at_export")
    return GoldenSection(file=_str(d, "file", where, "golden"), images=counts["images"],
                         texts=counts["texts"], reference=str(d.get("reference", "")),
                         figures_at_export=figures if isinstance(figures, dict) else None)


def _dict(data: dict, key: str, where: str, required: bool = False) -> dict | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, dict):
        raise _fail(where, repr(key), f"must be an object, got {type(value).__name__}")
    return value


@dataclass
class ArtifactSpec:
    """Everything ``manifest.json`` says, typed. ``files`` is filled by ``write_manifest``."""

    source: dict[str, Any]
    family: str
    embed_dim: int
    precision: str
    image: ImageTower
    text: TextTower
    preprocess: Any  # clipfast.inputs.preprocess.PreprocessConfig
    tokenizer: Any  # clipfast.inputs.tokenizer.TokenizerConfig
    logits: LogitsConfig
    io_dtype: str = "fp32"
    opset: int | None = None
    architecture: dict[str, Any] | None = None
    random_weights: bool = False
    clipfast_version: str | None = None
    created: str | None = None
    graph: dict[str, Any] = field(default_factory=dict)
    gates: dict[str, Any] = field(default_factory=dict)
    fidelity: dict[str, Any] | None = None
    golden: GoldenSection | None = None
    exported_on: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None
    tensorrt: dict[str, Any] | None = None
    export_seconds: float | None = None
    stage_seconds: dict[str, float] | None = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def tower(self, name: str) -> ImageTower | TextTower:
        if name not in TOWERS:
            raise ValueError(f"tower {name!r}: expected one of {TOWERS}")
        return self.image if name == "image" else self.text

    # -- reading -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, where: str = "manifest") -> ArtifactSpec:
        """A validated spec from the manifest's JSON; ArtifactError naming the field."""
        from clipfast.inputs.preprocess import PreprocessConfig
        from clipfast.inputs.tokenizer import TokenizerConfig

        if not isinstance(data, dict):
            raise _fail(where, "the manifest", f"must be an object, got {type(data).__name__}")
        for key in ("family", "precision"):
            if not isinstance(data.get(key), str):
                raise _fail(where, repr(key), f"must be a string, got {data.get(key)!r}")
        embed_dim = data.get("embed_dim")
        if not isinstance(embed_dim, int) or isinstance(embed_dim, bool) or embed_dim < 1:
            raise _fail(where, "'embed_dim'", f"must be a positive integer, got {embed_dim!r}")
        parsed: dict[str, Any] = {}
        for key, parse in (("preprocess", PreprocessConfig.from_dict),
                           ("tokenizer", TokenizerConfig.from_dict)):
            section = _dict(data, key, where, required=True)
            try:
                parsed[key] = parse(section)
            except ArtifactError:
                raise
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise _fail(where, f"'{key}' section", f"is invalid: {e}") from e
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(
            source=_dict(data, "source", where, required=True), family=data["family"],
            embed_dim=embed_dim, precision=data["precision"], image=parse_image(data.get("image"),
                                                                           where),
            text=parse_text(data.get("text"), where), logits=LogitsConfig.from_dict(
                data.get("logits"), where), io_dtype=str(data.get("io_dtype") or "fp32"),
            opset=data.get("opset"), architecture=_dict(data, "architecture", where),
            random_weights=bool(data.get("random_weights")),
            clipfast_version=data.get("clipfast_version"), created=data.get("created"),
            graph=_dict(data, "graph", where) or {}, gates=_dict(data, "gates", where) or {},
            fidelity=_dict(data, "fidelity", where), golden=parse_golden(data.get("golden"), where),
            exported_on=_dict(data, "exported_on", where),
            quantization=_dict(data, "quantization", where),
            tensorrt=_dict(data, "tensorrt", where), export_seconds=data.get("export_seconds"),
            stage_seconds=_dict(data, "stage_seconds", where),
            files=_dict(data, "files", where) or {},
            extra={k: v for k, v in data.items() if k not in known
                   and k not in ("format", "format_version")},
            **parsed)

    # -- writing -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The manifest's JSON (without format fields and checksums: ``write_manifest`` adds
        those)."""
        out: dict[str, Any] = {
            "clipfast_version": self.clipfast_version, "created": self.created,
            "source": self.source, "family": self.family, "architecture": self.architecture,
            "random_weights": self.random_weights, "embed_dim": self.embed_dim,
            "precision": self.precision, "io_dtype": self.io_dtype, "opset": self.opset,
            "image": self.image.to_dict(), "text": self.text.to_dict(),
            "preprocess": self.preprocess.to_dict(), "tokenizer": self.tokenizer.to_dict(),
            "logits": self.logits.to_dict(), "graph": self.graph, "gates": self.gates,
            "fidelity": self.fidelity,
            "golden": self.golden.to_dict() if self.golden else None,
            "exported_on": self.exported_on,
        }
        for key in ("quantization", "tensorrt", "export_seconds", "stage_seconds"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out.update(self.extra)
        return out
