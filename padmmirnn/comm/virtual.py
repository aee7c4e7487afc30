"""Virtual ranks: the algorithm of ``P`` ranks run on fewer processes, for studies that
count passes, synchronisations and bytes at rank counts this machine does not have.

Process ``r`` of ``p`` runs the virtual ranks ``[r P / p, (r + 1) P / p)`` in turn (``P``
a multiple of ``p``, so that virtual rank ``v`` holds the samples ``[v N / P, (v + 1) N /
P)`` and each process the contiguous union of its virtual ranks' samples, as with ``P``
real ranks). A reduction over the virtual ranks is the sum of their buffers in
virtual-rank order on each process, then one collective over the processes: the same
sum a ``P``-rank job forms (to rounding; exactly for two ranks). The communicator's
ledger counts it as the one synchronisation it is for every rank, with the bytes one
rank sends: counted, not timed.
"""

from __future__ import annotations

import numpy as np

from padmmirnn.errors import ConfigError


class VirtualRanks:
    """``size`` virtual ranks over the processes of ``comm``; this process runs
    :attr:`local` (a range of virtual ranks)."""

    def __init__(self, comm, size: int):
        if size % comm.size:
            raise ConfigError(f"train.virtual_ranks = {size} must be a multiple of the job's "
                              f"{comm.size} rank(s): each process runs the same number")
        self.comm, self.size = comm, size
        per = size // comm.size
        self.local = range(comm.rank * per, (comm.rank + 1) * per)

    @property
    def counted(self) -> bool:
        """Whether the ranks are (partly) virtual: their costs are counted, not timed."""
        return self.size > self.comm.size

    def allreduce_sum(self, buffers: list[np.ndarray]) -> np.ndarray:
        """The sum over every virtual rank of its float64 buffer (one per local virtual
        rank, in order): one synchronisation."""
        total = buffers[0].copy()
        for extra in buffers[1:]:
            total += extra
        if self.comm.size > 1:
            return self.comm.allreduce_sum(total)
        if self.size > 1:  # one process: nothing crosses a network, but P ranks would
            self.comm.ledger.record(0.0, total.nbytes)
        return total
