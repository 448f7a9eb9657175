"""The machinery of the manifest's typed sections, and the sections the export records about
itself: ``graph`` (fusion and conversion per tower), ``gates`` (fidelity gates),
``quantization`` (int8 reports) and ``tensorrt`` (engines last built).

Every section reads its JSON object through :class:`Reader`, which checks each field's type and
raises ArtifactError naming it, keeps the fields this version does not know in ``extra``, and
remembers how the object was written (key order, keys that were null). ``to_dict`` writes the
section back from that record, so a manifest read and rewritten is byte-identical JSON; a
section built in code is written in its declared order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from clipfast.errors import ArtifactError

_MISSING = ...  # a required field (``Reader.get``'s default)
NUMBER = (int, float)


def fail(where: str, name: str, problem: str) -> ArtifactError:
    """An ArtifactError naming the manifest (``where``) and the field."""
    return ArtifactError(f"{where}: {name} {problem}")


@dataclass(frozen=True)
class Layout:
    """How a JSON object was written: its keys in order, and those whose value was null."""

    keys: tuple[str, ...]
    nulls: frozenset[str]

    @classmethod
    def of(cls, d: dict[str, Any]) -> Layout:
        return cls(tuple(d), frozenset(k for k, v in d.items() if v is None))


def to_json(value: Any) -> Any:
    """``value`` as JSON data: sections through ``to_dict``, tuples as lists."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value


