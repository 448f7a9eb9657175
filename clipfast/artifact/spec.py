"""The artifact manifest's schema: typed sections that the export writes and the runtime reads.

One set of dataclasses for both sides (as timm's ``PretrainedCfg`` and open_clip's
``PreprocessCfg`` serve both their writers and readers): ``ArtifactSpec.from_dict`` validates a
manifest (the only place it is validated) and raises ArtifactError naming the field; ``to_dict``
writes it back. Fields unknown to this version (a newer minor version's additions) are kept in
``extra`` and written back unchanged, and a section read from a file is written back in the
file's own key order, so reading and rewriting a manifest (``clipfast build-engines`` adds its
``tensorrt`` section) gives byte-identical JSON apart from what was changed. The sections the
export records about itself (graph, gates, quantization, tensorrt) are typed in
``clipfast.artifact.sections``. File I/O, checksums and containment live in
``clipfast.artifact.manifest``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clipfast.artifact.sections import Gates as Gates
from clipfast.artifact.sections import (
    GraphSection,
    JsonSection,
    Layout,
    Quantization,
    Reader,
    TensorRTSection,
    emit,
    extra_field,
    fail,
    field_defaults,
    layout_field,
)
from clipfast.errors import ArtifactError

FORMAT = "clipfast-artifact"
FORMAT_VERSION = 1
LOGIT_KINDS = ("softmax", "sigmoid")
TOWERS = ("image", "text")
# text.sequence: "dynamic" (any length up to context_length, padding-independent) or "fixed"
SEQUENCE_KINDS = ("dynamic", "fixed")
# keys every manifest has (the runtime cannot do without them)
REQUIRED = ("source", "family", "embed_dim", "precision", "image", "text", "preprocess",
            "tokenizer", "logits", "files")


@dataclass(frozen=True)
class LogitsConfig(JsonSection):
    """How similarities become logits: ``kind`` is "softmax" (CLIP, ALIGN) or "sigmoid" (SigLIP).

    logits = scale * cos_sim + bias  (bias only for sigmoid models).
    """

    kind: str
    scale: float
    bias: float | None = None
    extra: dict[str, Any] = extra_field()
    layout: Layout | None = layout_field()

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest", section: str = "logits"
                  ) -> LogitsConfig:
        r = Reader(d, where, section)
        if d.get("kind") not in LOGIT_KINDS:
            raise fail(where, "logits.kind", f"must be one of {LOGIT_KINDS}, got "
                       f"{d.get('kind')!r}")
        r.known.add("kind")
        try:
            scale = float(r.number("scale", ...))
            bias = r.number("bias")
        except ArtifactError as e:
            raise fail(where, "logits.scale / logits.bias", f"must be numbers ({e})") from e
        return cls(kind=d["kind"], scale=scale, bias=None if bias is None else float(bias),
                   extra=r.extra, layout=r.layout)

    def probabilities(self, logits: Any) -> Any:
        """Logits ``(N, L)`` -> float32 probabilities: a softmax over the labels, or independent
        sigmoids for sigmoid models (computed in float64)."""
        import numpy as np

        z = np.asarray(logits, dtype=np.float64)
        if self.kind == "sigmoid":
            probs = 1.0 / (1.0 + np.exp(-z))
        else:
            probs = np.exp(z - z.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
        return probs.astype(np.float32)


@dataclass(frozen=True)
class ImageTower(JsonSection):
    """The image tower's graph: ``file`` takes ``input`` float ``(batch, *shape)`` and gives
    ``output`` ``(batch, embed_dim)``."""

    file: str
    shape: tuple[int, ...]
    input: str = "pixel_values"
    output: str = "image_embeds"
    dtype: str = "float32"
    output_dtype: str = "float32"
    extra: dict[str, Any] = extra_field()
    layout: Layout | None = layout_field()

    ORDER = ("file", "input", "output", "shape", "dtype", "output_dtype")

    @classmethod
    def from_dict(cls, d: Any, where: str, section: str = "image") -> ImageTower:
        r = Reader(d, where, section)
        shape = r.get("shape", list, "a list of positive integers", [])
        if not shape or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                for x in shape):
            raise fail(where, "image.shape", f"must be a list of positive integers, got "
                       f"{d.get('shape')!r}")
        return cls(file=r.string("file"), shape=tuple(shape),
                   input=r.string("input", "pixel_values"),
                   output=r.string("output", "image_embeds"),
                   dtype=r.string("dtype", "float32"),
                   output_dtype=r.string("output_dtype", "float32"), extra=r.extra,
                   layout=r.layout)


@dataclass(frozen=True)
class TextTower(JsonSection):
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
    extra: dict[str, Any] = extra_field()
    layout: Layout | None = layout_field()

    @property
    def dynamic(self) -> bool:
        return self.sequence == "dynamic"

    @classmethod
    def from_dict(cls, d: Any, where: str, section: str = "text") -> TextTower:
        r = Reader(d, where, section)
        inputs = r.names("inputs", [])
        if not inputs:
            raise fail(where, "text.inputs", f"must be a non-empty list of names, got "
                       f"{d.get('inputs')!r}")
        sequence = r.string("sequence", "fixed")
        if sequence not in SEQUENCE_KINDS:
            raise fail(where, "text.sequence", f"must be one of {SEQUENCE_KINDS}, got "
                       f"{sequence!r}")
        return cls(file=r.string("file"), inputs=tuple(inputs),
                   output=r.string("output", "text_embeds"), dtype=r.string("dtype", "int32"),
                   output_dtype=r.string("output_dtype", "float32"), sequence=sequence,
                   sequence_reason=r.string("sequence_reason", ""), extra=r.extra,
                   layout=r.layout)


@dataclass
class GoldenSection(JsonSection):
    """Golden inputs and the fp32 source's outputs (``clipfast.artifact.selfcheck``)."""

    file: str
    images: int = 0
    texts: int = 0
    reference: str = ""
    figures_at_export: dict[str, Any] | None = None
    extra: dict[str, Any] = extra_field()
    layout: Layout | None = layout_field()

    @classmethod
    def from_dict(cls, d: Any, where: str, section: str = "golden") -> GoldenSection:
        what = "an object with a 'file' string"
        r = Reader(d, where, section, what)
        if not isinstance(d.get("file"), str):
            raise fail(where, "'golden'", f"must be {what}, got {d!r}")
        counts = {k: d.get(k, 0) for k in ("images", "texts")}
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                   for v in counts.values()):
            raise fail(where, "golden.images / golden.texts", f"must be counts, got {counts}")
        r.known.update(counts)
        return cls(file=r.string("file"), **counts, reference=r.string("reference", ""),
                   figures_at_export=r.obj("figures_at_export"), extra=r.extra,
                   layout=r.layout)


