"""A small safetensors reader and writer on numpy, for tests and examples (what `phatgoose apply` reads and writes).

`load(path)` returns ``{name: array}``; BF16 tensors are widened to float32 (numpy has no bfloat16), other dtypes
keep their own. `save(path, tensors)` writes arrays of the dtypes in `_WRITE` contiguously, with the header padded
to 8 bytes, as `phatgoose` does.
"""

import json
import os
import struct

import numpy as np

_READ = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_WRITE = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("float64"): "F64",
          np.dtype("int32"): "I32", np.dtype("int64"): "I64", np.dtype("uint8"): "U8"}


class SafetensorsError(ValueError):
    """The file breaks the safetensors format; the message names the file and what is wrong."""


def load(path):
    """Every tensor of the safetensors file at `path`, in file order (metadata is dropped)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise SafetensorsError(f"{path}: expected an 8-byte header length, found {len(data)} bytes")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise SafetensorsError(f"{path}: expected a header of {length} bytes, found {len(data) - 8} bytes after the length")
    try:
        header = json.loads(data[8:8 + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SafetensorsError(f"{path}: expected a JSON header, found invalid JSON ({error})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: expected a JSON object header")
    body = memoryview(data)[8 + length:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], [int(n) for n in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: tensor '{name}': expected dtype, shape and data_offsets, found {info!r}") from None
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if not 0 <= begin <= end <= len(body):
            raise SafetensorsError(f"{path}: tensor '{name}': expected data inside the file, found offsets {begin}..{end}")
        raw = body[begin:end]
        if dtype == "BF16":
            if len(raw) != count * 2:
                raise SafetensorsError(f"{path}: tensor '{name}': expected {count * 2} bytes, found {len(raw)}")
            halves = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            array = halves.view(np.float32)
        elif dtype in _READ:
            numpy_dtype = _READ[dtype]
            if len(raw) != count * numpy_dtype.itemsize:
                raise SafetensorsError(f"{path}: tensor '{name}': expected {count * numpy_dtype.itemsize} bytes, found {len(raw)}")
            array = np.frombuffer(raw, dtype=numpy_dtype).astype(numpy_dtype.newbyteorder("="), copy=True)
        else:
            raise SafetensorsError(f"{path}: tensor '{name}': expected a known dtype, found {dtype}")
        tensors[name] = array.reshape(shape)
    return tensors  # in the order of the header's keys


def save(path, tensors):
    """Writes `tensors` (``{name: array}``, in that order) as a safetensors file at `path`."""
    header, chunks, offset = {}, [], 0
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        if array.dtype not in _WRITE:
            raise SafetensorsError(f"{path}: tensor '{name}': expected one of {sorted(_WRITE.values())}, found {array.dtype}")
        raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _WRITE[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    with open(os.fspath(path), "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for chunk in chunks:
            f.write(chunk)
