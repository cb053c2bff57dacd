"""Speed inside a real forward pass: SmolLM2-135M-Instruct alone, with Phatgoose (phatgoose.torch.attach) and with
the pure-PyTorch reference (attach_reference, per-expert loop and dense), on the experiment's library.

    python3 Examples/smollm2/bench.py --cache /work/cache/smollm2              # side by side, 2 threads
    python3 Examples/smollm2/bench.py --cache /work/cache/smollm2 --threads-matrix

Side by side: one process, torch.set_num_threads(--threads); configurations are interleaved within each repeat (so
a busy neighbour slows them alike) and each time is the median over the repeats. Workloads: prefill of one
sequence of T = 64 and 512 tokens, and one decode step (batch 1) after a 64-token prompt.

--threads-matrix: how the runtime's worker threads and PyTorch's OpenMP threads interfere. One subprocess per
OMP_WAIT_POLICY (unset, PASSIVE, ACTIVE: it must be set before PyTorch starts); in each, for torch.set_num_threads 1
and 2, the base model and the hooked model with runtime workers 0, 1, 2 under the pinned executor (its workers spin
50 µs after each phase) and the dispatch executor (no spinning pool).

Results go to the cache (bench.json, matrix.json) and beside this script (bench_results.json).
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "python"))


def load(cache):
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(cache / "model", dtype=torch.float32).eval()
    return model


def prompt(tokens, seed=0):
    import torch
    return torch.randint(100, 40000, (1, tokens), generator=torch.Generator().manual_seed(seed))


def time_prefill(model, ids):
    import torch
    with torch.inference_mode():
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        return time.perf_counter() - start


def time_decode(model, ids, steps=8):
    """The median time of `steps` single-token decode steps after prefilling `ids` (batch 1)."""
    import torch
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - start)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return statistics.median(times)


def workloads(repeats):
    return [("prefill T=64", lambda m: time_prefill(m, prompt(64)), repeats),
            ("prefill T=512", lambda m: time_prefill(m, prompt(512)), max(3, repeats // 2)),
            ("decode step", lambda m: time_decode(m, prompt(64)), max(3, repeats // 2))]


def measure(model, configurations, repeats):
    """{workload: {configuration: median seconds}}; `configurations` is {name: (attach, detach)}."""
    results = {}
    for workload, run, count in workloads(repeats):
        samples = {name: [] for name in configurations}
        for round_ in range(count + 1):  # round 0 warms up
            for name, (attach, detach) in configurations.items():
                attach()
                try:
                    elapsed = run(model)
                finally:
                    detach()
                if round_:
                    samples[name].append(elapsed)
        results[workload] = {name: statistics.median(values) for name, values in samples.items()}
        print(f"{workload}: " + ", ".join(f"{n} {1000 * t:.1f} ms" for n, t in results[workload].items()), flush=True)
    return results


def hooked(model, attach_function, *arguments, **options):
    """(attach, detach) closures for one configuration."""
    state = {}

    def attach():
        state["handle"] = attach_function(model, *arguments, **options)

    def detach():
        state.pop("handle").detach()
    return attach, detach


def side_by_side(arguments):
    import torch

    import phatgoose
    import phatgoose.torch as pgt
    torch.set_num_threads(arguments.threads)
    model = load(arguments.cache)
    library = arguments.cache / "library-phatgoose"
    reference = pgt.read_library(library)
    # The default (workers=0), and one worker that sleeps at once and takes only calls of 64 tokens or more.
    with phatgoose.Runtime(library, top_k=2, workers=pgt.DEFAULT_WORKERS) as runtime, \
            phatgoose.Runtime(library, top_k=2, workers=1, spin_microseconds=0, parallel_min_tokens=64) as worker:
        configurations = {
            "base": (lambda: None, lambda: None),
            "phatgoose": hooked(model, pgt.attach, runtime),
            "phatgoose (1 worker, no spin, from 64 tokens)": hooked(model, pgt.attach, worker),
            "reference (loop)": hooked(model, pgt.attach_reference, reference, top_k=2),
            "reference (dense)": hooked(model, pgt.attach_reference, reference, top_k=2, dense=True),
        }
        results = measure(model, configurations, arguments.repeats)
    summary = {}
    for workload, times in results.items():
        base = times["base"]
        ours = times["phatgoose"] - base
        summary[workload] = {
            "ms": {name: round(1000 * t, 2) for name, t in times.items()},
            "routing_ms": {name: round(1000 * (t - base), 2) for name, t in times.items() if name != "base"},
            "phatgoose_overhead_percent": round(100 * ours / base, 1),
            "reference_routing_over_phatgoose": {name: round((t - base) / ours, 2) if ours > 0 else None
                                                 for name, t in times.items() if name.startswith("reference")},
        }
    return {"threads": arguments.threads, "repeats": arguments.repeats, "workers": pgt.DEFAULT_WORKERS,
            "results": summary}


def matrix_child(arguments):
    """One OMP_WAIT_POLICY's part of the matrix (run in a subprocess)."""
    import torch

    import phatgoose
    import phatgoose.torch as pgt
    model = load(arguments.cache)
    library = arguments.cache / "library-phatgoose"
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        runtimes = {}
        configurations = {"base": (lambda: None, lambda: None)}
        for executor in ("pinned", "dispatch"):
            for workers in (0, 1, 2):
                if executor == "dispatch" and workers == 0:
                    continue  # no workers: the two executors are the same
                runtime = phatgoose.Runtime(library, top_k=2, workers=workers, executor=executor)
                runtimes[(executor, workers)] = runtime
                configurations[f"{executor} workers={workers}"] = hooked(model, pgt.attach, runtime)
        results = measure(model, configurations, arguments.repeats)
        for runtime in runtimes.values():
            runtime.close()
        rows.append({"torch_threads": threads, "results": {w: {n: round(1000 * t, 2) for n, t in r.items()}
                                                           for w, r in results.items()}})
    print("MATRIX " + json.dumps(rows), flush=True)


