"""Loading libphatgoose and declaring its C ABI (include/phatgoose.h) for ctypes.

The library is loaded on first use of `lib` (PEP 562), not at import, so that the parts of the package that do not
call it (the gate tools, `phatgoose.safetensors`) work on a machine without it. Every pointer argument is declared as ``c_void_p`` so numpy addresses (``array.ctypes.data``) pass without conversion.
ctypes releases the GIL around each call, so Python threads can apply layers concurrently.
"""

import ctypes
import ctypes.util
import os
import pathlib
import threading

ABI_VERSION = 1

# phatgoose_status
OK = 0
INVALID_ARGUMENT = 1
INVALID_HANDLE = 2
SHAPE = 3
NOT_FOUND = 4
IO = 5
LIBRARY = 6
OVERLOADED = 7
MEMORY_CAP = 8
SHUT_DOWN = 9
BUFFER_TOO_SMALL = 10
INTERNAL = 11
NON_FINITE_INPUT = 12
UNAVAILABLE = 13
TIMEOUT = 14

ROUTERS = {None: 0, "phatgoose": 1, "arrow": 2, "uniform": 3}
EXECUTORS = {None: 0, "pinned": 0, "dispatch": 1}
PLACEMENTS = {None: 0, "distribute": 0, "isolate": 1, "replicate-hot": 2, "in-place": 3}
WORKERS_DEFAULT = -1
MAX_TOP_K = 4096


class RuntimeOptions(ctypes.Structure):
    """phatgoose_runtime_options."""
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("router", ctypes.c_int32),
        ("top_k", ctypes.c_int32),
        ("sequence_length", ctypes.c_int32),
        ("arrow_temperature", ctypes.c_float),
        ("arrow_scaled", ctypes.c_int32),
        ("workers", ctypes.c_int32),
        ("executor", ctypes.c_int32),
        ("placement", ctypes.c_int32),
        ("placement_argument", ctypes.c_int32),
        ("max_queued_calls", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
        ("memory_cap_bytes", ctypes.c_uint64),
        ("spin_microseconds", ctypes.c_int32),
        ("parallel_min_tokens", ctypes.c_int32),
        ("lanes", ctypes.c_int32),
        ("contended_min_tokens", ctypes.c_int32),
    ]


class LayerOutput(ctypes.Structure):
    """phatgoose_layer_output."""
    _fields_ = [
        ("layer", ctypes.c_void_p),
        ("output", ctypes.c_void_p),
        ("output_count", ctypes.c_size_t),
        ("experts", ctypes.c_void_p),
        ("weights", ctypes.c_void_p),
        ("routing_count", ctypes.c_size_t),
    ]


assert ctypes.sizeof(RuntimeOptions) == 72, "RuntimeOptions does not match phatgoose_runtime_options"
assert ctypes.sizeof(LayerOutput) == 48, "LayerOutput does not match phatgoose_layer_output"

_status = ctypes.c_int
_p = ctypes.c_void_p
_size = ctypes.c_size_t
_out_p = ctypes.POINTER(ctypes.c_void_p)
_out_size = ctypes.POINTER(ctypes.c_size_t)
_out_u64 = ctypes.POINTER(ctypes.c_uint64)

