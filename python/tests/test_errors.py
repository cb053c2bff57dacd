"""Misuse gets an exception (Python) or a status code (the C ABI, called raw through ctypes) carrying the library's
message, never a crash: bad options, names, shapes, handles, buffers, and calls after close or shutdown."""

import ctypes
import threading

import numpy as np
import pytest

import phatgoose
from phatgoose import _native, safetensors
from phatgoose._errors import NonFiniteInputError

lib = _native.lib
Q = "encoder.block.0.layer.0.SelfAttention.q"      # in 32, out 32
WI = "encoder.block.0.layer.1.DenseReluDense.wi_0"  # in 32, out 64
WO = "encoder.block.0.layer.1.DenseReluDense.wo"    # in 64, out 32


@pytest.fixture
def runtime(synth):
    with phatgoose.Runtime(synth[0]) as opened:
        yield opened


@pytest.fixture
def x(synth):
    return safetensors.load(synth[1])[Q][:8].copy()


def message():
    return lib.phatgoose_last_error_message().decode()


# Python API


def test_opening_a_missing_or_invalid_library_raises_with_the_file(tmp_path):
    with pytest.raises(phatgoose.FileError, match="/nonexistent: cannot open"):
        phatgoose.Runtime("/nonexistent")
    with pytest.raises(phatgoose.LibraryError, match="expected library.json or expert subdirectories"):
        phatgoose.Runtime(tmp_path)
    (tmp_path / "e0").mkdir()
    (tmp_path / "e0" / "adapter_config.json").write_text('{"r": "sixteen"}')
    with pytest.raises(phatgoose.LibraryError, match="adapter_config.json") as raised:
        phatgoose.Library(tmp_path)
    assert raised.value.status_name == "library"


@pytest.mark.parametrize("options, error, text", [
    ({"top_k": 0}, phatgoose.InvalidArgumentError, "top_k: expected an integer from 1"),
    ({"top_k": 5000}, phatgoose.InvalidArgumentError, "options top_k: expected 0 .the library's. to 4096, found 5000"),
    ({"router": "bogus"}, phatgoose.InvalidArgumentError, "router: expected one of phatgoose, arrow, uniform"),
    ({"workers": 5000}, phatgoose.InvalidArgumentError, "options workers: expected 0 to 1024"),
    ({"arrow_temperature": -1.0}, phatgoose.InvalidArgumentError, "options arrow_temperature: expected a positive number"),
    ({"arrow_temperature": float("nan")}, phatgoose.InvalidArgumentError, "arrow_temperature"),
    ({"sequence_length": 0}, phatgoose.InvalidArgumentError, "sequence_length"),
    ({"max_queued_calls": 0}, phatgoose.InvalidArgumentError, "options max_queued_calls: expected at least 1"),
    ({"memory_cap_bytes": 1}, phatgoose.MemoryCapError, "memory cap: expected at most 1 bytes"),
    ({"placement": "isolate", "placement_argument": 99}, phatgoose.InvalidArgumentError, "placement isolate: expected a node"),
    ({"placement": "replicate-hot", "placement_argument": -1}, phatgoose.InvalidArgumentError, "placement replicate"),
    ({"executor": "fibers"}, phatgoose.InvalidArgumentError, "executor"),
    ({"spin_microseconds": -1}, phatgoose.InvalidArgumentError, "spin_microseconds: expected an integer from 0"),
    ({"spin_microseconds": 1_000_001}, phatgoose.InvalidArgumentError, "options spin_microseconds: expected 1 to 1000000"),
    ({"parallel_min_tokens": 0}, phatgoose.InvalidArgumentError, "parallel_min_tokens: expected an integer from 1"),
    ({"lanes": 0}, phatgoose.InvalidArgumentError, "lanes: expected an integer from 1"),
    ({"workers": 1, "lanes": 3}, phatgoose.InvalidArgumentError, "lanes: expected 1 to 2"),
    ({"contended_min_tokens": -1}, phatgoose.InvalidArgumentError, "contended_min_tokens: expected an integer from 0"),
])
def test_bad_options_raise(synth, options, error, text):
    with pytest.raises(error, match=text):
        phatgoose.Runtime(synth[0], **options)