def _config(r: Reader, key: str, parse: Any) -> Any:
    """The ``preprocess`` / ``tokenizer`` section through its own ``from_dict``."""
    section = r.obj(key, ...)
    if key == "tokenizer" and not isinstance(section.get("file", ""), str):
        raise fail(r.where, "tokenizer.file", f"must be a string, got {section['file']!r}")
    try:
        return parse(section)
    except ArtifactError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise fail(r.where, f"'{key}' section", f"is invalid: {e}") from e


@dataclass
class ArtifactSpec(JsonSection):
    """Everything ``manifest.json`` says, typed. ``files`` is filled by ``write_manifest``.

    Optional sections absent from a manifest take the defaults declared here: no gates, an
    empty graph record, no quantization or TensorRT record, no stated bf16 gates."""

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
    graph: GraphSection = field(default_factory=GraphSection)
    gates: Gates = field(default_factory=Gates)
    fidelity: dict[str, Any] | None = None
    golden: GoldenSection | None = None
    exported_on: dict[str, Any] | None = None
    quantization: Quantization | None = None
    tensorrt: TensorRTSection | None = None
    export_seconds: float | None = None
    stage_seconds: dict[str, float] | None = None
    # gates for running the towers at another precision than the artifact's (``{"bf16":
    # ...}`` in fp32 and fp16 artifacts: OpenVINO's bf16 path is held to these)
    precision_gates: dict[str, Gates] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = extra_field()
    layout: Layout | None = layout_field()
    # how the preprocess and tokenizer sections were read (their classes are not sections)
    config_layouts: dict[str, Layout] = field(default_factory=dict, kw_only=True, repr=False,
                                              compare=False)

    ORDER = ("clipfast_version", "created", "source", "family", "architecture",
             "random_weights", "embed_dim", "precision", "io_dtype", "opset", "image", "text",
             "preprocess", "tokenizer", "logits", "graph", "gates", "fidelity", "golden",
             "exported_on", "quantization", "tensorrt", "export_seconds", "stage_seconds",
             "precision_gates", "files")
    OMIT = frozenset({"quantization", "tensorrt", "export_seconds", "stage_seconds",
                      "precision_gates", "files"})

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
            raise fail(where, "the manifest", f"must be an object, got {type(data).__name__}")
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise ArtifactError(f"{where}: missing keys {missing}")
        if not isinstance(data["files"], dict):
            raise fail(where, "'files'", "must be an object mapping file names to {'sha256', "
                       f"'bytes'}}, got {type(data['files']).__name__}")
        r = Reader(data, where, "")
        r.known.update(("format", "format_version"))
        embed_dim = r.get("embed_dim", int, "a positive integer", ...)
        if embed_dim < 1:
            raise fail(where, "'embed_dim'", f"must be a positive integer, got {embed_dim!r}")
        configs = {"preprocess": _config(r, "preprocess", PreprocessConfig.from_dict),
                   "tokenizer": _config(r, "tokenizer", TokenizerConfig.from_dict)}
        return cls(
            source=r.obj("source", ...), family=r.string("family"), embed_dim=embed_dim,
            precision=r.string("precision"), image=r.section("image", ImageTower, ...),
            text=r.section("text", TextTower, ...), logits=r.section("logits", LogitsConfig),
            io_dtype=r.string("io_dtype", "fp32"), opset=r.integer("opset"),
            architecture=r.obj("architecture"),
            random_weights=r.get("random_weights", bool, "true or false", False),
            clipfast_version=r.string("clipfast_version", None),
            created=r.string("created", None),
            graph=r.section("graph", GraphSection, GraphSection()),
            gates=r.section("gates", Gates, Gates()), fidelity=r.obj("fidelity"),
            golden=r.section("golden", GoldenSection), exported_on=r.obj("exported_on"),
            quantization=r.section("quantization", Quantization),
            tensorrt=r.section("tensorrt", TensorRTSection),
            export_seconds=r.number("export_seconds"), stage_seconds=r.obj("stage_seconds"),
            precision_gates=r.sections("precision_gates", Gates), files=r.obj("files"),
            extra=r.extra, layout=r.layout,
            config_layouts={k: Layout.of(data[k]) for k in configs}, **configs)

    # -- writing -------------------------------------------------------------------------------
    def json_values(self) -> dict[str, Any]:
        values = super().json_values()
        for key in ("preprocess", "tokenizer"):
            config = getattr(self, key)
            values[key] = emit(config.to_dict(), field_defaults(type(config)), frozenset(),
                               self.config_layouts.get(key), {})
        if self.layout is not None:  # where the file had them (write_manifest sets them)
            values.update(format=FORMAT, format_version=FORMAT_VERSION)
        return values

    def to_dict(self) -> dict[str, Any]:
        """The manifest's JSON. Built in code: without format fields and checksums
        (``write_manifest`` adds those); read from a file: that file's JSON, unchanged apart
        from what was set since."""
        return super().to_dict()