def threads_matrix(arguments):
    table = {}
    for policy in ("unset", "PASSIVE", "ACTIVE"):
        environment = dict(os.environ)
        environment.pop("OMP_WAIT_POLICY", None)
        if policy != "unset":
            environment["OMP_WAIT_POLICY"] = policy
        print(f"== OMP_WAIT_POLICY={policy}", flush=True)
        result = subprocess.run([sys.executable, __file__, "--cache", str(arguments.cache), "--repeats",
                                 str(arguments.repeats), "--matrix-child"], env=environment, stdout=subprocess.PIPE,
                                text=True)
        lines = [line for line in result.stdout.splitlines()]
        print("\n".join(line for line in lines if not line.startswith("MATRIX ")), flush=True)
        if result.returncode != 0:
            raise SystemExit(f"the matrix run with OMP_WAIT_POLICY={policy} exited {result.returncode}")
        table[policy] = json.loads(next(line for line in lines if line.startswith("MATRIX "))[len("MATRIX "):])
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=pathlib.Path, required=True, help="the experiment's cache (run.py --cache)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for side by side (default 2)")
    parser.add_argument("--repeats", type=int, default=10, help="repeats per workload (T=512 and decode: half)")
    parser.add_argument("--threads-matrix", action="store_true", help="measure thread interference instead")
    parser.add_argument("--matrix-child", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    arguments.cache = arguments.cache.resolve()
    if arguments.matrix_child:
        return matrix_child(arguments)
    name = "matrix" if arguments.threads_matrix else "bench"
    result = threads_matrix(arguments) if arguments.threads_matrix else side_by_side(arguments)
    result = {"load_average_at_end": os.getloadavg(), "cpus": os.cpu_count(), **(result if isinstance(result, dict) else {})}
    (arguments.cache / f"{name}.json").write_text(json.dumps(result, indent=1))
    stored = HERE / "bench_results.json"
    combined = json.loads(stored.read_text()) if stored.exists() else {}
    combined[name] = result
    stored.write_text(json.dumps(combined, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