def test_unknown_layer_raises_not_found_naming_it(runtime, x):
    with pytest.raises(phatgoose.NotFoundError, match='layer "no.such.module": expected the name of a module'):
        runtime.layer("no.such.module")
    with pytest.raises(phatgoose.NotFoundError):
        runtime.apply("no.such.module", x)


def test_shapes_are_checked(runtime, x):
    with pytest.raises(phatgoose.ShapeError, match=f"layer {Q}: input_count: expected 8 x 32 = 256 elements, found 248"):
        runtime.apply(Q, x[:, :31])
    with pytest.raises(phatgoose.ShapeError, match="expected a 2-D array"):
        runtime.apply(Q, x[0])
    with pytest.raises(phatgoose.ShapeError, match=r"out: expected shape \(8, 32\), found \(32, 8\)"):
        runtime.apply(Q, x, out=np.zeros((32, 8), np.float32))
    with pytest.raises(phatgoose.InvalidArgumentError, match="out: expected a writeable C-contiguous float32"):
        runtime.apply(Q, x, out=np.zeros((8, 32), np.float64))
    with pytest.raises(phatgoose.InvalidArgumentError, match="C-contiguous"):
        runtime.apply(Q, x, out=np.zeros((32, 8), np.float32).T)
    with pytest.raises(phatgoose.ShapeError, match=f"layer {WO}: expected input width 32, shared with {Q}, found 64"):
        runtime.apply_layers([Q, WO], x)
    with pytest.raises(phatgoose.ShapeError, match="outs: expected one array per layer"):
        runtime.apply_layers([Q, WI], x, outs=[np.zeros((8, 32), np.float32)])


def test_a_failed_apply_leaves_the_output_unchanged(runtime, x):
    out = np.full((8, 64), 7, dtype=np.float32)
    with pytest.raises(phatgoose.ShapeError):
        runtime.apply_layers([WI, WO], x, outs=[out, np.zeros((8, 32), np.float32)])
    assert (out == 7).all()


def test_closed_objects_raise_invalid_handle(synth, x):
    runtime = phatgoose.Runtime(synth[0])
    layer = runtime.layer(Q)
    runtime.close()
    runtime.close()  # idempotent
    with pytest.raises(phatgoose.InvalidHandleError, match="runtime: expected an open runtime, found it closed"):
        runtime.apply(layer, x)
    with pytest.raises(phatgoose.InvalidHandleError, match=r"layer: expected a live layer handle, found no handle \(0x[0-9a-f]+: one that was destroyed"):
        _ = layer.slots  # destroyed with its runtime
    layer.close()  # already destroyed with the runtime: closing is still fine
    library = phatgoose.Library(synth[0])
    library.close()
    with pytest.raises(phatgoose.InvalidHandleError):
        _ = library.experts


def test_a_layer_of_another_runtime_is_refused(synth, x):
    with phatgoose.Runtime(synth[0]) as first, phatgoose.Runtime(synth[0]) as second:
        layer = first.layer(Q)
        with pytest.raises(phatgoose.InvalidHandleError, match="expected a layer of this runtime, found a layer of another runtime"):
            second.apply(layer, x)


def test_calls_after_shutdown_raise_shut_down(synth, donor, x):
    with phatgoose.Runtime(synth[0]) as runtime:
        layer = runtime.layer(Q)
        runtime.apply(layer, x)
        runtime.shutdown()
        runtime.shutdown()  # idempotent
        for call in (lambda: runtime.apply(layer, x), lambda: runtime.layer(WI), lambda: layer.slots,
                     lambda: runtime.add_expert(donor / "expert0", "extra"), lambda: runtime.remove_expert("expert0")):
            with pytest.raises(phatgoose.ShutDownError, match="expected a running runtime, found it shut down"):
                call()
        assert runtime.statistics().calls == 1  # still readable
        assert len(runtime.experts) == 6


