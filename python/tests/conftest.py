"""Fixtures: the `phatgoose` tool (PHATGOOSE_BIN, else the repository's release or debug build), synthetic libraries
made with it, and `phatgoose apply` outputs to compare against."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "python"))

import phatgoose  # noqa: E402
from phatgoose import safetensors  # noqa: E402

GOLDEN = ROOT / "Tests" / "Fixtures" / "golden"


def _tool():
    explicit = os.environ.get("PHATGOOSE_BIN")
    if explicit:
        return explicit
    for configuration in ("release", "debug"):
        candidate = ROOT / ".build" / configuration / "phatgoose"
        if candidate.exists():
            return str(candidate)
    raise RuntimeError("the phatgoose tool was not found: build it (swift build -c release) or set PHATGOOSE_BIN")


@pytest.fixture(scope="session")
def tool():
    return _tool()


def run(tool, *arguments):
    result = subprocess.run([tool, *map(str, arguments)], capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"phatgoose {' '.join(map(str, arguments))} exited {result.returncode}: {result.stderr.strip()}")
    return result.stdout


@pytest.fixture(scope="session")
def synth(tool, tmp_path_factory):
    """A synthetic library (tiny shape: 36 modules, widths 32 and 64; 6 experts, BF16 weights) and activations for
    every module (32 tokens)."""
    directory = tmp_path_factory.mktemp("synth")
    run(tool, "synth", "--out", directory / "lib", "--experts", 6, "--activations", directory / "x.safetensors", "--tokens", 32)
    return directory / "lib", directory / "x.safetensors"


@pytest.fixture(scope="session")
def donor(tool, tmp_path_factory):
    """Another synthetic library of the same shape, whose experts are added to a runtime."""
    directory = tmp_path_factory.mktemp("donor")
    run(tool, "synth", "--out", directory / "lib", "--experts", 2, "--seed", 7)
    return directory / "lib"


@pytest.fixture(scope="session")
def cli_apply(tool, tmp_path_factory):
    """`phatgoose apply` as a function: its output file's tensors."""
    directory = tmp_path_factory.mktemp("apply")
    counter = [0]

    def apply(library, input_path, *arguments):
        counter[0] += 1
        output = directory / f"out{counter[0]}.safetensors"
        run(tool, "apply", "--library", library, "--input", input_path, "--output", output, *arguments)
        return safetensors.load(output)

    return apply
