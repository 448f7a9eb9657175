"""The contract every backend implements (``Backend``), its description (``BackendInfo``) and
the declared backend options (``Option``, ``OptionSpec``: the one place option names and values
are checked)."""

from __future__ import annotations

import abc
import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from clipfast.errors import ArtifactError, InputError


@dataclass(frozen=True)
class BackendInfo:
    """What a loaded backend says about itself (``Backend.info()``, ``Engine.backend_info()``).

    precision: what the towers compute in; None means the artifact's own precision (the Engine's
        ``backend_info()`` fills that in). providers: ONNX Runtime's session providers, in order.
    max_batch / text_lengths: the limits the batch planner honours. tuning: ``backend="auto"``'s
        measured choice on the CPU. details: the backend's ``describe()``. source_model: the
        loaded source model when the backend runs it (torch), for its reference transform and
        tokenizer; None elsewhere.
    """

    name: str
    device: str
    precision: str | None = None
    providers: tuple[str, ...] | None = None
    max_batch: int | None = None
    text_lengths: tuple[int, ...] | None = None
    tuning: Mapping[str, Any] | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    source_model: Any = field(default=None, repr=False, compare=False)


class Backend(abc.ABC):
    """A loaded pair of towers. Every backend subclasses it; the Engine calls nothing else.

    run_image: ``float32 (batch, 3, H, W) -> float32 (batch, D)``, not normalised.
    run_text: ``{name: int64 (batch, L)} -> float32 (batch, D)``, not normalised; the names are the
        manifest's ``text.inputs``.
    run_image_batches / run_text_batches: several batches (any iterable, a generator included,
        consumed lazily) -> one output per batch. The default runs them one at a time; a
        backend that overlaps copies and compute across batches (TensorRT) overrides them.
    name: the backend's name; device: where the towers run ("cpu" or "cuda").
    max_batch: the largest batch one call accepts (the batch planner chunks to it), None = any.
    precision: what the towers compute in when that is not the artifact's precision, else None.
    text_lengths: the text lengths a fixed-shape backend accepts, ascending (None: any).
    tuning: set by ``backend="auto"`` on the CPU (``clipfast.backends.tune``): the measured choice.
    """

    name: ClassVar[str]
    device: str
    max_batch: int | None = None
    precision: str | None = None
    text_lengths: tuple[int, ...] | None = None
    tuning: dict[str, Any] | None = None

    @abc.abstractmethod
    def run_image(self, pixels: Any) -> np.ndarray: ...

    @abc.abstractmethod
    def run_text(self, inputs: dict[str, Any]) -> np.ndarray: ...

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]: ...

    def run_image_batches(self, batches: Iterable[Any]) -> list[np.ndarray]:
        return _one_at_a_time(self.run_image, batches)

    def run_text_batches(self, batches: Iterable[dict[str, Any]]) -> list[np.ndarray]:
        return _one_at_a_time(self.run_text, batches)

    def info(self) -> BackendInfo:
        """This backend's facts: name, device, precision, limits and ``describe()``."""
        return BackendInfo(name=self.name, device=self.device, precision=self.precision,
                           max_batch=self.max_batch, text_lengths=self.text_lengths,
                           tuning=self.tuning, details=self.describe())


def _one_at_a_time(run: Callable[[Any], np.ndarray], batches: Iterable[Any]
                   ) -> list[np.ndarray]:
    outs = []
    for batch in batches:
        outs.append(run(batch))
        batch = None  # noqa: F841 - not kept alive while the next batch is produced
    return outs


# -- options -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    """One backend option: its name, its default, and ``parse(value)``, which returns the value
    the backend uses or raises InputError naming the option and what it accepts."""

    name: str
    default: Any
    parse: Callable[[Any], Any]


class OptionSpec:
    """The options one backend accepts, declared once: ``validate`` is the only check of their
    names and values (the auto chain's up-front check and the backend's ``load`` both call it).
    Iterating gives the option names, as a tuple of them would."""

    def __init__(self, owner: str, *options: Option):
        self.owner = owner
        self.options = {o.name: o for o in options}
        if len(self.options) != len(options):
            raise ValueError(f"{owner}: an option is declared twice")

    def __iter__(self) -> Iterator[str]:
        return iter(self.options)

    def __len__(self) -> int:
        return len(self.options)

    def __contains__(self, name: object) -> bool:
        return name in self.options

    def __repr__(self) -> str:
        return f"OptionSpec({self.owner!r}, {', '.join(self.options)})"

    def validate(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Every declared option, parsed: the given value or the default. InputError names an
        unknown option (with the closest valid name) or a bad value."""
        check_options(given, tuple(self.options), f"backend {self.owner}")
        return {name: o.parse(given[name]) if name in given else o.default
                for name, o in self.options.items()}