def test_expert_changes_that_cannot_be_made_raise(runtime, donor, tmp_path):
    with pytest.raises(phatgoose.LibraryError, match='expert "expert0": expected a new name'):
        runtime.add_expert(donor / "expert0", "expert0")
    with pytest.raises(phatgoose.Error, match=str(tmp_path / "missing")):
        runtime.add_expert(tmp_path / "missing", "x")
    with pytest.raises(phatgoose.NotFoundError, match='expert "nobody": expected an expert being served'):
        runtime.remove_expert("nobody")
    runtime.remove_expert("expert1")
    with pytest.raises(phatgoose.NotFoundError):
        runtime.remove_expert("expert1")


def test_a_layer_whose_last_expert_was_removed_is_not_found(tool, tmp_path):
    from conftest import run
    run(tool, "synth", "--out", tmp_path / "lib", "--experts", 2)
    with phatgoose.Runtime(tmp_path / "lib") as runtime:
        layers = [runtime.layer(m.name) for m in runtime.modules]
        runtime.remove_expert("expert0")
        runtime.apply(layers[0], np.zeros((1, layers[0].in_width), np.float32))  # expert1 still serves
        runtime.remove_expert("expert1")
        for layer in layers:
            with pytest.raises(phatgoose.NotFoundError, match="expected a module of the library, found none"):
                runtime.apply(layer, np.zeros((1, layer.in_width), np.float32))
        assert runtime.modules == []


def test_an_empty_path_is_refused_as_such(runtime):
    for opening in (phatgoose.Library, phatgoose.Runtime):
        with pytest.raises(phatgoose.InvalidArgumentError, match="path: expected the path of a library .a directory or a packed file., found an empty string"):
            opening("")
    with pytest.raises(phatgoose.InvalidArgumentError, match="directory: expected the path of an expert directory, found an empty string"):
        runtime.add_expert("", "extra")


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_complex_input_is_refused_not_truncated(runtime, x, dtype):
    z = x.astype(dtype) + 1j
    with pytest.raises(phatgoose.InvalidArgumentError, match=f"x: expected real numbers .float32, float64, float16, an integer or bool array., found {np.dtype(dtype).name}"):
        runtime.apply(Q, z)
    with pytest.raises(phatgoose.InvalidArgumentError, match="found complex128"):
        runtime.apply(Q, z.tolist())  # a list of Python complex numbers
    with pytest.raises(phatgoose.InvalidArgumentError, match="found <U"):
        runtime.apply(Q, x.astype(str))
    # Real inputs of other dtypes are still converted.
    assert (runtime.apply(Q, x.astype(np.float64)) == runtime.apply(Q, x)).all()


@pytest.mark.parametrize("options", [{}, {"router": "arrow"}, {"router": "uniform"}, {"top_k": 3}])
def test_non_finite_rows_are_left_unrouted_and_reported(synth, x, options):
    bad = x.copy()
    bad[1, 5] = np.nan
    bad[6, :] = -np.inf
    with phatgoose.Runtime(synth[0], **options) as runtime:
        clean, clean_experts, clean_weights = runtime.apply(Q, x, out=np.full((8, 32), 3, np.float32), return_routing=True)
        out = np.full((8, 32), 3, np.float32)
        with pytest.raises(NonFiniteInputError, match=f"layer {Q}: expected finite input values, found NaN or infinite values in "
                           r"the row \(or sequence\) of 2 of 8 tokens, the first token 1; those tokens were not routed") as raised:
            runtime.apply(Q, bad, out=out, return_routing=True)
        assert raised.value.status_name == "non-finite-input" and isinstance(raised.value, ValueError)
        delta, experts, weights = raised.value.result
        assert delta is out
        refused = [1, 6]
        kept = [t for t in range(8) if t not in refused]
        assert (experts[refused] == -1).all() and np.isnan(weights[refused]).all()
        assert (out[refused] == 3).all(), "nothing is added to a refused token's output row"
        assert (experts[kept] == clean_experts[kept]).all() and (weights[kept] == clean_weights[kept]).all()
        assert (out[kept] == clean[kept]).all()
        with pytest.raises(NonFiniteInputError) as raised:
            runtime.apply_layers([Q, "encoder.block.0.layer.0.SelfAttention.k"], bad)
        assert len(raised.value.result) == 2 and (raised.value.result[0][kept] == runtime.apply(Q, x)[kept]).all()


