"""Phatgoose for Python: PHATGOOSE mixture-of-LoRA-experts routing on CPUs, through libphatgoose's C ABI.

    import numpy as np, phatgoose
    with phatgoose.Runtime("lib", top_k=2) as runtime:
        q = runtime.layer("encoder.block.0.layer.0.SelfAttention.q")
        delta, experts, weights = runtime.apply(q, x, return_routing=True)   # x: [tokens, in] float32

Arrays go in and out without copies when they are float32 and C-contiguous. Failures raise a subclass of
`phatgoose.Error` carrying the library's message. The library is found through PHATGOOSE_LIBRARY, next to this
package, in a repository build (.build/release), or where the dynamic linker finds libphatgoose.so. See
docs/embedding.md.
"""

import numpy as np

from . import safetensors
from ._errors import (BufferTooSmallError, Error, FileError, InternalError, InvalidArgumentError, InvalidHandleError,
                      LibraryError, MemoryCapError, NotFoundError, OverloadedError, ShapeError, ShutDownError)
from ._native import lib as _lib
from ._runtime import Layer, Library, Module, Runtime, Statistics

__version__ = _lib.phatgoose_version().decode()
ABI_VERSION = _lib.phatgoose_abi_version()


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
           "BufferTooSmallError", "InternalError", "checksum", "safetensors", "ABI_VERSION"]
