"""Library, Runtime and Layer: the C ABI's three handles as Python objects (see docs/embedding.md).

Thread safety: a Runtime (and its layers) may be used from any number of threads at once; the GIL is released
during each call into the library, so applies on different threads run concurrently (they take turns on the
runtime's executor). Closing an object while another thread uses it is safe: the library checks every handle on
entry, and the other thread gets an InvalidHandleError (or finishes, if its call had already started).
"""

import ctypes
import os
import threading
from collections import namedtuple

import numpy as np

from . import _native
from ._errors import NON_FINITE_INPUT, check, closed, error_for, invalid, shape

lib = _native.lib

Module = namedtuple("Module", ["name", "in_width", "out_width"])
Module.__doc__ = "A routed module (layer) of a library: its name and widths."

Statistics = namedtuple("Statistics", ["calls", "tokens", "rejected", "tokens_per_expert"])
Statistics.__doc__ = ("Counters since the runtime started: calls (one per layer applied), tokens (summed over layers), "
                      "calls rejected by admission control, and token assignments per expert index (numpy uint64).")


def _int32(name, value, minimum=-(2 ** 31)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise invalid(f"{name}: expected an integer, found {value!r}")
    if not minimum <= int(value) < 2 ** 31:
        raise invalid(f"{name}: expected an integer from {minimum} to {2 ** 31 - 1}, found {value}")
    return int(value)


class _Handle:
    """An owned C handle and its destroy function; closing is idempotent and safe from any thread."""

    def __init__(self, value, destroy, noun):
        self._value = value
        self._destroy = destroy
        self._noun = noun
        self._lock = threading.Lock()

    def live(self):
        value = self._value
        if value is None:
            raise closed(self._noun)
        return value

    @property
    def closed(self):
        return self._value is None

    def close(self):
        with self._lock:
            value, self._value = self._value, None
        if value is not None:
            status = self._destroy(value)
            # INVALID_HANDLE: already destroyed with its runtime; nothing left to release.
            if status not in (_native.OK, _native.INVALID_HANDLE):
                raise error_for(status)


def _new_handle(function, *arguments):
    out = ctypes.c_void_p()
    check(function(*arguments, ctypes.byref(out)))
    return out.value


def _name(function, handle, index):
    length = ctypes.c_size_t()
    status = function(handle, index, None, 0, ctypes.byref(length))
    if status not in (_native.OK, _native.BUFFER_TOO_SMALL):
        raise error_for(status)
    buffer = ctypes.create_string_buffer(length.value + 1)
    check(function(handle, index, buffer, len(buffer), ctypes.byref(length)))
    return buffer.value.decode("utf-8")


class Library:
    """An expert library opened from a directory (PEFT layout) or a packed file: its experts and modules."""

    def __init__(self, path):
        self._handle = _Handle(_new_handle(lib.phatgoose_library_open, os.fsencode(path)), lib.phatgoose_library_destroy, "library")

    @classmethod
    def _adopt(cls, value):
        library = cls.__new__(cls)
        library._handle = _Handle(value, lib.phatgoose_library_destroy, "library")
        return library

    @property
    def experts(self):
        """Expert names by expert index."""
        handle = self._handle.live()
        count = ctypes.c_size_t()
        check(lib.phatgoose_library_expert_count(handle, ctypes.byref(count)))
        return [_name(lib.phatgoose_library_expert_name, handle, i) for i in range(count.value)]

    @property
    def modules(self):
        """Routed modules in model order, as Module(name, in_width, out_width)."""
        handle = self._handle.live()
        count = ctypes.c_size_t()
        check(lib.phatgoose_library_module_count(handle, ctypes.byref(count)))
        modules = []
        for i in range(count.value):
            in_width, out_width = ctypes.c_size_t(), ctypes.c_size_t()
            check(lib.phatgoose_library_module_widths(handle, i, ctypes.byref(in_width), ctypes.byref(out_width)))
            modules.append(Module(_name(lib.phatgoose_library_module_name, handle, i), in_width.value, out_width.value))
        return modules

    @property
    def closed(self):
        return self._handle.closed

    def close(self):
        """Releases the library (runtimes created from it are unaffected). Idempotent."""
        self._handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class Layer:
    """One routed layer of a runtime, resolved once from its name. `in_width` and `out_width` are fixed; `slots`
    (routing outputs per token) is asked each time, since the uniform router's changes with the experts."""

    def __init__(self, runtime, name):
        self.runtime = runtime
        self.name = name
        self._handle = _Handle(_new_handle(lib.phatgoose_layer_create, runtime._handle.live(), name.encode("utf-8")),
                               lib.phatgoose_layer_destroy, "layer")
        self.in_width, self.out_width, _ = self._shape()

    def _shape(self):
        widths = [ctypes.c_size_t() for _ in range(3)]
        check(lib.phatgoose_layer_shape(self._handle.live(), *(ctypes.byref(w) for w in widths)))
        return tuple(w.value for w in widths)

    @property
    def slots(self):
        return self._shape()[2]

    @property
    def closed(self):
        return self._handle.closed

    def close(self):
        self._handle.close()

    def __repr__(self):
        return f"Layer({self.name!r}, in_width={self.in_width}, out_width={self.out_width})"

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class Runtime:
    """Serves an expert library: `Runtime(path_or_library, top_k=None, router=None, workers=None, ...)`.

    Options (None takes the default): `top_k` experts per token (the library's); `router` "phatgoose", "arrow" or
    "uniform" (the library's); `workers` threads besides the caller (one fewer than the CPUs); `sequence_length`
    route the mean of each n consecutive tokens (per token); `arrow_temperature` (10) and `arrow_scaled` (False);
    `executor` "pinned" or "dispatch"; `placement` "distribute", "isolate", "replicate-hot" or "in-place" with
    `placement_argument` (the node, or the count); `max_queued_calls` (64); `memory_cap_bytes` (no cap);
    `spin_microseconds`, how long idle pinned workers spin before they sleep (50; 0 sleeps at once);
    `parallel_min_tokens`, below which a call runs on the caller alone and wakes no worker (1: any call may fan out);
    `lanes`, how many dispatches may run at once for calls from several threads (one per participant: workers + 1;
    1: one at a time); `contended_min_tokens`, below which a dispatch stays on the caller while a worker is seen
    preempted (64; 0: never).

    Results equal `phatgoose apply` on the same inputs bit for bit. Use it as a context manager, or call close().
    """

    def __init__(self, library, *, top_k=None, router=None, workers=None, sequence_length=None, arrow_temperature=None,
                 arrow_scaled=False, executor=None, placement=None, placement_argument=0, max_queued_calls=None,
                 memory_cap_bytes=None, spin_microseconds=None, parallel_min_tokens=None, lanes=None, contended_min_tokens=None):
        options = _native.RuntimeOptions()
        check(lib.phatgoose_runtime_options_init(ctypes.byref(options), ctypes.sizeof(options)))
        if top_k is not None:
            options.top_k = _int32("top_k", top_k, minimum=1)
        if router not in _native.ROUTERS:
            raise invalid(f"router: expected one of phatgoose, arrow, uniform, found {router!r}")
        options.router = _native.ROUTERS[router]
        if workers is not None:
            options.workers = _int32("workers", workers, minimum=0)
        if sequence_length is not None:
            options.sequence_length = _int32("sequence_length", sequence_length, minimum=1)
        if arrow_temperature is not None:
            options.arrow_temperature = float(arrow_temperature)
        options.arrow_scaled = 1 if arrow_scaled else 0
        if executor not in _native.EXECUTORS:
            raise invalid(f"executor: expected pinned or dispatch, found {executor!r}")
        options.executor = _native.EXECUTORS[executor]
        if placement not in _native.PLACEMENTS:
            raise invalid(f"placement: expected one of distribute, isolate, replicate-hot, in-place, found {placement!r}")
        options.placement = _native.PLACEMENTS[placement]
        options.placement_argument = _int32("placement_argument", placement_argument)
        if max_queued_calls is not None:
            options.max_queued_calls = _int32("max_queued_calls", max_queued_calls)
        if memory_cap_bytes is not None:
            if isinstance(memory_cap_bytes, bool) or not isinstance(memory_cap_bytes, (int, np.integer)) or not 1 <= memory_cap_bytes < 2 ** 64:
                raise invalid(f"memory_cap_bytes: expected a positive integer below 2**64, found {memory_cap_bytes!r}")
            options.memory_cap_bytes = int(memory_cap_bytes)
        if spin_microseconds is not None:
            # The C field: 0 is the default, -1 (PHATGOOSE_SPIN_NONE) sleeps at once.
            spin = _int32("spin_microseconds", spin_microseconds, minimum=0)
            options.spin_microseconds = -1 if spin == 0 else spin
        if parallel_min_tokens is not None:
            options.parallel_min_tokens = _int32("parallel_min_tokens", parallel_min_tokens, minimum=1)
        if lanes is not None:
            options.lanes = _int32("lanes", lanes, minimum=1)
        if contended_min_tokens is not None:
            # The C field: 0 is the default, -1 (PHATGOOSE_CONTENDED_OFF) never.
            contended = _int32("contended_min_tokens", contended_min_tokens, minimum=0)
            options.contended_min_tokens = -1 if contended == 0 else contended
        if isinstance(library, Library):
            value = _new_handle(lib.phatgoose_runtime_create, library._handle.live(), ctypes.byref(options))
        else:
            value = _new_handle(lib.phatgoose_runtime_open, os.fsencode(library), ctypes.byref(options))
        self._handle = _Handle(value, lib.phatgoose_runtime_destroy, "runtime")
        self._layers = {}
        self._layers_lock = threading.Lock()

    # Layers

    def layer(self, name):
        """The Layer named `name` (a module name); raises NotFoundError when the library has none."""
        return Layer(self, name)

    def _resolve(self, layer):
        if isinstance(layer, Layer):
            return layer  # a layer of another runtime is refused by the library, with its message
        if isinstance(layer, str):
            with self._layers_lock:
                cached = self._layers.get(layer)
            if cached is None or cached.closed:
                cached = Layer(self, layer)
                with self._layers_lock:
                    self._layers[layer] = cached
            return cached
        raise invalid(f"layer: expected a Layer or a module name, found {type(layer).__name__}")

    # Applying

    def apply(self, layer, x, out=None, return_routing=False):
        """Applies `layer` (a Layer or a module name) to `x` [tokens, in] (float32, C order: used in place; any other
        real array is converted; complex, string or object arrays raise InvalidArgumentError). Returns the mixture
        delta [tokens, out] (float32): a new array, or `out` with the delta ADDED into it (float32, C order, shape
        [tokens, out], used in place). With `return_routing`, returns (delta, experts, weights): each token's chosen
        expert indices [tokens, slots] (int32, -1 for a padded slot) and mixture weights (float32).

        Rows of `x` with NaN or infinite values are not routed (experts -1, weights NaN, nothing added to their rows
        of the delta); the other rows are applied, then NonFiniteInputError is raised with what this call would have
        returned as its `result`."""
        layer = self._resolve(layer)
        x = _input(x)
        tokens = x.shape[0]
        out = _output(out, tokens, layer.out_width, "out")
        experts = weights = None
        routing_count = 0
        if return_routing:
            slots = layer.slots
            experts = np.full((tokens, slots), -1, dtype=np.int32)
            weights = np.zeros((tokens, slots), dtype=np.float32)
            routing_count = experts.size
        status = lib.phatgoose_runtime_apply(
            self._handle.live(), layer._handle.live(), x.ctypes.data, tokens, x.size, out.ctypes.data, out.size,
            None if experts is None else experts.ctypes.data, None if weights is None else weights.ctypes.data, routing_count)
        result = (out, experts, weights) if return_routing else out
        _check_applied(status, result)
        return result

    def apply_layers(self, layers, x, outs=None, return_routing=False):
        """Applies several layers sharing one input (q, k and v; same input width) in one call. Returns a list with,
        per layer, what `apply` returns. `outs`, when given, holds one output array per layer (deltas are added)."""
        layers = [self._resolve(layer) for layer in layers]
        if not layers:
            raise invalid("layers: expected at least one layer, found none")
        if outs is not None and len(outs) != len(layers):
            raise shape(f"outs: expected one array per layer ({len(layers)}), found {len(outs)}")
        x = _input(x)
        tokens = x.shape[0]
        entries = (_native.LayerOutput * len(layers))()
        results = []
        for i, layer in enumerate(layers):
            out = _output(None if outs is None else outs[i], tokens, layer.out_width, f"outs[{i}]")
            entries[i].layer = layer._handle.live()
            entries[i].output = out.ctypes.data
            entries[i].output_count = out.size
            if return_routing:
                slots = layer.slots
                experts = np.full((tokens, slots), -1, dtype=np.int32)
                weights = np.zeros((tokens, slots), dtype=np.float32)
                entries[i].experts = experts.ctypes.data
                entries[i].weights = weights.ctypes.data
                entries[i].routing_count = experts.size
                results.append((out, experts, weights))
            else:
                results.append(out)
        status = lib.phatgoose_runtime_apply_layers(self._handle.live(), x.ctypes.data, tokens, x.size, entries, len(layers))
        _check_applied(status, results)
        return results

    # Experts and statistics

    def add_expert(self, directory, name):
        """Adds the expert in `directory` (PEFT layout) under `name`; returns its expert index."""
        index = ctypes.c_int32()
        check(lib.phatgoose_runtime_add_expert(self._handle.live(), os.fsencode(directory), name.encode("utf-8"), ctypes.byref(index)))
        return index.value

    def remove_expert(self, name):
        """Stops routing to the expert `name` (its index stays reserved)."""
        check(lib.phatgoose_runtime_remove_expert(self._handle.live(), name.encode("utf-8")))

    def library(self):
        """A Library describing what the runtime serves now (close it when done)."""
        return Library._adopt(_new_handle(lib.phatgoose_runtime_library, self._handle.live()))

    @property
    def experts(self):
        """Expert names by index (experts removed keep their names and indices)."""
        with self.library() as library:
            return library.experts

    @property
    def modules(self):
        """The modules served now, as Module(name, in_width, out_width)."""
        with self.library() as library:
            return library.modules

    def statistics(self):
        """A Statistics snapshot of the counters since the runtime started."""
        handle = self._handle.live()
        while True:
            count = ctypes.c_size_t()
            check(lib.phatgoose_runtime_statistics(handle, None, None, None, None, 0, ctypes.byref(count)))
            per_expert = np.zeros(count.value, dtype=np.uint64)
            calls, tokens, rejected = ctypes.c_uint64(), ctypes.c_uint64(), ctypes.c_uint64()
            status = lib.phatgoose_runtime_statistics(handle, ctypes.byref(calls), ctypes.byref(tokens), ctypes.byref(rejected),
                                                      per_expert.ctypes.data, per_expert.size, ctypes.byref(count))
            if status == _native.BUFFER_TOO_SMALL:  # an expert was added meanwhile
                continue
            check(status)
            return Statistics(calls.value, tokens.value, rejected.value, per_expert)

    # Lifecycle

    def shutdown(self):
        """Stops the worker threads; later calls raise ShutDownError (statistics() still works). Idempotent."""
        check(lib.phatgoose_runtime_shutdown(self._handle.live()))

    @property
    def closed(self):
        return self._handle.closed

    def close(self):
        """Shuts down and releases the runtime and its layers. Idempotent."""
        self._handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _input(x):
    """`x` as a [tokens, in] float32 C-contiguous aligned array: itself when it already is one (zero copy). Real
    numbers only: converting complex values would drop their imaginary parts, and strings or objects would be parsed
    or guessed at."""
    if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous and x.flags.aligned):
        array = np.asarray(x)
        if array.dtype.kind not in "fiub":
            raise invalid(f"x: expected real numbers (float32, float64, float16, an integer or bool array), found {array.dtype}")
        x = np.require(array, dtype=np.float32, requirements=["C_CONTIGUOUS", "ALIGNED"])
    if x.ndim != 2:
        raise shape(f"x: expected a 2-D array [tokens, in], found {x.ndim} dimensions (shape {x.shape})")
    return x