def test_per_sequence_routing_leaves_the_whole_sequence_unrouted(synth, x):
    bad = x.copy()
    bad[5, 0] = np.nan
    with phatgoose.Runtime(synth[0], sequence_length=4) as runtime:
        clean = runtime.apply(Q, x)
        with pytest.raises(NonFiniteInputError, match="of 4 of 8 tokens, the first token 4") as raised:
            runtime.apply(Q, bad, return_routing=True)
        delta, experts, _ = raised.value.result
        assert (experts[4:] == -1).all() and (delta[4:] == 0).all()
        assert (delta[:4] == clean[:4]).all() and (experts[:4] >= 0).all()


# The C ABI, called raw


def new_runtime(path):
    handle = ctypes.c_void_p()
    assert lib.phatgoose_runtime_open(str(path).encode(), None, ctypes.byref(handle)) == _native.OK
    return handle.value


def new_layer(runtime, name):
    handle = ctypes.c_void_p()
    assert lib.phatgoose_layer_create(runtime, name.encode(), ctypes.byref(handle)) == _native.OK
    return handle.value


def apply_raw(runtime, layer, x, tokens, input_count, out, output_count, experts=None, weights=None, routing_count=0):
    return lib.phatgoose_runtime_apply(runtime, layer, x, tokens, input_count, out, output_count, experts, weights, routing_count)


def test_raw_handles_are_checked(synth, x):
    runtime = new_runtime(synth[0])
    layer = new_layer(runtime, Q)
    out = np.zeros((8, 32), np.float32)
    args = (x.ctypes.data, 8, x.size, out.ctypes.data, out.size)
    assert apply_raw(None, layer, *args) == _native.INVALID_HANDLE
    assert message() == "runtime: expected a runtime handle, found NULL"
    assert apply_raw(runtime, None, *args) == _native.INVALID_HANDLE
    assert message() == "layer: expected a layer handle, found NULL"
    assert apply_raw(layer, layer, *args) == _native.INVALID_HANDLE
    assert message().startswith("runtime: expected a runtime handle, found a layer handle")
    for garbage in (0xDEADBEEF, 0x7F00_1234_5678, 2 ** 64 - 1, id(x), x.ctypes.data):
        assert apply_raw(garbage, layer, *args) == _native.INVALID_HANDLE
    library = ctypes.c_void_p()
    assert lib.phatgoose_runtime_library(runtime, ctypes.byref(library)) == _native.OK
    assert apply_raw(library.value, layer, *args) == _native.INVALID_HANDLE
    assert "found a library handle" in message()
    # Bits that are no live handle are no handle, whatever kind their low bits would name.
    for garbage, kind in ((0xDEADBEE1, "library"), (0xDEADBEE3, "layer"), ((library.value & ~3) | 3, "layer")):
        assert apply_raw(garbage, layer, *args) == _native.INVALID_HANDLE
        assert message() == f"runtime: expected a live runtime handle, found no handle ({garbage:#x}: one that was destroyed or never made)"
        assert f"{kind} handle" not in message()
    # A forged handle: a live slot and generation with another kind's bits.
    forged = (runtime & ~3) | 1
    count = ctypes.c_size_t()
    assert lib.phatgoose_library_expert_count(forged, ctypes.byref(count)) == _native.INVALID_HANDLE
    assert apply_raw(runtime, layer, *args) == _native.OK
    assert lib.phatgoose_library_destroy(library.value) == _native.OK
    assert lib.phatgoose_library_destroy(library.value) == _native.INVALID_HANDLE
    assert "destroyed or never made" in message()
    assert apply_raw(library.value, layer, *args) == _native.INVALID_HANDLE  # a destroyed library as a runtime
    assert "found no handle" in message() and "library handle" not in message()
    assert lib.phatgoose_runtime_destroy(runtime) == _native.OK
    assert lib.phatgoose_runtime_destroy(runtime) == _native.INVALID_HANDLE
    assert apply_raw(runtime, layer, *args) == _native.INVALID_HANDLE
    assert lib.phatgoose_layer_destroy(layer) == _native.INVALID_HANDLE  # went with its runtime
    for destroy in (lib.phatgoose_runtime_destroy, lib.phatgoose_layer_destroy, lib.phatgoose_library_destroy):
        assert destroy(None) == _native.OK


