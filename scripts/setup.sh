#!/usr/bin/env bash
# Installs what Phatgoose needs beyond the Swift toolchain, if missing. Idempotent; needs root for apt.
set -euo pipefail
export PATH="/opt/swift/usr/bin:$PATH"
command -v swift >/dev/null || { echo "setup: Swift 6.1 or later is required (swift not on PATH)" >&2; exit 1; }
if [ ! -f /usr/include/numa.h ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libnuma-dev >/dev/null
  else
    echo "setup: libnuma-dev is required (apt-get install libnuma-dev, as root)" >&2; exit 1
  fi
fi
# OpenMPI for the distributed runtime (docs/scale-out.md); without it the package still builds, --mpi then
# refuses with a message.
if ! command -v mpirun >/dev/null || ! pkg-config --exists ompi 2>/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenmpi-dev openmpi-bin >/dev/null
  else
    echo "setup: OpenMPI not found: --mpi will be unavailable (apt-get install libopenmpi-dev openmpi-bin, as root, then rebuild)" >&2
  fi
fi
python3 -c 'import numpy' 2>/dev/null || python3 -m pip install --quiet numpy
python3 -c 'import pytest' 2>/dev/null || python3 -m pip install --quiet pytest
