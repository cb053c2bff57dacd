"""The Python package's results equal `phatgoose apply`'s bit for bit, for every router and option, on synthetic
libraries, packed libraries and the golden fixtures."""

import json

import numpy as np
import pytest
from conftest import GOLDEN, run

import phatgoose
from phatgoose import safetensors


def bits(array):
    """An array's raw bits, so -0.0 and 0.0 (and NaN payloads) count as different."""
    array = np.ascontiguousarray(array)
    return array.view(np.uint32 if array.dtype.itemsize == 4 else np.uint8)


def assert_same(actual, expected, name):
    delta, experts, weights = actual
    assert delta.dtype == np.float32 and experts.dtype == np.int32 and weights.dtype == np.float32
    assert delta.shape == expected[name].shape, name
    assert np.array_equal(bits(delta), bits(expected[name])), f"{name}: delta differs"
    assert np.array_equal(experts, expected[name + ".experts"]), f"{name}: experts differ"
    assert np.array_equal(bits(weights), bits(expected[name + ".weights"])), f"{name}: weights differ"


# (Runtime keyword arguments, the same options for `phatgoose apply`)
CONFIGURATIONS = [
    ({}, []),
    ({"top_k": 1}, ["--top-k", 1]),
    ({"top_k": 3}, ["--top-k", 3]),
    ({"router": "arrow"}, ["--router", "arrow"]),
    ({"router": "arrow", "arrow_temperature": 2.5, "arrow_scaled": True},
     ["--router", "arrow", "--arrow-temperature", 2.5, "--arrow-scaled"]),
    ({"router": "uniform"}, ["--router", "uniform"]),
    ({"sequence_length": 4}, ["--granularity", "sequence", "--sequence-length", 4]),
    ({"workers": 0}, []),
    ({"executor": "dispatch", "workers": 2}, []),
    ({"placement": "in-place"}, []),
    # 32 tokens per call: at or above the threshold the worker takes part, below it the caller works alone.
    ({"workers": 1, "spin_microseconds": 0, "parallel_min_tokens": 16}, []),
    ({"workers": 1, "spin_microseconds": 200, "parallel_min_tokens": 64}, []),
    ({"workers": 1, "lanes": 1, "contended_min_tokens": 0}, []),
    ({"workers": 1, "lanes": 2, "contended_min_tokens": 8}, []),
]


@pytest.mark.parametrize("options, arguments", CONFIGURATIONS, ids=lambda v: json.dumps(v) if isinstance(v, dict) else None)
def test_every_module_matches_the_tool(synth, cli_apply, options, arguments):
    library, inputs = synth
    expected = cli_apply(library, inputs, *arguments)
    x = safetensors.load(inputs)
    with phatgoose.Runtime(library, **options) as runtime:
        for name, activations in x.items():
            assert_same(runtime.apply(name, activations, return_routing=True), expected, name)


def test_packed_library_matches_the_tool(tool, synth, cli_apply, tmp_path):
    library, inputs = synth
    packed = tmp_path / "lib.phatpack"
    run(tool, "pack", library, "--out", packed)
    expected = cli_apply(library, inputs)
    x = safetensors.load(inputs)
    with phatgoose.Runtime(packed) as runtime:
        for name in list(x)[:6]:
            assert_same(runtime.apply(runtime.layer(name), x[name], return_routing=True), expected, name)


def golden_options(arguments):
    options, granularity, length, i = {}, "token", None, 0
    while i < len(arguments):
        flag = arguments[i]
        if flag == "--arrow-scaled":
            options["arrow_scaled"] = True
            i += 1
            continue
        value = arguments[i + 1]
        if flag == "--router":
            options["router"] = value
        elif flag == "--top-k":
            options["top_k"] = int(value)
        elif flag == "--granularity":
            granularity = value
        elif flag == "--sequence-length":
            length = int(value)
        elif flag == "--arrow-temperature":
            options["arrow_temperature"] = float(value)
        else:
            raise AssertionError(f"unexpected golden argument {flag}")
        i += 2
    if granularity == "sequence":
        assert length is not None, "whole-batch sequences have no Runtime option; the fixtures give a length"
        options["sequence_length"] = length
    return options


@pytest.mark.parametrize("case", sorted(p.name for p in GOLDEN.iterdir() if p.is_dir()))
def test_golden_fixtures_match_the_tool(cli_apply, case):
    directory = GOLDEN / case
    arguments = json.loads((directory / "case.json").read_text())["args"]
    expected = cli_apply(directory / "library", directory / "input.safetensors", *arguments)
    x = safetensors.load(directory / "input.safetensors")
    with phatgoose.Runtime(directory / "library", **golden_options(arguments)) as runtime:
        for name, activations in x.items():
            assert_same(runtime.apply(name, activations, return_routing=True), expected, name)


def test_layers_sharing_an_input_match_the_tool(synth, cli_apply, tmp_path):
    library, inputs = synth
    x = safetensors.load(inputs)["encoder.block.1.layer.0.SelfAttention.q"]
    names = [f"encoder.block.1.layer.0.SelfAttention.{p}" for p in "qkv"]
    shared = tmp_path / "shared.safetensors"
    safetensors.save(shared, {name: x for name in names})
    expected = cli_apply(library, shared)
    with phatgoose.Runtime(library) as runtime:
        results = runtime.apply_layers(names, x, return_routing=True)
        for name, result in zip(names, results):
            assert_same(result, expected, name)
        plain = runtime.apply_layers([runtime.layer(n) for n in names], x)
        for name, delta in zip(names, plain):
            assert np.array_equal(bits(delta), bits(expected[name]))