def test_raw_buffers_are_checked(synth, x):
    runtime = new_runtime(synth[0])
    layer = new_layer(runtime, Q)
    out = np.full((8, 32), 5, np.float32)
    experts = np.zeros((8, 2), np.int32)
    weights = np.zeros((8, 2), np.float32)
    xp, op, ep, wp = x.ctypes.data, out.ctypes.data, experts.ctypes.data, weights.ctypes.data
    cases = [
        ((xp, 8, 255, op, 256), _native.SHAPE, f"layer {Q}: input_count: expected 8 x 32 = 256 elements, found 255"),
        ((xp, 8, 256, op, 257), _native.SHAPE, "output_count: expected 8 x 32 = 256 elements, found 257"),
        ((xp, 2 ** 64 - 1, 256, op, 256), _native.SHAPE, "tokens: expected at most"),
        ((xp, 2 ** 62, 256, op, 256), _native.SHAPE, "expected 4611686018427387904 x 32 elements to fit in memory"),
        ((None, 8, 256, op, 256), _native.INVALID_ARGUMENT, "input_count: expected a buffer of 256 elements, found NULL"),
        ((xp, 8, 256, None, 256), _native.INVALID_ARGUMENT, "output_count: expected a buffer of 256 elements, found NULL"),
        ((xp + 2, 8, 256, op, 256), _native.INVALID_ARGUMENT, "expected an address aligned to 4 bytes"),
        ((xp, 8, 256, xp, 256), _native.INVALID_ARGUMENT, "expected no overlap"),
        ((xp, 8, 256, op, 256, ep, None, 16), _native.INVALID_ARGUMENT, "expected experts and weights both or neither, found only experts"),
        ((xp, 8, 256, op, 256, ep, wp, 15), _native.SHAPE, "routing_count (experts): expected 8 x 2 = 16 elements (or 8 rows of more than 2), found 15"),
        ((xp, 8, 256, op, 256, ep, wp, 8), _native.SHAPE, "routing_count (experts): expected 8 x 2 = 16 elements"),
        ((xp, 8, 256, op, 256, ep, op, 16), _native.INVALID_ARGUMENT, "expected no overlap"),
    ]
    for arguments, status, text in cases:
        assert apply_raw(runtime, layer, *arguments) == status, arguments
        assert text in message(), (text, message())
        assert (out == 5).all() and (experts == 0).all()
    # Zero tokens: nothing read or written, NULL allowed.
    assert apply_raw(runtime, layer, None, 0, 0, None, 0) == _native.OK
    assert apply_raw(runtime, layer, xp, 8, 256, op, 256, ep, wp, 16) == _native.OK
    assert (experts >= 0).all()
    lib.phatgoose_runtime_destroy(runtime)


def test_uniform_routing_rows_may_be_wider_than_the_slots(synth, donor, x):
    """The uniform router's slots change with the experts, so a caller that sized its routing buffers before an expert
    was removed must not be refused: rows wider than the slots are filled, their extra slots with -1 and 0."""
    options = _native.RuntimeOptions()
    assert lib.phatgoose_runtime_options_init(ctypes.byref(options), ctypes.sizeof(options)) == _native.OK
    options.router = _native.ROUTERS["uniform"]
    handle = ctypes.c_void_p()
    assert lib.phatgoose_runtime_open(str(synth[0]).encode(), ctypes.byref(options), ctypes.byref(handle)) == _native.OK
    runtime = handle.value
    layer = new_layer(runtime, Q)
    slots = ctypes.c_size_t()
    assert lib.phatgoose_layer_shape(layer, None, None, ctypes.byref(slots)) == _native.OK
    s = slots.value
    assert lib.phatgoose_runtime_add_expert(runtime, str(donor / "expert0").encode(), b"extra", None) == _native.OK
    assert lib.phatgoose_layer_shape(layer, None, None, ctypes.byref(slots)) == _native.OK and slots.value == s + 1
    out = np.zeros((8, 32), np.float32)
    experts, weights = np.full((8, s + 1), 99, np.int32), np.full((8, s + 1), 99, np.float32)
    full = (x.ctypes.data, 8, x.size, out.ctypes.data, out.size, experts.ctypes.data, weights.ctypes.data, experts.size)
    assert apply_raw(runtime, layer, *full) == _native.OK
    assert (experts >= 0).all() and np.allclose(weights, 1 / (s + 1))
    assert lib.phatgoose_runtime_remove_expert(runtime, b"extra") == _native.OK
    experts[:], weights[:] = 99, 99
    assert apply_raw(runtime, layer, *full) == _native.OK, message()  # buffers sized before the removal
    assert (experts[:, :s] >= 0).all() and np.allclose(weights[:, :s], 1 / s)
    assert (experts[:, s] == -1).all() and (weights[:, s] == 0).all()
    lib.phatgoose_runtime_destroy(runtime)