def field_defaults(cls: type) -> dict[str, Any]:
    """``{field: its default as JSON}`` of a dataclass's fields that have one."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = to_json(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = to_json(f.default_factory())
    return out


def emit(values: dict[str, Any], defaults: dict[str, Any], omit: frozenset[str],
         layout: Layout | None, extra: dict[str, Any]) -> dict[str, Any]:
    """A section's JSON object from ``values`` (every known field as JSON, in declared order).

    Built in code (``layout`` None): the declared order, fields of ``omit`` left out while they
    hold their default, then ``extra``. Read from a file: the file's keys in its order (a null
    read back as null while the field still holds its default), then the fields set since, each
    after the declared field before it."""
    def is_default(k: str) -> bool:
        return k in defaults and values[k] == defaults[k] and type(values[k]) is type(
            defaults[k])

    if layout is None:
        out = {k: v for k, v in values.items() if not (k in omit and is_default(k))}
        out.update(extra)
        return out
    out = {}
    for k in layout.keys:
        if k in values:
            out[k] = None if k in layout.nulls and is_default(k) else values[k]
        elif k in extra:
            out[k] = extra[k]
    order = list(values)
    for i, k in enumerate(order):
        if k in out or is_default(k):
            continue
        after = next((p for p in reversed(order[:i]) if p in out), None)
        items = list(out.items())
        at = 0 if after is None else [n for n, _ in items].index(after) + 1
        out = dict(items[:at] + [(k, values[k])] + items[at:])
    out.update((k, v) for k, v in extra.items() if k not in out)
    return out


class Reader:
    """Typed reads of one JSON object of the manifest, each failure naming the field: as
    ``section.key`` inside a section, as ``'key'`` at the top level (``section`` "")."""

    def __init__(self, d: Any, where: str, section: str, what: str = "an object"):
        if not isinstance(d, dict):
            raise fail(where, repr(section) if "." not in section else section,
                       f"must be {what}, got {type(d).__name__}")
        self.d, self.where, self.prefix = d, where, section
        self.known: set[str] = set()

    def path(self, key: str) -> str:
        """``section.key``, the name a nested section is read under."""
        return f"{self.prefix}.{key}" if self.prefix else key

    def name(self, key: str) -> str:
        """How errors name a field: ``'key'`` at the top level, ``section.key`` below."""
        return self.path(key) if self.prefix else repr(key)

    def get(self, key: str, kinds: type | tuple[type, ...], what: str,
            default: Any = _MISSING) -> Any:
        """``d[key]`` when of ``kinds`` (bools are not numbers); ``default`` when absent or
        null; ArtifactError naming the field otherwise (or when required and absent)."""
        self.known.add(key)
        value = self.d.get(key)
        if value is None:
            if default is _MISSING:
                if key not in self.d:
                    raise fail(self.where, repr(self.prefix) if self.prefix else "the manifest",
                               f"section lacks {key!r}")
                raise fail(self.where, self.name(key), f"must be {what}, got None")
            return default
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in (
                kinds if isinstance(kinds, tuple) else (kinds,))):
            raise fail(self.where, self.name(key), f"must be {what}, got {value!r}")
        return value

    def string(self, key: str, default: Any = _MISSING) -> Any:
        return self.get(key, str, "a string", default)

    def number(self, key: str, default: Any = None) -> Any:
        return self.get(key, NUMBER, "a number", default)

    def integer(self, key: str, default: Any = None) -> Any:
        return self.get(key, int, "an integer", default)

    def obj(self, key: str, default: Any = None) -> Any:
        return self.get(key, dict, "an object", default)

    def names(self, key: str, default: Any = None) -> Any:
        value = self.get(key, list, "a list of names", default)
        if value is not default and not all(isinstance(n, str) for n in value):
            raise fail(self.where, self.name(key), f"must be a list of names, got {value!r}")
        return value

    def section(self, key: str, cls: Any, default: Any = None) -> Any:
        """A nested typed section (``cls.from_dict``), or ``default`` when absent or null
        (``...``: required)."""
        self.known.add(key)
        value = self.d.get(key)
        if value is None and default is not _MISSING:
            return default
        return cls.from_dict(value, self.where, self.path(key))

    def sections(self, key: str, cls: Any) -> dict[str, Any]:
        """``{name: typed section}`` of an object of sections (``{}`` when absent or null)."""
        value = self.obj(key, {})
        return {k: cls.from_dict(v, self.where, f"{self.path(key)}.{k}")
                for k, v in value.items()}

    @property
    def extra(self) -> dict[str, Any]:
        return {k: v for k, v in self.d.items() if k not in self.known}

    @property
    def layout(self) -> Layout:
        return Layout.of(self.d)


def extra_field() -> Any:
    """Fields of a newer minor version, kept and written back unchanged."""
    return field(default_factory=dict, kw_only=True)


def layout_field() -> Any:
    """How the section was read (None: built in code); not part of its value."""
    return field(default=None, kw_only=True, repr=False, compare=False)


class JsonSection:
    """Writing of a typed section (a dataclass with ``extra`` and ``layout`` fields)."""

    # JSON key order, when it differs from the order of the fields
    ORDER: ClassVar[tuple[str, ...]] = ()
    # fields a section built in code writes only when they differ from their default
    OMIT: ClassVar[frozenset[str]] = frozenset()

    def json_values(self) -> dict[str, Any]:
        names = self.ORDER or tuple(f.name for f in dataclasses.fields(self)
                                    if f.name not in ("extra", "layout"))
        return {n: to_json(getattr(self, n)) for n in names}

    def to_dict(self) -> dict[str, Any]:
        return emit(self.json_values(), field_defaults(type(self)), self.OMIT,
                    self.layout, self.extra)


# --------------------------------------------------------------------------- the sections


@dataclass
class Gates(JsonSection):
    """The fidelity gates an artifact is held to (``clipfast.artifact.fidelity.GATES``); None:
    not gated. ``as_dict`` is what ``check_gates`` takes."""

    pixel_max_levels: float | None = None
    image_centred_rel_error_max: float | None = None
    text_centred_rel_error_max: float | None = None
    image_cosine_min: float | None = None
    text_cosine_min: float | None = None
    token_ids_identical: bool | None = None
    top1_agreement_min: float | None = None
    retrieval_pairs_min: int | None = None
    extra: dict[str, Any] = extra_field()
    layout: Layout | None = layout_field()

    OMIT = frozenset({"pixel_max_levels", "image_centred_rel_error_max",
                      "text_centred_rel_error_max", "image_cosine_min", "text_cosine_min",
                      "token_ids_identical", "top1_agreement_min", "retrieval_pairs_min"})

    @classmethod
    def from_dict(cls, d: Any, where: str, section: str = "gates") -> Gates:
        r = Reader(d, where, section)
        numbers = {k: r.number(k) for k in (
            "pixel_max_levels", "image_centred_rel_error_max", "text_centred_rel_error_max",
            "image_cosine_min", "text_cosine_min", "top1_agreement_min")}
        return cls(**numbers, token_ids_identical=r.get("token_ids_identical", bool,
                                                        "true or false", None),
                   retrieval_pairs_min=r.integer("retrieval_pairs_min"), extra=r.extra,
                   layout=r.layout)

    def as_dict(self) -> dict[str, Any]:
        """Every stated gate (those of a newer version included), unset ones left out."""
        return {k: v for k, v in self.to_dict().items() if v is not None}


@dataclass
class TowerGraph(JsonSection):
    """What the export did to one tower's graph: ONNX Runtime's fusions (``fusion`` says
    "ok" or why not; ``fused`` counts the fused operators), the fp16 conversion report, and
    ``contrib_ops``, the op types outside the standard ONNX domain (TensorRT and OpenVINO
    read these instead of the graph)."""

    fused: dict[str, int] | None = None
    fusion: str | None = None
    model_type: str | None = None
    layers: int | None = None
    num_heads: int | None = None
    hidden_size: int | None = None
    opt_level: int | None = None
    rejected_counts: dict[str, int] | None = None
    check_max_rel_diff: float | None = None
    fp16: dict[str, Any] | None = None
    contrib_ops: list[str] | None = None
    extra: dict[str, Any] = extra_field()
    layout: Layout | None = layout_field()

    OMIT = frozenset({"model_type", "layers", "num_heads", "hidden_size", "opt_level",
                      "rejected_counts", "check_max_rel_diff", "fp16", "contrib_ops"})

    @classmethod
    def from_dict(cls, d: Any, where: str, section: str) -> TowerGraph:
        r = Reader(d, where, section)
        return cls(fused=r.obj("fused"), fusion=r.string("fusion", None),
                   model_type=r.string("model_type", None), layers=r.integer("layers"),
                   num_heads=r.integer("num_heads"), hidden_size=r.integer("hidden_size"),
                   opt_level=r.integer("opt_level"), rejected_counts=r.obj("rejected_counts"),
                   check_max_rel_diff=r.number("check_max_rel_diff"), fp16=r.obj("fp16"),
                   contrib_ops=r.names("contrib_ops"), extra=r.extra, layout=r.layout)


@dataclass
class GraphSection(JsonSection):
    """The ``graph`` section: one :class:`TowerGraph` per tower (None in artifacts exported
    before the record existed)."""

    image: TowerGraph | None = None
    text: TowerGraph | None = None
    extra: dict[str, Any] = extra_field()
    layout: Layout | None = layout_field()

    OMIT = frozenset({"image", "text"})

    @classmethod
    def from_dict(cls, d: Any, where: str, section: str = "graph") -> GraphSection:
        r = Reader(d, where, section)
        return cls(image=r.section("image", TowerGraph), text=r.section("text", TowerGraph),
                   extra=r.extra, layout=r.layout)

    def tower(self, name: str) -> TowerGraph | None:
        return self.image if name == "image" else self.text if name == "text" else None

    def contrib_ops(self, tower: str) -> list[str] | None:
        """The recorded non-standard op types of ``tower``'s graph, or None when unrecorded."""
        record = self.tower(tower)
        return None if record is None else record.contrib_ops