def test_output_is_added_into_in_place(synth):
    library, inputs = synth
    name = "decoder.block.0.layer.2.DenseReluDense.wo"
    x = safetensors.load(inputs)[name]
    with phatgoose.Runtime(library) as runtime:
        delta = runtime.apply(name, x)
        out = np.ones((x.shape[0], runtime.layer(name).out_width), dtype=np.float32)
        returned = runtime.apply(name, x, out=out)
        assert returned is out
        np.testing.assert_allclose(out, 1 + delta, rtol=1e-6, atol=1e-6)


def test_inputs_are_used_in_place_or_converted(synth):
    library, inputs = synth
    name = "encoder.block.0.layer.1.DenseReluDense.wi_0"
    x = safetensors.load(inputs)[name]
    from phatgoose._runtime import _input
    assert _input(x) is x  # float32, C order: no copy
    with phatgoose.Runtime(library) as runtime:
        reference = runtime.apply(name, x, return_routing=True)
        for variant in (np.asfortranarray(x), x.astype(np.float64), x.tolist(), np.repeat(x, 2, axis=0)[::2]):
            result = runtime.apply(name, variant, return_routing=True)
            for a, b in zip(result, reference):
                assert np.array_equal(bits(a), bits(b))


def test_an_empty_batch_gives_empty_outputs(synth):
    library, _ = synth
    with phatgoose.Runtime(library) as runtime:
        delta, experts, weights = runtime.apply("encoder.block.0.layer.0.SelfAttention.o", np.zeros((0, 32), np.float32), return_routing=True)
        assert delta.shape == (0, 32) and experts.shape == (0, 2) and weights.shape == (0, 2)
        assert runtime.statistics().calls == 0


def test_statistics_count_calls_tokens_and_choices(synth):
    library, inputs = synth
    x = safetensors.load(inputs)
    names = list(x)[:5]
    with phatgoose.Runtime(library, top_k=2) as runtime:
        expected = np.zeros(6, dtype=np.uint64)
        for name in names:
            _, experts, _ = runtime.apply(name, x[name], return_routing=True)
            expected += np.bincount(experts.ravel(), minlength=6).astype(np.uint64)
        stats = runtime.statistics()
        assert stats.calls == len(names)
        assert stats.tokens == sum(x[n].shape[0] for n in names)
        assert stats.rejected == 0
        assert np.array_equal(stats.tokens_per_expert, expected)
        assert stats.tokens_per_expert.sum() == 2 * stats.tokens


def test_library_describes_experts_and_modules(synth):
    library, _ = synth
    with phatgoose.Library(library) as opened:
        assert opened.experts == [f"expert{i}" for i in range(6)]
        modules = opened.modules
        assert len(modules) == 36
        assert modules[0] == phatgoose.Module("encoder.block.0.layer.0.SelfAttention.q", 32, 32)
        assert {(m.in_width, m.out_width) for m in modules} == {(32, 32), (32, 64), (64, 32)}
        with phatgoose.Runtime(opened, top_k=1) as runtime:
            assert runtime.layer(modules[5].name).slots == 1
    with phatgoose.Runtime(library) as runtime:
        assert runtime.experts == [f"expert{i}" for i in range(6)]


def merged_library(base, additions, path, keep=None):
    """A library directory holding `base`'s experts (those in `keep`, default all) then `additions` ({name: dir})."""
    import shutil
    path.mkdir()
    names = [f"expert{i}" for i in range(6) if keep is None or i in keep]
    for name in names:
        shutil.copytree(base / name, path / name)
    for name, source in additions.items():
        shutil.copytree(source, path / name)
        names.append(name)
    manifest = {"format": "phatgoose-library", "version": 1, "experts": [{"name": n, "path": n} for n in names],
                "routing": {"router": "phatgoose", "top_k": 2}}
    (path / "library.json").write_text(json.dumps(manifest))
    return path


def test_adding_an_expert_matches_a_library_that_has_it(synth, donor, cli_apply, tmp_path):
    library, inputs = synth
    x = safetensors.load(inputs)
    expected = cli_apply(merged_library(library, {"extra": donor / "expert0"}, tmp_path / "merged"), inputs)
    with phatgoose.Runtime(library) as runtime:
        assert runtime.add_expert(donor / "expert0", "extra") == 6
        assert runtime.experts[-1] == "extra"
        for name in list(x)[:8]:
            assert_same(runtime.apply(name, x[name], return_routing=True), expected, name)
        assert len(runtime.statistics().tokens_per_expert) == 7


def test_removing_an_expert_matches_a_library_without_it(synth, cli_apply, tmp_path):
    library, inputs = synth
    x = safetensors.load(inputs)
    kept = [0, 1, 3, 4, 5]
    expected = cli_apply(merged_library(library, {}, tmp_path / "without", keep=kept), inputs)
    index = np.array(kept + [-1], dtype=np.int32)  # the smaller library's indices -> this runtime's (-1 stays -1)
    with phatgoose.Runtime(library) as runtime:
        runtime.remove_expert("expert2")
        for name in list(x)[:8]:
            delta, experts, weights = runtime.apply(name, x[name], return_routing=True)
            assert not (experts == 2).any()
            remapped = {name: expected[name], name + ".experts": index[expected[name + ".experts"]],
                        name + ".weights": expected[name + ".weights"]}
            assert_same((delta, experts, weights), remapped, name)


def test_checksum_is_fnv1a_over_the_bytes():
    assert phatgoose.checksum() == "cbf29ce484222325"
    assert phatgoose.checksum(np.frombuffer(b"a", dtype=np.uint8)) == "af63dc4c8601ec8c"