def test_raw_apply_layers_is_checked(synth, x):
    runtime = new_runtime(synth[0])
    q, wi, wo = (new_layer(runtime, n) for n in (Q, WI, WO))
    outputs = [np.zeros((8, 32), np.float32), np.zeros((8, 64), np.float32)]
    routing = np.zeros((8, 2), np.int32), np.zeros((8, 2), np.float32)
    entries = (_native.LayerOutput * 2)()
    for entry, layer, out in zip(entries, (q, wi), outputs):
        entry.layer, entry.output, entry.output_count = layer, out.ctypes.data, out.size
    assert lib.phatgoose_runtime_apply_layers(runtime, x.ctypes.data, 8, x.size, entries, 0) == _native.INVALID_ARGUMENT
    assert lib.phatgoose_runtime_apply_layers(runtime, x.ctypes.data, 8, x.size, None, 2) == _native.INVALID_ARGUMENT
    entries[0].experts, entries[0].weights, entries[0].routing_count = routing[0].ctypes.data, routing[1].ctypes.data, 16
    assert lib.phatgoose_runtime_apply_layers(runtime, x.ctypes.data, 8, x.size, entries, 2) == _native.INVALID_ARGUMENT
    assert "routing buffers for every layer or for none" in message()
    entries[0].experts = entries[0].weights = None
    entries[1].output = outputs[0].ctypes.data + 64
    entries[1].output_count = 512
    assert lib.phatgoose_runtime_apply_layers(runtime, x.ctypes.data, 8, x.size, entries, 2) == _native.INVALID_ARGUMENT
    assert "layers[0].output overlapping" in message() and "layers[1].output" in message()
    entries[1].output = outputs[1].ctypes.data
    entries[1].layer = wo
    assert lib.phatgoose_runtime_apply_layers(runtime, x.ctypes.data, 8, x.size, entries, 2) == _native.SHAPE
    entries[1].layer = wi
    assert lib.phatgoose_runtime_apply_layers(runtime, x.ctypes.data, 8, x.size, entries, 2) == _native.OK
    assert outputs[1].any()
    lib.phatgoose_runtime_destroy(runtime)


