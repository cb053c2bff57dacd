#!/usr/bin/env bash
# Makes the virtual environment for the Python tools that need PyTorch (gate training, average activation,
# phatgoose.torch): the `train` extra of python/pyproject.toml (torch, transformers, peft, gguf, safetensors, tqdm).
# PyPI's torch is the CUDA build: about 5.6 GB and 2.5 minutes here; it runs on CPU. Idempotent: an environment
# that already imports everything is kept. Prints the environment's python on the last line.
#
#   bash scripts/setup-torch.sh            # environment in ${PHATGOOSE_VENV:-~/.cache/phatgoose/venv}
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${PHATGOOSE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/phatgoose/venv}"
python="$venv/bin/python"
if ! "$python" -c 'import torch, transformers, peft, gguf, safetensors, tqdm' 2>/dev/null; then
  python3 -m venv "$venv"
  "$python" -m pip install --quiet --upgrade pip
  # The package itself with its extra: what a user gets from `pip install "python[train]"`.
  "$python" -m pip install --quiet "./python[train]" pytest
fi
echo "$python"
