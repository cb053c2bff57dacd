#!/usr/bin/env python3
"""route.py: the Python twin of Examples/c/route.c. Opens a library, routes a generated batch at one or more layers,
prints a checksum of the results and each token's chosen experts, in exactly the C program's format: for the same
arguments, both print the same lines.

    PYTHONPATH=python python3 Examples/python/route.py LIBRARY [--layer NAME]... [--tokens T] [--seed S]
        [--top-k K] [--router NAME] [--save-input FILE]
"""

import argparse
import pathlib
import sys

import numpy as np

try:
    import phatgoose
except ImportError:  # run from a checkout without PYTHONPATH
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "python"))
    import phatgoose

MASK = 0xFFFFFFFFFFFFFFFF


def generate(tokens, width, seed):
    """The C example's xorshift64* batch: uniform floats in [-1, 1), exactly representable, [tokens, width]."""
    state = (seed * 0x9E3779B97F4A7C15 + 1) & MASK
    values = np.empty(tokens * width, dtype=np.float32)
    for i in range(values.size):
        state ^= state >> 12
        state ^= (state << 25) & MASK
        state ^= state >> 27
        bits = (state * 2685821657736338717) & MASK
        values[i] = np.float32((bits >> 40) & 0xFFFFFF) / np.float32(8388608.0) - np.float32(1.0)
    return values.reshape(tokens, width)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("library")
    parser.add_argument("--layer", action="append", default=[])
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--router", choices=["phatgoose", "arrow", "uniform"])
    parser.add_argument("--save-input")
    args = parser.parse_args()

    print(f"phatgoose {phatgoose.__version__} (ABI {phatgoose.ABI_VERSION})")
    try:
        with phatgoose.Runtime(args.library, top_k=args.top_k, router=args.router) as runtime:
            modules = runtime.modules
            print(f"library: {len(runtime.experts)} experts, {len(modules)} modules")
            names = args.layer or [modules[0].name]
            layers = [runtime.layer(name) for name in names]  # resolved once; a serving loop keeps them
            for layer in layers:
                if layer.in_width != layers[0].in_width:
                    sys.exit(f"route: layer {layer.name} takes {layer.in_width} inputs, {names[0]} takes {layers[0].in_width}: "
                             "they cannot share one input")
                print(f"layer {layer.name}: in {layer.in_width}, out {layer.out_width}, slots {layer.slots}")

            x = generate(args.tokens, layers[0].in_width, args.seed)
            print(f"input: {args.tokens} tokens, seed {args.seed}")
            if args.save_input:
                phatgoose.safetensors.save(args.save_input, {name: x for name in names})

            if len(layers) == 1:
                results = [runtime.apply(layers[0], x, return_routing=True)]
            else:
                results = runtime.apply_layers(layers, x, return_routing=True)
            for name, (delta, experts, weights) in zip(names, results):
                print(f"checksum {name}: {phatgoose.checksum(delta, experts, weights)}")
            _, experts, weights = results[0]
            for t in range(args.tokens):
                print(f"token {t}: experts {' '.join(str(e) for e in experts[t])}, "
                      f"weights {' '.join(f'{float(w):.6f}' for w in weights[t])}")

            stats = runtime.statistics()
            print(f"statistics: calls {stats.calls}, tokens {stats.tokens}, rejected {stats.rejected}; tokens per expert: "
                  + " ".join(str(n) for n in stats.tokens_per_expert))
    except phatgoose.Error as error:
        sys.exit(f"route: {error.status_name}: {error}")


if __name__ == "__main__":
    main()
