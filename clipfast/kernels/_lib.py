"""Loading libclipfast_kernels.so (csrc/, built by the top-level CMakeLists.txt): lazy, once.

Search order: ``$CLIPFAST_KERNELS_LIB`` (a file path), then this package's folder, then
``build/`` at the root of a source checkout. ``CLIPFAST_DISABLE_KERNELS=1`` turns the library
off (both are declared in clipfast.settings). The outcome is decided on the first call to
:func:`load_library` / :func:`kernels_available` and logged once, with the reason; importing
this module loads nothing and never touches CUDA (loading the library does not either: its CUDA
runtime is initialised on the first kernel call).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

from clipfast import settings
from clipfast.errors import BackendUnavailable, ClipfastError

logger = logging.getLogger("clipfast.kernels")

LIB_NAME = "libclipfast_kernels.so"
ABI_VERSION = 1  # csrc/clipfast_kernels.h CLIPFAST_ABI_VERSION

# Return codes of the C ABI (CLIPFAST_E*).
OK, EINVAL, ECUDA, ENVJPEG, EUNSUPPORTED = 0, 1, 2, 3, 4
_CODE_NAMES = {EINVAL: "invalid argument", ECUDA: "CUDA error", ENVJPEG: "nvJPEG error",
               EUNSUPPORTED: "unsupported"}

# Pillow's Image.Resampling numbers (csrc CLIPFAST_FILTER_*); NEAREST is not implemented.
FILTERS = {"lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}
VERTICAL_FIRST = 1  # clipfast_image_desc.flags: CLIPFAST_VERTICAL_FIRST


class KernelError(ClipfastError, RuntimeError):
    """A csrc/ entry point returned an error; the message is the library's own."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class ImageDesc(ctypes.Structure):
    """clipfast_image_desc: one source image in the packed buffer and its geometry."""

    _fields_ = [
        ("offset", ctypes.c_int64),
        ("height", ctypes.c_int32),
        ("width", ctypes.c_int32),
        ("channels", ctypes.c_int32),
        ("resized_h", ctypes.c_int32),
        ("resized_w", ctypes.c_int32),
        ("top", ctypes.c_int32),
        ("left", ctypes.c_int32),
        ("flags", ctypes.c_int32),  # VERTICAL_FIRST
    ]


