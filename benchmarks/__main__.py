"""``python -m benchmarks NAME [options]``: run one benchmark, print a table, write JSON.

    parallel   SP speedup of 2 ranks over 1 and the communication share (issue 5), and
               AP against SP under a straggler (issue 7)
    kernels    GEMM rate, ADMM iteration cost against it and against a BPTT epoch (issue 10)
    baselines  time per pass over cells, h, batch and dtype: Adam and mini-batch ADMM with
               their counted GFLOP and share of the GEMM rate, and PyTorch's nn.RNN + Adam
               with --torch-python (issues 15, 27)
    lengths    test accuracy of the faithful, full-batch and mini-batch configurations on
               the default digits cut into T = 1 ... 28 steps (issue 15)
    network    time to 85% on 2 ranks over a simulated interconnect of latency alpha:
               SP, AP (both staleness kinds), local steps, data-parallel Adam (issue 16)
    cells      time per pass of mini-batch ADMM and Adam for the Elman, GRU and LSTM
               cells, and their ratios (issue 26)
    padding    time per pass and test accuracy on the Rotten Tomatoes snippets with
               lengths against the same data padded to T = 200 (issue 25)
    adding     test accuracy against passes and time on the adding problem at T = 50 ...
               400: Elman and LSTM, ADMM and Adam (and PyTorch), over seeds (issue 26)
    review     validation-selected test accuracy on a token split with lengths (the
               review snippets): ADMM, Adam and PyTorch's nn.RNN/GRU/LSTM (issue 25)
    charmodel  test loss at equal training time on a character model: ADMM with the
               Elman, GRU and LSTM cells against PyTorch's nn.RNN/GRU/LSTM + Adam (issue 26)
"""

import sys
from pathlib import Path

# `python -m benchmarks` from the repository root puts the source tree first on
# sys.path, where kernels/ is not mapped to padmmirnn.kernels: measure the
# installed package instead (this package is already imported).
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

import padmmirnn  # noqa: E402,F401  (pins BLAS/OpenMP/Numba threads before numpy loads)


def main() -> int:
    names = ("parallel", "kernels", "baselines", "lengths", "network", "cells", "padding",
             "adding", "review", "charmodel")
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        print(__doc__)
        return 2
    name = sys.argv.pop(1)
    if name == "parallel":
        from benchmarks.parallel import main as run
    elif name == "baselines":
        from benchmarks.baselines import main as run
    elif name == "lengths":
        from benchmarks.lengths import main as run
    elif name == "network":
        from benchmarks.network import main as run
    elif name == "cells":
        from benchmarks.cells import main as run
    elif name == "padding":
        from benchmarks.padding import main as run
    elif name == "adding":
        from benchmarks.adding import main as run
    elif name == "review":
        from benchmarks.review import main as run
    elif name == "charmodel":
        from benchmarks.charmodel import main as run
    else:
        from benchmarks.kernels import main as run
    return run()


sys.exit(main())
