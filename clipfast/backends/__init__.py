"""Backends: one module each behind one small protocol (see ``base.Backend``).

``auto`` tries the chain for the requested device and records why each skipped one was skipped:
- device "cuda": tensorrt, onnxruntime on CUDA, onnxruntime on the CPU, torch on CUDA, torch on
  the CPU. The order is speed first, then how little the backend needs installed: onnxruntime
  on the CPU still serves a machine whose GPU stack is incomplete, and the torch backend (the
  source model; it needs the export extras and the weights) is the last resort.
- device "cpu": onnxruntime, openvino, torch.

Every backend subclasses ``base.Backend`` (run_image / run_text, their streaming forms,
max_batch, device, ``info()``), the contract the Engine calls.

Backend options: each backend module declares the ones it accepts (``OPTIONS``, a
``base.OptionSpec``), whose ``validate`` is the one check of option names and values: the
module's ``load()`` calls it, and ``resolve_backend`` calls it for every backend it may load
before loading any (a bad value fails at once, on every machine); in ``auto`` each backend gets
only its own options.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from clipfast.backends.base import Backend, BackendInfo, OptionSpec, check_options
from clipfast.errors import BackendUnavailable, ClipfastError, FidelityError

AUTO_CHAIN = {
    "cuda": (("tensorrt", "cuda"), ("onnxruntime", "cuda"), ("onnxruntime", "cpu"),
             ("torch", "cuda"), ("torch", "cpu")),
    "cpu": (("onnxruntime", "cpu"), ("openvino", "cpu"), ("torch", "cpu")),
}
AUTO_ORDER = tuple(dict.fromkeys(name for chain in AUTO_CHAIN.values() for name, _ in chain))
_MODULES = {
    "tensorrt": "clipfast.backends.tensorrt.backend",
    "onnxruntime": "clipfast.backends.onnxruntime",
    "openvino": "clipfast.backends.openvino",
    "torch": "clipfast.backends.torch",
}
_INSTALL = {
    "tensorrt": "pip install 'clipfast[tensorrt]'",
    "onnxruntime": "pip install onnxruntime (onnxruntime-gpu for CUDA)",
    "openvino": "pip install 'clipfast[openvino]'",
    "torch": "pip install 'clipfast[export]'",
}


def available_backends() -> tuple[str, ...]:
    return tuple(_MODULES)


def backend_module(name: str):
    """The module of backend ``name``: ClipfastError for an unknown name, BackendUnavailable
    saying what to install when it cannot be imported."""
    if name not in _MODULES:
        raise ClipfastError(
            f"backend {name!r} is unknown; choose one of: auto, {', '.join(_MODULES)}"
        )
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as e:  # a backend module importing its runtime at module level
        raise BackendUnavailable(f"backend {name}: {e}; install it with {_INSTALL[name]}") from e


def option_spec(name: str) -> OptionSpec:
    """The options backend ``name`` declares (its module's ``OPTIONS``)."""
    return backend_module(name).OPTIONS


def backend_options(name: str) -> tuple[str, ...]:
    """The names of the options backend ``name`` accepts."""
    return tuple(option_spec(name))


def check_backend_options(name: str, options: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """``{backend: its option names}`` for the backends ``name`` may load (every backend for
    "auto", whatever the device: one options dict serves every machine), after checking
    ``options``: InputError names an option none of them accepts (listing theirs) or a value
    one of them refuses (each backend's ``OPTIONS.validate``). A backend whose module cannot be
    imported is left out (it cannot run; loading it says why)."""
    if name != "auto":
        option_spec(name).validate(options)
        return {name: backend_options(name)}
    specs = {}
    for candidate in AUTO_ORDER:
        try:
            specs[candidate] = option_spec(candidate)
        except BackendUnavailable:
            continue
    accepted = {n: tuple(spec) for n, spec in specs.items()}
    check_options(options, accepted, f"backend auto ({', '.join(accepted)})")
    for spec in specs.values():
        spec.validate({k: v for k, v in options.items() if k in spec})
    return accepted


def load_backend(name: str, manifest, device: str, threads: int | None = None, **options
                 ) -> Backend:
    """Instantiate backend ``name`` with its own ``options`` (InputError for any other); raises
    BackendUnavailable saying what is missing."""
    return backend_module(name).load(manifest, device=device, threads=threads, **options)


def _label(name: str, device: str, requested: str) -> str:
    return name if requested == "cpu" else f"{name} ({device})"


def resolve_backend(name: str, manifest, device: str, *, fallback: bool = True,
                    check: Callable[[Backend, str], Any] | None = None,
                    threads: int | None = None, golden=None,
                    allow_precisions: tuple[str, ...] = (), retune: bool = False, **options
                    ) -> tuple[Backend, list[tuple[str, str]]]:
    """Return ``(backend, fallbacks)`` where fallbacks lists ``(skipped_backend, reason)``.

    An explicit ``name`` runs on ``device`` or raises BackendUnavailable; ``auto`` walks
    AUTO_CHAIN[device]. ``fallback=False`` makes ``auto`` raise at the first backend that cannot
    run instead of trying the next. ``check(backend, label)`` (the Engine's self-check) runs on
    each loaded backend: its FidelityError is raised for an explicit backend, and in ``auto``
    is a skip whose reason carries the figures.

    ``options`` (the Engine's ``backend_options``) are checked before anything loads: one that
    no backend ``name`` may load accepts, or a value one of them refuses, raises InputError
    (``check_backend_options``, through each backend's ``OPTIONS.validate``). In
    ``auto`` each backend gets the options it accepts, so an option of one backend does not
    trouble the others. ``threads`` goes to every backend (the CPU ones use it).

    ``auto`` on the CPU measures instead of walking a fixed order (``clipfast.backends.tune``):
    the fastest of onnxruntime and openvino at the artifact's precision (and bf16 when
    ``allow_precisions`` has it) that pass ``check``, timed on ``golden``, cached per host
    (``retune`` measures afresh); torch only when none of them runs. ``CLIPFAST_AUTO_TUNE=0``
    walks AUTO_CHAIN["cpu"] instead.
    """
    accepted = check_backend_options(name, options)
    if name != "auto":
        backend = load_backend(name, manifest, device, threads=threads, **options)
        if check is not None:
            check(backend, f"backend {name} ({device})")
        return backend, []
    skipped: list[tuple[str, str]] = []
    failed_check = False
    chain = AUTO_CHAIN[device]
    from clipfast import settings

    if device == "cpu" and settings.CLIPFAST_AUTO_TUNE:
        from clipfast.backends import tune
        from clipfast.backends.onnxruntime import physical_cores

        tunable = [n for n in ("onnxruntime", "openvino") if n in accepted]

        def load_candidate(c: tune.Candidate) -> Backend:
            own = {k: v for k, v in options.items() if k in accepted[c.backend]}
            return load_backend(c.backend, manifest, "cpu", threads=threads,
                                **{**own, **dict(c.options)})

        backend, tune_skipped = tune.resolve_cpu(
            manifest, load=load_candidate, check=check, golden=golden,
            threads=threads or physical_cores(), allow=tune.parse_allow(allow_precisions),
            available=tunable, fallback=fallback, retune=retune)
        skipped.extend(tune_skipped)
        if backend is not None:
            return backend, skipped
        failed_check = any(r.startswith("self-check failed") for _, r in tune_skipped)
        chain = tuple((n, d) for n, d in chain if n not in tunable)
    for candidate, dev in chain:
        label = _label(candidate, dev, device)
        own = {k: v for k, v in options.items() if k in accepted.get(candidate, ())}
        try:
            backend = load_backend(candidate, manifest, dev, threads=threads, **own)
            if check is not None:
                check(backend, f"backend {candidate} ({dev})")
            return backend, skipped
        except BackendUnavailable as e:
            if not fallback:
                raise
            skipped.append((label, str(e)))
        except FidelityError as e:
            if not fallback:
                raise
            failed_check = True
            skipped.append((label, f"self-check failed: {e}"))
    reasons = "; ".join(f"{n}: {r}" for n, r in skipped)
    error = FidelityError if failed_check else BackendUnavailable
    raise error(f"no backend can run this artifact on {device!r}: {reasons}")


__all__ = ["AUTO_CHAIN", "AUTO_ORDER", "Backend", "BackendInfo", "available_backends",
           "backend_module", "backend_options", "check_backend_options", "load_backend",
           "option_spec", "resolve_backend"]
