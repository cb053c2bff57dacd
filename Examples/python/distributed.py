#!/usr/bin/env python3
"""distributed.py: a Python host of a distributed runtime (docs/scale-out.md). Rank 0 of an MPI world applies every
tensor of an input file (keyed by module name, [tokens, in]) and prints, per module, the checksum of (delta, experts,
weights) that `phatgoose.checksum` gives for `phatgoose apply`'s output, then what each rank holds:

    mpirun -np 1 python3 Examples/python/distributed.py LIBRARY INPUT.safetensors : \\
           -np 3 phatgoose serve-experts --library LIBRARY
"""

import pathlib
import sys

try:
    import phatgoose
except ImportError:  # run from a checkout without PYTHONPATH
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "python"))
    import phatgoose
from phatgoose import safetensors


def main(argv):
    if len(argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    library, path = argv[1], argv[2]
    if not phatgoose.mpi_available():
        print("distributed.py: this libphatgoose has no MPI", file=sys.stderr)
        return 1
    inputs = safetensors.load(path)
    with phatgoose.DistributedRuntime(library) as runtime:
        for name, x in inputs.items():
            delta, experts, weights = runtime.apply(name, x, return_routing=True)
            print(f"checksum {name}: {phatgoose.checksum(delta, experts, weights)}")
        for share in runtime.ranks:
            print(f"rank {share.rank}: {share.experts} experts, {share.resident_bytes} bytes of expert weights")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
