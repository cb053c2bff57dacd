"""Phatgoose for Python: PHATGOOSE mixture-of-LoRA-experts routing on CPUs, through libphatgoose's C ABI.

    import numpy as np, phatgoose
    with phatgoose.Runtime("lib", top_k=2) as runtime:
        q = runtime.layer("encoder.block.0.layer.0.SelfAttention.q")
        delta, experts, weights = runtime.apply(q, x, return_routing=True)   # x: [tokens, in] float32

Arrays go in and out without copies when they are float32 and C-contiguous. Failures raise a subclass of
`phatgoose.Error` carrying the library's message. The library is found through PHATGOOSE_LIBRARY, next to this
package, in a repository build (.build/release), or where the dynamic linker finds libphatgoose.so. See
docs/embedding.md.

The library is loaded when first needed (the first use of `Runtime`, `Library`, `Layer`, `Module`, `Statistics`,
`__version__` or `ABI_VERSION`), which raises ImportError if it cannot be found. Without it, the rest of the package
still works: the errors, `checksum`, `phatgoose.safetensors`, and the gate tools (`python3 -m phatgoose.train_gates`,
`python3 -m phatgoose.average_activation`, which need the `train` extra instead).
"""

import numpy as np

from . import safetensors
from ._errors import (BufferTooSmallError, Error, FileError, InternalError, InvalidArgumentError, InvalidHandleError,
                      LibraryError, MemoryCapError, NonFiniteInputError, NotFoundError, OverloadedError, RankTimeoutError,
                      ShapeError, ShutDownError, UnavailableError)

# Names whose value needs libphatgoose, resolved on first access by __getattr__ (PEP 562).
_RUNTIME_NAMES = frozenset({"Runtime", "Library", "Layer", "Module", "Statistics", "DistributedRuntime", "RankShare",
                           "mpi_available"})
_LIBRARY_NAMES = frozenset({"__version__", "ABI_VERSION"})


def __getattr__(name):
    if name in _RUNTIME_NAMES:
        from . import _runtime  # loads libphatgoose
        value = getattr(_runtime, name)
    elif name in _LIBRARY_NAMES:
        from . import _native
        value = (_native.lib.phatgoose_version().decode() if name == "__version__"
                 else _native.lib.phatgoose_abi_version())
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # resolved once; later lookups do not come here
    return value


def __dir__():
    return sorted(set(globals()) | _RUNTIME_NAMES | _LIBRARY_NAMES)


def checksum(*arrays):
    """FNV-1a (64-bit) over the bytes of `arrays` in order (C order, native byte order), as 16 hex digits: the
    checksum the C example (Examples/c/route.c) prints for (delta, experts, weights)."""
    value = 0xCBF29CE484222325
    for array in arrays:
        for byte in memoryview(np.ascontiguousarray(array)).cast("B"):
            value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{value:016x}"

__all__ = ["Runtime", "Library", "Layer", "Module", "Statistics", "Error", "InvalidArgumentError", "InvalidHandleError",
           "ShapeError", "NotFoundError", "FileError", "LibraryError", "OverloadedError", "MemoryCapError", "ShutDownError",
           "BufferTooSmallError", "InternalError", "NonFiniteInputError", "UnavailableError", "RankTimeoutError",
           "DistributedRuntime", "RankShare", "mpi_available", "checksum", "safetensors", "ABI_VERSION"]
