"""Recurrent cells, one module each, behind the interface of :mod:`.base`."""

from padmmirnn.nn.cells.base import Cell, Trace
from padmmirnn.nn.cells.elman import ElmanCell
from padmmirnn.nn.cells.gru import GruCell
from padmmirnn.nn.cells.lstm import LstmCell
from padmmirnn.nn.params import Params

CELLS: dict[str, type[Cell]] = {c.name: c for c in (ElmanCell, GruCell, LstmCell)}


def cell_name(params: Params) -> str:
    """The cell whose weights ``params`` hold, read off their shapes: the gate blocks of
    ``W`` (Elman 1, GRU 3 with ``bh``, LSTM 4)."""
    gates = params.W.shape[0] // params.W.shape[1]
    for cls in CELLS.values():
        if cls.gates == gates and cls.extra_bias == ("bh" in params.names()):
            return cls.name
    raise ValueError(f"weights with {gates} gate blocks are no known cell")


__all__ = ["CELLS", "Cell", "ElmanCell", "GruCell", "LstmCell", "Trace", "cell_name"]