def test_raw_options_are_checked(synth):
    options = _native.RuntimeOptions()
    handle = ctypes.c_void_p()
    path = str(synth[0]).encode()
    assert lib.phatgoose_runtime_open(path, ctypes.byref(options), ctypes.byref(handle)) == _native.INVALID_ARGUMENT
    assert "options struct_size: expected 56 to 4096 (initialise with phatgoose_runtime_options_init), found 0" in message()
    assert lib.phatgoose_runtime_options_init(ctypes.byref(options), 8) == _native.INVALID_ARGUMENT
    assert lib.phatgoose_runtime_options_init(None, 56) == _native.INVALID_ARGUMENT
    assert lib.phatgoose_runtime_options_init(ctypes.byref(options), ctypes.sizeof(options)) == _native.OK
    assert (options.struct_size, options.top_k, options.workers, options.max_queued_calls, options.arrow_temperature) == (72, 0, -1, 64, 10.0)
    assert (options.spin_microseconds, options.parallel_min_tokens, options.lanes, options.contended_min_tokens) == (0, 1, 0, 0)
    for field, value in (("reserved", 1), ("router", 9), ("router", -1), ("executor", 2), ("placement", 4), ("top_k", -1),
                         ("spin_microseconds", -2), ("spin_microseconds", 1_000_001), ("parallel_min_tokens", -1), ("lanes", -1),
                         ("contended_min_tokens", -2)):
        bad = _native.RuntimeOptions.from_buffer_copy(options)
        setattr(bad, field, value)
        assert lib.phatgoose_runtime_open(path, ctypes.byref(bad), ctypes.byref(handle)) == _native.INVALID_ARGUMENT, field
        assert f"options {field}" in message()
    bad = _native.RuntimeOptions.from_buffer_copy(options)
    bad.workers, bad.lanes = 1, 3  # more lanes than participants: refused by the runtime
    assert lib.phatgoose_runtime_open(path, ctypes.byref(bad), ctypes.byref(handle)) == _native.INVALID_ARGUMENT
    assert "lanes: expected 1 to 2" in message() and "found 3" in message()
    assert handle.value is None  # never written on failure
    # A caller built against a newer header: a larger struct. Init zeroes what this library does not know; zero bytes
    # there are accepted, anything else is refused, naming the byte.
    newer = (ctypes.c_uint8 * 80)(*([0xAB] * 80))
    pointer = ctypes.cast(newer, ctypes.POINTER(_native.RuntimeOptions))
    assert lib.phatgoose_runtime_options_init(pointer, 80) == _native.OK
    known = _native.RuntimeOptions.from_buffer(newer)
    assert (known.struct_size, known.max_queued_calls, known.reserved, known.parallel_min_tokens) == (80, 64, 0, 1)
    assert bytes(newer[72:]) == bytes(8)
    assert bytes(newer[4:72]) == bytes(options)[4:72]
    known.workers = 1
    assert lib.phatgoose_runtime_open(path, pointer, ctypes.byref(handle)) == _native.OK
    lib.phatgoose_runtime_destroy(handle)
    handle.value = None
    newer[78] = 0x80
    assert lib.phatgoose_runtime_open(path, pointer, ctypes.byref(handle)) == _native.INVALID_ARGUMENT
    assert message() == ("options: expected zero bytes beyond the 72 this library knows (struct_size 80: fields of a newer "
                         "header left at their defaults), found byte 78 = 0x80")
    newer[78] = 0
    # A caller built against the ABI 1 header (56 bytes) knows none of the later fields (spin_microseconds to
    # contended_min_tokens): init
    # writes nothing past its struct, and its struct is accepted with those at their defaults. A size that ends inside
    # a field leaves that field unknown: its bytes are zeroed by init and must be zero.
    older = (ctypes.c_uint8 * 72)(*([0xAB] * 72))
    assert lib.phatgoose_runtime_options_init(ctypes.cast(older, ctypes.POINTER(_native.RuntimeOptions)), 56) == _native.OK
    assert bytes(older[56:]) == bytes([0xAB] * 16) and bytes(older[4:56]) == bytes(options)[4:56]
    assert lib.phatgoose_runtime_open(path, ctypes.cast(older, ctypes.POINTER(_native.RuntimeOptions)), ctypes.byref(handle)) == _native.OK
    lib.phatgoose_runtime_destroy(handle)
    handle.value = None
    assert lib.phatgoose_runtime_options_init(ctypes.cast(older, ctypes.POINTER(_native.RuntimeOptions)), 62) == _native.OK
    assert bytes(older[56:60]) == bytes(_native.RuntimeOptions.from_buffer_copy(options))[56:60] and bytes(older[60:62]) == bytes(2)
    assert bytes(older[62:]) == bytes([0xAB] * 10)
    for size in (4097, 2 ** 32 - 1):  # an uninitialised struct's size is never believed
        known.struct_size = size
        assert lib.phatgoose_runtime_open(path, pointer, ctypes.byref(handle)) == _native.INVALID_ARGUMENT
        assert f"options struct_size: expected 56 to 4096 (initialise with phatgoose_runtime_options_init), found {size}" in message()
        assert lib.phatgoose_runtime_options_init(pointer, size) == _native.INVALID_ARGUMENT
    assert known.struct_size == 2 ** 32 - 1  # refused: nothing written
    assert handle.value is None
    assert lib.phatgoose_runtime_open(path, None, None) == _native.INVALID_ARGUMENT
    assert lib.phatgoose_runtime_open(None, None, ctypes.byref(handle)) == _native.INVALID_ARGUMENT
    assert message() == "path: expected a string, found NULL"
    assert lib.phatgoose_runtime_create(None, None, ctypes.byref(handle)) == _native.INVALID_HANDLE


