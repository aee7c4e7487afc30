#!/usr/bin/env bash
# Install padmmirnn with its MPI runtime and test tools into a virtual environment,
# then run the whole suite: serial tests, then the MPI tests under `mpiexec -n 2`.
# Every stage runs under a timeout, so a hang fails instead of eating CI time.
#   VENV=path   virtual environment to create/use (default .venv)
#   PYTHON=exe  interpreter that creates it (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet ".[mpich,test]"

# -P: do not put the working directory on sys.path, so the tests import the
# installed package (where kernels/ is padmmirnn.kernels), not the source tree.
echo "== serial tests"
timeout 1200 "$PY" -P -m pytest -q tests
echo "== MPI tests (mpiexec -n 2)"
timeout 900 "$VENV/bin/mpiexec" -n 2 "$PY" -P -m pytest -q --with-mpi -m mpi tests