def _check_applied(status, result):
    """Raises for a failed apply; a NonFiniteInputError (the other rows were applied) carries `result`."""
    if status != _native.OK:
        error = error_for(status)
        if status == NON_FINITE_INPUT:
            error.result = result
        raise error


def _output(out, tokens, width, name):
    """A zeroed [tokens, width] float32 array, or the caller's `out` after checking it can be written in place."""
    if out is None:
        return np.zeros((tokens, width), dtype=np.float32)
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or not out.flags.c_contiguous or not out.flags.aligned \
            or not out.flags.writeable:
        raise invalid(f"{name}: expected a writeable C-contiguous float32 numpy array (written in place), found "
                      f"{type(out).__name__}{'' if not isinstance(out, np.ndarray) else ' of ' + str(out.dtype)}")
    if out.shape != (tokens, width):
        raise shape(f"{name}: expected shape ({tokens}, {width}), found {out.shape}")
    return out


RankShare = namedtuple("RankShare", ["rank", "resident_bytes", "experts"])


def mpi_available():
    """True when this libphatgoose was built with MPI."""
    return bool(lib.phatgoose_mpi_available())


class DistributedRuntime:
    """A library's experts sharded over the ranks of an MPI world (docs/scale-out.md), opened on rank 0 of a process
    started by mpirun; every other rank runs `phatgoose serve-experts --library L`:

        mpirun -np 1 python3 host.py : -np 3 phatgoose serve-experts --library lib.phatpack

    `apply` gives the bits of `Runtime.apply`. Calls from several threads take turns. `close()` stops the serving
    ranks and finalises MPI (so one process opens one distributed runtime). UnavailableError in a build without MPI;
    RankTimeoutError when a rank does not answer within `timeout` seconds."""

    def __init__(self, path, *, top_k=None, memory_cap_bytes=None, replicate_hot=0, timeout=30.0):
        top_k = 0 if top_k is None else _int32("top_k", top_k, minimum=1)
        replicate_hot = _int32("replicate_hot", replicate_hot, minimum=0)
        cap = 0 if memory_cap_bytes is None else int(memory_cap_bytes)
        if cap < 0 or (memory_cap_bytes is not None and cap == 0):
            raise invalid(f"memory_cap_bytes: expected a positive number of bytes or None, found {memory_cap_bytes}")
        if not isinstance(timeout, (int, float)) or not timeout > 0:
            raise invalid(f"timeout: expected a positive number of seconds, found {timeout!r}")
        self._handle = _Handle(_new_handle(lib.phatgoose_distributed_open, os.fsencode(path), top_k, cap, replicate_hot, float(timeout)),
                               lib.phatgoose_distributed_destroy, "distributed runtime")
        self._modules = {}

    @property
    def ranks(self):
        """What each rank holds: RankShare(rank, resident_bytes, experts), rank 0 first."""
        handle = self._handle.live()
        count = ctypes.c_size_t()
        check(lib.phatgoose_distributed_rank_count(handle, ctypes.byref(count)))
        shares = []
        for rank in range(count.value):
            resident, experts = ctypes.c_uint64(), ctypes.c_size_t()
            check(lib.phatgoose_distributed_rank_share(handle, rank, ctypes.byref(resident), ctypes.byref(experts)))
            shares.append(RankShare(rank, resident.value, experts.value))
        return shares

    def _module(self, name):
        if name not in self._modules:
            index, in_width, out_width, slots = (ctypes.c_size_t() for _ in range(4))
            check(lib.phatgoose_distributed_module(self._handle.live(), name.encode("utf-8"), ctypes.byref(index),
                                                   ctypes.byref(in_width), ctypes.byref(out_width), ctypes.byref(slots)))
            self._modules[name] = (index.value, in_width.value, out_width.value, slots.value)
        return self._modules[name]

    def apply(self, module, x, out=None, return_routing=False):
        """Applies module `module` (its name) to `x` [tokens, in], as `Runtime.apply` does."""
        index, in_width, out_width, slots = self._module(module)
        x = _input(x)
        tokens = x.shape[0]
        out = _output(out, tokens, out_width, "out")
        experts = np.full((tokens, slots), -1, dtype=np.int32) if return_routing else None
        weights = np.zeros((tokens, slots), dtype=np.float32) if return_routing else None
        check(lib.phatgoose_distributed_apply(
            self._handle.live(), index, x.ctypes.data, tokens, x.size, out.ctypes.data, out.size,
            None if experts is None else experts.ctypes.data, None if weights is None else weights.ctypes.data,
            0 if experts is None else experts.size))
        return (out, experts, weights) if return_routing else out

    @property
    def closed(self):
        return self._handle.closed

    def close(self):
        self._handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
