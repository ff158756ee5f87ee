#!/usr/bin/env bash
# GPU check of the Pallas attention kernel (see benchmarks/gpu_kernels.py for what it checks).
# Uses the first Python whose jax sees a GPU: $PYTHON, .venv, python3; failing that it builds
# .venv-gpu with `pip install -e .[gpu]` (needs network). Writes $OUT/gpu_check.json if $OUT is
# set, else results/gpu_check.json. Extra arguments go to the benchmark script.
set -euo pipefail
cd "$(dirname "$0")/.."

has_gpu() { "$1" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; }

PY=""
for candidate in "${PYTHON:-}" .venv/bin/python python3; do
  if [ -n "$candidate" ] && command -v "$candidate" >/dev/null && has_gpu "$candidate"; then
    PY="$candidate"
    break
  fi
done
if [ -z "$PY" ]; then
  echo "no Python with a GPU jax found; installing .[gpu] into .venv-gpu" >&2
  python3 -m venv .venv-gpu
  .venv-gpu/bin/pip install -q -e '.[gpu]'
  PY=.venv-gpu/bin/python
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())'
exec "$PY" benchmarks/gpu_kernels.py "$@"