class PreprocessParams(ctypes.Structure):
    """clipfast_preprocess_params."""

    _fields_ = [
        ("out_h", ctypes.c_int32),
        ("out_w", ctypes.c_int32),
        ("filter", ctypes.c_int32),
        ("out_dtype", ctypes.c_int32),
        ("fill", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
        ("rescale", ctypes.c_double),
        ("offset", ctypes.c_float),
        ("mean", ctypes.c_float * 3),
        ("std", ctypes.c_float * 3),
        ("reserved2", ctypes.c_float),
    ]


assert ctypes.sizeof(ImageDesc) == 40 and ctypes.sizeof(PreprocessParams) == 64

_lock = threading.Lock()
_state: tuple[ctypes.CDLL | None, str] | None = None


def candidate_paths() -> list[Path]:
    """Where the library is looked for, in order."""
    given = settings.CLIPFAST_KERNELS_LIB
    if given is not None:
        return [given]
    here = Path(__file__).resolve().parent
    return [here / LIB_NAME, here.parents[1] / "build" / LIB_NAME]


def _declare(lib: ctypes.CDLL) -> None:
    """argtypes / restype of every entry point (csrc/clipfast_kernels.h)."""
    c_int, c_void_p = ctypes.c_int, ctypes.c_void_p
    c_int64, c_int32 = ctypes.c_int64, ctypes.c_int32
    p_i32 = ctypes.POINTER(c_int32)
    sigs = {
        "clipfast_abi_version": (c_int, []),
        "clipfast_last_error": (ctypes.c_char_p, []),
        "clipfast_build_info": (ctypes.c_char_p, []),
        "clipfast_preprocess": (c_int, [c_void_p, c_int64, ctypes.POINTER(ImageDesc), c_int32,
                                        ctypes.POINTER(PreprocessParams), c_void_p, c_void_p]),
        "clipfast_jpeg_decoder_create": (c_int, [c_int, ctypes.POINTER(c_void_p)]),
        "clipfast_jpeg_decoder_destroy": (c_int, [c_void_p]),
        "clipfast_jpeg_decoder_backend": (c_int, [c_void_p]),
        "clipfast_jpeg_info": (c_int, [c_void_p, ctypes.POINTER(c_void_p),
                                       ctypes.POINTER(ctypes.c_size_t), c_int32, p_i32, p_i32,
                                       p_i32]),
        "clipfast_jpeg_decode": (c_int, [c_void_p, ctypes.POINTER(c_void_p),
                                         ctypes.POINTER(ctypes.c_size_t), c_int32, c_void_p,
                                         c_int64, ctypes.POINTER(c_int64), p_i32, p_i32,
                                         c_void_p]),
        "clipfast_attention": (c_int, [c_void_p, c_void_p, c_void_p, c_void_p, c_int32, c_int32,
                                       c_int32, c_int32, c_int32, ctypes.c_float, c_int32,
                                       c_void_p]),
        "clipfast_attention_path": (c_int, [c_int32, c_int32]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)  # AttributeError names a missing symbol: stale library
        fn.restype = restype
        fn.argtypes = argtypes


def _load() -> tuple[ctypes.CDLL | None, str]:
    if settings.CLIPFAST_DISABLE_KERNELS:
        return None, f"disabled by {settings.assignment('CLIPFAST_DISABLE_KERNELS')}"
    paths = candidate_paths()
    found = [p for p in paths if p.is_file()]
    if not found:
        where = ", ".join(str(p) for p in paths)
        return None, (f"{LIB_NAME} not built (looked in {where}); build it with "
                      "`cmake -S . -B build && cmake --build build -j` on a machine with nvcc, "
                      "or point CLIPFAST_KERNELS_LIB at it")
    path = found[0]
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        return None, f"cannot load {path}: {exc}"
    try:
        _declare(lib)
    except AttributeError as exc:
        return None, f"{path} is stale or not clipfast's ({exc}); rebuild it"
    abi = lib.clipfast_abi_version()
    if abi != ABI_VERSION:
        return None, f"{path} has ABI version {abi}, this clipfast needs {ABI_VERSION}; rebuild it"
    return lib, f"loaded {path} ({lib.clipfast_build_info().decode()})"


def load_library() -> ctypes.CDLL | None:
    """The loaded library, or None (reason in :func:`kernels_available`). Decided once."""
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                lib, reason = _load()
                if lib is not None:
                    logger.info("clipfast kernels: %s", reason)
                elif "not built" in reason or reason.startswith("disabled"):
                    logger.info("clipfast kernels unavailable: %s; using reference paths", reason)
                else:
                    logger.warning("clipfast kernels unavailable: %s; using reference paths",
                                   reason)
                _state = (lib, reason)
    return _state[0]


def kernels_available() -> tuple[bool, str]:
    """(True, "loaded <path> (...)") or (False, why not). Never initialises CUDA."""
    load_library()
    assert _state is not None
    return _state[0] is not None, _state[1]


def require_library() -> ctypes.CDLL:
    """The library, or BackendUnavailable naming why it is missing."""
    lib = load_library()
    if lib is None:
        assert _state is not None
        raise BackendUnavailable(f"clipfast kernels not available: {_state[1]}")
    return lib


def check(lib: ctypes.CDLL, rc: int, what: str) -> None:
    """Raise KernelError with clipfast_last_error() when rc is not CLIPFAST_OK."""
    if rc != OK:
        msg = (lib.clipfast_last_error() or b"").decode(errors="replace")
        kind = _CODE_NAMES.get(rc, f"error {rc}")
        raise KernelError(f"{what}: {kind}: {msg}", rc)


def _reset_for_tests() -> None:
    """Forget the load outcome so the next call re-reads the environment (tests only)."""
    global _state
    with _lock:
        _state = None


def preload_nvjpeg() -> str | None:
    """Load pip's libnvjpeg (nvidia-nvjpeg wheel) globally so csrc's dlopen finds it by soname.

    Returns the path loaded, or None when no wheel copy exists (the system one is then used).
    """
    try:
        import nvidia  # namespace package of NVIDIA's wheels
    except ImportError:
        return None
    for root in getattr(nvidia, "__path__", []):
        for sub in ("cu13/lib", "cu12/lib", "nvjpeg/lib"):
            folder = Path(root) / sub
            for cand in sorted(folder.glob("libnvjpeg.so*")) if folder.is_dir() else []:
                try:
                    ctypes.CDLL(str(cand), mode=ctypes.RTLD_GLOBAL)
                    return str(cand)
                except OSError:
                    continue
    return None
