"""The protocol every backend implements."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import numpy as np

from clipfast.errors import ArtifactError, InputError


class Backend(Protocol):
    """A loaded pair of towers.

    run_image: ``float32 (batch, 3, H, W) -> float32 (batch, D)``, not normalised.
    run_text: ``{name: int64 (batch, L)} -> float32 (batch, D)``, not normalised; the names are the
        manifest's ``text.inputs``.
    max_batch: the largest batch one call accepts (the engine chunks to it), or None.
    """

    name: str
    device: str
    max_batch: int | None

    def run_image(self, pixels: np.ndarray) -> np.ndarray: ...

    def run_text(self, inputs: dict[str, np.ndarray]) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...


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
