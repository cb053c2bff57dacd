"""The distributed runtime's binding, up to where MPI would start: arguments and handles are checked first, so
these run in any process. The exchange itself runs under mpirun in CI (Examples/python/distributed.py)."""

import ctypes
import os
import pathlib
import subprocess
import sys

import pytest

import phatgoose
from phatgoose import _native

lib = _native.lib


def test_arguments_are_refused_before_mpi_starts(synth):
    library, _ = synth
    assert phatgoose.mpi_available() in (True, False)
    with pytest.raises(phatgoose.InvalidArgumentError, match="top_k: expected an integer from 1"):
        phatgoose.DistributedRuntime(library, top_k=0)
    with pytest.raises(phatgoose.InvalidArgumentError, match="timeout: expected a positive number of seconds"):
        phatgoose.DistributedRuntime(library, timeout=0)
    with pytest.raises(phatgoose.InvalidArgumentError, match="memory_cap_bytes: expected a positive number"):
        phatgoose.DistributedRuntime(library, memory_cap_bytes=-5)
    out = ctypes.c_void_p()
    assert lib.phatgoose_distributed_open(b"", 0, 0, 0, 30.0, ctypes.byref(out)) == _native.INVALID_ARGUMENT
    assert b"path: expected the path of a library" in lib.phatgoose_last_error_message()
    assert lib.phatgoose_distributed_open(str(library).encode(), 0, 0, 0, 30.0, None) == _native.INVALID_ARGUMENT
    assert out.value is None


def test_handles_of_other_kinds_are_refused(synth):
    library, _ = synth
    count = ctypes.c_size_t()
    assert lib.phatgoose_distributed_rank_count(None, ctypes.byref(count)) == _native.INVALID_HANDLE
    assert b"expected a distributed runtime handle, found NULL" in lib.phatgoose_last_error_message()
    with phatgoose.Runtime(library, workers=0) as runtime:
        handle = runtime._handle.live()
        assert lib.phatgoose_distributed_rank_count(handle, ctypes.byref(count)) == _native.INVALID_HANDLE
        assert b"found a runtime handle" in lib.phatgoose_last_error_message()
        assert lib.phatgoose_distributed_apply(handle, 0, None, 0, 0, None, 0, None, None, 0) == _native.INVALID_HANDLE
    assert lib.phatgoose_distributed_destroy(None) == _native.OK


ONE_RANK = """
import sys, numpy as np, phatgoose
from phatgoose import safetensors
library, path = sys.argv[1], sys.argv[2]
x = safetensors.load(path)
with phatgoose.Runtime(library, workers=0) as local, phatgoose.DistributedRuntime(library) as served:
    (share,) = served.ranks
    assert share.rank == 0 and share.experts == 6 and share.resident_bytes > 0, share
    for name, rows in x.items():
        a = local.apply(name, rows, return_routing=True)
        b = served.apply(name, rows, return_routing=True)
        for u, v in zip(a, b):
            assert u.dtype == v.dtype and u.shape == v.shape and u.tobytes() == v.tobytes(), name
    try:
        served.apply("no.such.module", x[name])
    except phatgoose.NotFoundError as error:
        assert "no.such.module" in str(error)
    else:
        raise AssertionError("an unknown module was applied")
print("compared", len(x))
"""


def test_one_rank_world_gives_the_bits_of_one_process(synth):
    library, x = synth
    if not phatgoose.mpi_available():
        with pytest.raises(phatgoose.UnavailableError, match="this build of Phatgoose has no MPI"):
            phatgoose.DistributedRuntime(library)
        return
    # MPI starts once per process and ends with the runtime: a child process of its own.
    python = str(pathlib.Path(phatgoose.__file__).resolve().parents[1])
    result = subprocess.run([sys.executable, "-c", ONE_RANK, str(library), str(x)], capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, PYTHONPATH=python))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("compared ") and result.stdout.split()[1] != "0"