@dataclass
class Quantization(JsonSection):
    """The ``quantization`` section of an int8 artifact: the calibration set, the method and
    format asked for, and per tower the fp32 graph quantized (``image_graph``: "plain" or
    "fused") and the quantizer's report (``image``: options, counts, guard attempts)."""

    calibration: dict[str, Any] | None = None
    int8_method: str | None = None
    int8_format: str | None = None
    image_graph: str | None = None
    image: dict[str, Any] | None = None
    text_graph: str | None = None
    text: dict[str, Any] | None = None
    extra: dict[str, Any] = extra_field()
    layout: Layout | None = layout_field()

    OMIT = frozenset({"calibration", "int8_method", "int8_format", "image_graph", "image",
                      "text_graph", "text"})

    @classmethod
    def from_dict(cls, d: Any, where: str, section: str = "quantization") -> Quantization:
        r = Reader(d, where, section)
        return cls(calibration=r.obj("calibration"), int8_method=r.string("int8_method", None),
                   int8_format=r.string("int8_format", None),
                   image_graph=r.string("image_graph", None), image=r.obj("image"),
                   text_graph=r.string("text_graph", None), text=r.obj("text"),
                   extra=r.extra, layout=r.layout)

    def report(self, tower: str) -> dict[str, Any] | None:
        """The quantizer's report for ``tower``, or None."""
        return self.image if tower == "image" else self.text if tower == "text" else None


@dataclass
class TensorRTEngine(JsonSection):
    """One engine of the ``tensorrt`` section: its cache key, TensorRT version and GPU."""

    key: str
    tensorrt: str | None = None
    compute_capability: str | None = None
    extra: dict[str, Any] = extra_field()
    layout: Layout | None = layout_field()

    @classmethod
    def from_dict(cls, d: Any, where: str, section: str) -> TensorRTEngine:
        r = Reader(d, where, section)
        return cls(key=r.string("key"), tensorrt=r.string("tensorrt", None),
                   compute_capability=r.string("compute_capability", None), extra=r.extra,
                   layout=r.layout)


@dataclass
class TensorRTSection(JsonSection):
    """The ``tensorrt`` section (``clipfast build-engines``): the batch profile, the engine
    cache folder and the engines last built for it. Engines are a local cache, not artifact
    files."""

    profile: dict[str, Any]
    cache: str
    engines: dict[str, TensorRTEngine] = field(default_factory=dict)
    note: str = ""
    extra: dict[str, Any] = extra_field()
    layout: Layout | None = layout_field()

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest", section: str = "tensorrt"
                  ) -> TensorRTSection:
        r = Reader(d, where, section)
        return cls(profile=r.obj("profile", _MISSING), cache=r.string("cache"),
                   engines=r.sections("engines", TensorRTEngine), note=r.string("note", ""),
                   extra=r.extra, layout=r.layout)