_SIGNATURES = {
    "phatgoose_version": (ctypes.c_char_p, []),
    "phatgoose_abi_version": (ctypes.c_uint32, []),
    "phatgoose_status_name": (ctypes.c_char_p, [ctypes.c_int]),
    "phatgoose_last_error_message": (ctypes.c_char_p, []),
    "phatgoose_library_open": (_status, [ctypes.c_char_p, _out_p]),
    "phatgoose_library_destroy": (_status, [_p]),
    "phatgoose_library_expert_count": (_status, [_p, _out_size]),
    "phatgoose_library_module_count": (_status, [_p, _out_size]),
    "phatgoose_library_expert_name": (_status, [_p, _size, _p, _size, _out_size]),
    "phatgoose_library_module_name": (_status, [_p, _size, _p, _size, _out_size]),
    "phatgoose_library_module_widths": (_status, [_p, _size, _out_size, _out_size]),
    "phatgoose_runtime_options_init": (_status, [ctypes.POINTER(RuntimeOptions), _size]),
    "phatgoose_runtime_create": (_status, [_p, ctypes.POINTER(RuntimeOptions), _out_p]),
    "phatgoose_runtime_open": (_status, [ctypes.c_char_p, ctypes.POINTER(RuntimeOptions), _out_p]),
    "phatgoose_runtime_shutdown": (_status, [_p]),
    "phatgoose_runtime_destroy": (_status, [_p]),
    "phatgoose_runtime_library": (_status, [_p, _out_p]),
    "phatgoose_runtime_add_expert": (_status, [_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int32)]),
    "phatgoose_runtime_remove_expert": (_status, [_p, ctypes.c_char_p]),
    "phatgoose_runtime_statistics": (_status, [_p, _out_u64, _out_u64, _out_u64, _p, _size, _out_size]),
    "phatgoose_layer_create": (_status, [_p, ctypes.c_char_p, _out_p]),
    "phatgoose_layer_destroy": (_status, [_p]),
    "phatgoose_layer_shape": (_status, [_p, _out_size, _out_size, _out_size]),
    "phatgoose_runtime_apply": (_status, [_p, _p, _p, _size, _size, _p, _size, _p, _p, _size]),
    "phatgoose_mpi_available": (ctypes.c_int, []),
    "phatgoose_distributed_open": (_status, [ctypes.c_char_p, _size, ctypes.c_uint64, _size, ctypes.c_double, _out_p]),
    "phatgoose_distributed_destroy": (_status, [_p]),
    "phatgoose_distributed_rank_count": (_status, [_p, _out_size]),
    "phatgoose_distributed_rank_share": (_status, [_p, _size, _out_u64, _out_size]),
    "phatgoose_distributed_module": (_status, [_p, ctypes.c_char_p, _out_size, _out_size, _out_size, _out_size]),
    "phatgoose_distributed_apply": (_status, [_p, _size, _p, _size, _size, _p, _size, _p, _p, _size]),
    "phatgoose_runtime_apply_layers": (_status, [_p, _p, _size, _size, ctypes.POINTER(LayerOutput), _size]),
}


def _candidates():
    """Where libphatgoose may be, most specific first."""
    explicit = os.environ.get("PHATGOOSE_LIBRARY")
    if explicit:
        yield explicit
        return
    here = pathlib.Path(__file__).resolve().parent
    yield str(here / "libphatgoose.so")
    # A checkout of the repository: python/phatgoose/ -> the package root, built with `swift build`.
    root = here.parent.parent
    if (root / "Package.swift").exists():
        for configuration in ("release", "debug"):
            yield str(root / ".build" / configuration / "libPhatgooseC.so")
    found = ctypes.util.find_library("phatgoose")
    if found:
        yield found
    for prefix in ("/usr/local/lib", "/usr/lib"):
        yield os.path.join(prefix, "libphatgoose.so")


def load():
    """Loads libphatgoose (``PHATGOOSE_LIBRARY`` names it explicitly) and declares its functions."""
    tried = []
    for candidate in _candidates():
        if os.path.sep in candidate and not os.path.exists(candidate):
            tried.append(candidate)
            continue
        try:
            library = ctypes.CDLL(candidate)
        except OSError as error:
            tried.append(f"{candidate} ({error})")
            continue
        break
    else:
        raise ImportError("phatgoose: cannot find libphatgoose.so; install it (scripts/install.sh), build it "
                          "(swift build -c release) or set PHATGOOSE_LIBRARY. Tried: " + "; ".join(tried))
    for name, (restype, argtypes) in _SIGNATURES.items():
        function = getattr(library, name)
        function.restype = restype
        function.argtypes = argtypes
    abi = library.phatgoose_abi_version()
    if abi != ABI_VERSION:
        raise ImportError(f"phatgoose: {library._name} has ABI version {abi}, this package needs {ABI_VERSION}")
    return library


_load_lock = threading.Lock()


def __getattr__(name):
    """`lib`: libphatgoose, loaded by the first access (ImportError when it cannot be found or does not match)."""
    if name != "lib":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _load_lock:  # two threads' first calls load it once
        if "lib" not in globals():
            globals()["lib"] = load()  # later lookups find the global and no longer come here
    return globals()["lib"]