def check_options(options: Mapping[str, Any],
                  valid: Iterable[str] | Mapping[str, Iterable[str]], owner: str) -> None:
    """InputError unless every key of ``options`` is in ``valid``: it names each unknown option
    (with the closest valid name when one is near) and lists the valid ones. ``valid`` is one
    backend's ``OPTIONS``, or ``{backend: OPTIONS}`` for several (listed per backend); ``owner``
    says whose options they are ("backend onnxruntime", ...)."""
    per_backend = ({name: tuple(opts) for name, opts in valid.items()}
                   if isinstance(valid, Mapping) else None)
    accepted = (tuple(dict.fromkeys(o for opts in per_backend.values() for o in opts))
                if per_backend is not None else tuple(valid))
    unknown = [k for k in options if k not in accepted]
    if not unknown:
        return
    named = []
    for key in unknown:
        near = difflib.get_close_matches(str(key), accepted, n=1)
        named.append(f"{key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    if per_backend is not None:
        listing = "; ".join(f"{name}: {', '.join(sorted(opts)) or 'none'}"
                            for name, opts in per_backend.items())
    else:
        listing = ", ".join(sorted(accepted)) or "none"
    plural = "s" if len(unknown) > 1 else ""
    raise InputError(f"{owner}: unknown option{plural} {', '.join(named)}; valid options: "
                     f"{listing}")


def option_bool(name: str, value: Any, owner: str = "backend") -> bool:
    """A backend option that must be True or False; InputError naming it otherwise."""
    if not isinstance(value, bool):
        raise InputError(f"{owner} option {name}={value!r}: expected True or False")
    return value


def option_choice(name: str, value: Any, choices: tuple[str, ...], owner: str = "backend"
                  ) -> Any:
    """A backend option that must be one of ``choices``; InputError naming it otherwise."""
    if value not in choices:
        raise InputError(f"{owner} option {name}={value!r}: expected one of "
                         f"{', '.join(map(str, choices))}")
    return value


def option_device_id(value: Any) -> int:
    """The ``device_id`` backend option: a CUDA device index."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InputError(f"backend option device_id={value!r}: expected a CUDA device index >= 0")
    return value


def flag(name: str, default: bool | None, *, owner: str = "backend",
         none_ok: bool = False) -> Option:
    """A True / False option; ``none_ok``: None is accepted too (the backend's default)."""
    return Option(name, default,
                  lambda v: v if none_ok and v is None else option_bool(name, v, owner))


def choice(name: str, default: Any, choices: tuple[str, ...], *, owner: str = "backend"
           ) -> Option:
    """An option that must be one of ``choices``."""
    return Option(name, default, lambda v: option_choice(name, v, choices, owner))


DEVICE_ID = Option("device_id", 0, option_device_id)




def is_torch_tensor(x: Any, device_type: str | None = None) -> bool:
    """Whether ``x`` is a torch tensor (on ``device_type`` when given), without importing torch
    (the CPU runtime does not need it)."""
    if not (type(x).__module__.startswith("torch") and hasattr(x, "data_ptr")):
        return False
    return device_type is None or getattr(getattr(x, "device", None), "type", None) == device_type


def host_array(x, dtype) -> np.ndarray:
    """A contiguous numpy array of ``dtype`` from numpy or a torch tensor (GPU preprocessing
    hands the towers torch CUDA tensors; backends that run on the host copy them down here)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=dtype)


def text_feed(inputs: dict[str, Any], expected: dict[str, Any]) -> dict[str, np.ndarray]:
    """The text tower's feed: each input the graph declares (``{name: dtype}``), from the
    tokenizer's arrays, as a contiguous host array of the graph's dtype."""
    feed = {}
    for name, dtype in expected.items():
        if name not in inputs:
            raise ArtifactError(f"text tower expects input {name!r}; tokenizer gave "
                                f"{sorted(inputs)}")
        feed[name] = host_array(inputs[name], dtype)
    return feed