def test_raw_names_and_counts_are_checked(synth):
    library = ctypes.c_void_p()
    assert lib.phatgoose_library_open(str(synth[0]).encode(), ctypes.byref(library)) == _native.OK
    length = ctypes.c_size_t()
    buffer = ctypes.create_string_buffer(b"\x01" * 8)
    assert lib.phatgoose_library_expert_name(library, 0, buffer, 7, ctypes.byref(length)) == _native.BUFFER_TOO_SMALL
    assert length.value == 7 and buffer.raw == b"\x01" * 8 + b"\x00"  # untouched
    assert lib.phatgoose_library_expert_name(library, 0, buffer, 8, ctypes.byref(length)) == _native.OK
    assert buffer.value == b"expert0"
    assert lib.phatgoose_library_expert_name(library, 6, buffer, 8, None) == _native.NOT_FOUND
    assert lib.phatgoose_library_module_name(library, 2 ** 64 - 1, buffer, 8, None) == _native.NOT_FOUND
    assert lib.phatgoose_library_module_widths(library, 36, None, None) == _native.NOT_FOUND
    assert lib.phatgoose_library_expert_count(library, None) == _native.INVALID_ARGUMENT
    runtime = ctypes.c_void_p()
    assert lib.phatgoose_runtime_create(library, None, ctypes.byref(runtime)) == _native.OK
    assert lib.phatgoose_library_destroy(library) == _native.OK  # the runtime keeps serving
    layer = ctypes.c_void_p()
    assert lib.phatgoose_layer_create(runtime, b"\xff\xfe", ctypes.byref(layer)) == _native.INVALID_ARGUMENT
    assert message() == "name: expected UTF-8, found invalid bytes"
    assert lib.phatgoose_layer_create(runtime, Q.encode(), ctypes.byref(layer)) == _native.OK
    count = ctypes.c_size_t()
    per_expert = (ctypes.c_uint64 * 4)()
    assert lib.phatgoose_runtime_statistics(runtime, None, None, None, per_expert, 4, ctypes.byref(count)) == _native.BUFFER_TOO_SMALL
    assert count.value == 6
    assert lib.phatgoose_runtime_add_expert(runtime, b"/nonexistent", b"", None) == _native.INVALID_ARGUMENT
    lib.phatgoose_runtime_destroy(runtime)


def test_status_names_and_version():
    names = [lib.phatgoose_status_name(s).decode() for s in range(15)]
    assert names == ["ok", "invalid-argument", "invalid-handle", "shape", "not-found", "io", "library", "overloaded",
                     "memory-cap", "shut-down", "buffer-too-small", "internal", "non-finite-input", "unavailable", "timeout"]
    assert lib.phatgoose_status_name(99) == b"unknown"
    assert phatgoose.__version__.count(".") == 2 and phatgoose.ABI_VERSION == 1


def test_error_messages_are_per_thread(synth):
    seen = {}
    failed = threading.Event()
    main_failed = threading.Event()

    def other():
        lib.phatgoose_library_open(b"/nonexistent-other", ctypes.byref(ctypes.c_void_p()))
        failed.set()
        main_failed.wait(10)
        seen["other"] = message()

    thread = threading.Thread(target=other)
    thread.start()
    failed.wait(10)
    lib.phatgoose_library_open(b"/nonexistent-main", ctypes.byref(ctypes.c_void_p()))
    main_failed.set()
    thread.join()
    assert seen["other"].startswith("/nonexistent-other:")
    assert message().startswith("/nonexistent-main:")
