"""Threads: concurrent applies give the sequential results; closing, shutting down or changing experts while other
threads apply never crashes; admission control's refusals are all accounted for."""

import threading

import numpy as np

import phatgoose
from phatgoose import safetensors


def run_threads(count, body):
    errors = []

    def wrapped(i):
        try:
            body(i)
        except BaseException as error:  # collected and re-raised on the main thread
            errors.append(error)

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    if errors:
        raise errors[0]


def test_concurrent_applies_equal_sequential_ones(synth):
    library, inputs = synth
    x = safetensors.load(inputs)
    names = list(x)[:12]
    with phatgoose.Runtime(library) as runtime:
        expected = {name: runtime.apply(name, x[name], return_routing=True) for name in names}

        def body(i):
            for round in range(10):
                name = names[(i * 7 + round) % len(names)]
                for actual, reference in zip(runtime.apply(name, x[name], return_routing=True), expected[name]):
                    assert np.array_equal(actual, reference)

        run_threads(4, body)
        assert runtime.statistics().calls == len(names) + 40


def test_closing_while_others_apply_is_safe(synth):
    library, inputs = synth
    name = "encoder.block.1.layer.1.DenseReluDense.wo"
    x = safetensors.load(inputs)[name]
    for close in ("close", "shutdown"):
        runtime = phatgoose.Runtime(library)
        layer = runtime.layer(name)
        started = threading.Barrier(5)
        outcomes = []

        def body(i):
            started.wait()
            while True:
                try:
                    runtime.apply(layer, x)
                except (phatgoose.InvalidHandleError, phatgoose.ShutDownError) as error:
                    outcomes.append(type(error))
                    return

        def closer(i):
            if i == 4:
                started.wait()
                getattr(runtime, close)()
            else:
                body(i)

        run_threads(5, closer)
        assert len(outcomes) == 4
        runtime.close()


def test_refused_calls_are_counted(synth):
    library, inputs = synth
    name = "decoder.block.1.layer.2.DenseReluDense.wi_1"
    x = np.repeat(safetensors.load(inputs)[name], 8, axis=0)
    with phatgoose.Runtime(library, max_queued_calls=1) as runtime:
        refused = []
        lock = threading.Lock()

        def body(i):
            for _ in range(20):
                try:
                    runtime.apply(name, x)
                except phatgoose.OverloadedError as error:
                    assert "call refused" in str(error)
                    with lock:
                        refused.append(error)

        run_threads(4, body)
        stats = runtime.statistics()
        assert stats.rejected == len(refused)
        assert stats.calls == 80 - len(refused)


def test_changing_experts_while_others_apply_is_safe(synth, donor):
    library, inputs = synth
    x = safetensors.load(inputs)
    names = list(x)[:6]
    with phatgoose.Runtime(library) as runtime:
        stop = threading.Event()

        def body(i):
            if i == 0:
                for round in range(5):
                    runtime.add_expert(donor / "expert1", f"extra{round}")
                    runtime.remove_expert(f"extra{round}")
                stop.set()
                return
            while not stop.is_set():
                for name in names:
                    _, experts, _ = runtime.apply(name, x[name], return_routing=True)
                    assert ((experts >= 0) & (experts < 11)).all()

        run_threads(3, body)
        assert runtime.experts[6:] == [f"extra{r}" for r in range(5)]
