"""The weights of a network: named float64 arrays, per layer and for the output head.

Layer ``l`` of a network with cell ``C`` (``C.gates`` = G blocks of ``h`` rows:
Elman 1, GRU 3, LSTM 4) holds, gate-stacked in the order of PyTorch's ``nn.RNN`` /
``nn.GRU`` / ``nn.LSTM``:

* ``U`` ``[G h, d_l]``: the input weights (``d_0`` = input size or vocabulary, ``d_l = h``
  above the first layer);
* ``W`` ``[G h, h]``: the recurrent weights;
* ``b`` ``[G h]``: the bias of the pre-activations;
* ``bh`` ``[h]`` (GRU only): the bias inside the reset gate's product, ``b_hn``.

Layer 0's arrays are named ``U, W, b (, bh)``, layer ``l > 0``'s ``U_l, W_l, b_l
(, bh_l)``; the head is ``V`` ``[K, h]`` and ``c`` ``[K]``. A one-layer Elman network
is therefore the ``U, W, b, V, c`` of docs/design.md, section 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LAYER_NAMES = ("U", "W", "b", "bh")
HEAD_NAMES = ("V", "c")


def layer_name(name: str, layer: int) -> str:
    """The array name of weight ``name`` of ``layer``: ``W`` for layer 0, ``W_2`` for 2."""
    return name if layer == 0 else f"{name}_{layer}"


@dataclass
class Layer:
    """One layer's weights (views into :class:`Params`; ``bh`` None unless GRU)."""

    U: np.ndarray
    W: np.ndarray
    b: np.ndarray
    bh: np.ndarray | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"U": self.U, "W": self.W, "b": self.b}
        if self.bh is not None:
            out["bh"] = self.bh
        return out


class Params:
    """Ordered named weight arrays (``names()``: layers in order, then ``V``, ``c``);
    ``p.U``, ``p.W_1``, ``p.V`` read an array, ``p.layer(l)`` a layer's."""

    __slots__ = ("_arrays",)

    def __init__(self, arrays: dict[str, np.ndarray]):
        object.__setattr__(self, "_arrays", dict(arrays))

    @classmethod
    def elman(cls, U, W, b, V, c) -> Params:
        """A one-layer Elman network's weights."""
        return cls({"U": U, "W": W, "b": b, "V": V, "c": c})

    def __getattr__(self, name: str) -> np.ndarray:
        try:
            return self._arrays[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: np.ndarray) -> None:
        if name not in self._arrays:
            raise AttributeError(f"no weight array {name!r}")
        self._arrays[name] = value

    def names(self) -> tuple[str, ...]:
        return tuple(self._arrays)

    @property
    def layers(self) -> int:
        n = 0
        while layer_name("W", n) in self._arrays:
            n += 1
        return n

    @property
    def hidden(self) -> int:
        return self._arrays["W"].shape[1]

    def layer(self, l: int) -> Layer:
        a = self._arrays
        return Layer(a[layer_name("U", l)], a[layer_name("W", l)], a[layer_name("b", l)],
                     a.get(layer_name("bh", l)))

    def set_layer(self, l: int, layer: Layer) -> None:
        for name, value in layer.arrays().items():
            self._arrays[layer_name(name, l)] = value

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(self._arrays)

    def replace(self, **arrays: np.ndarray) -> Params:
        """A new :class:`Params` with the named arrays swapped (the others shared)."""
        for name in arrays:
            if name not in self._arrays:
                raise AttributeError(f"no weight array {name!r}")
        return Params({**self._arrays, **arrays})

    def copy(self) -> Params:
        return Params({k: v.copy() for k, v in self._arrays.items()})

    def zeros_like(self) -> Params:
        return Params({k: np.zeros_like(v, dtype=np.float64) for k, v in self._arrays.items()})

    def map(self, fn) -> Params:
        """``fn`` applied to every array (a new :class:`Params`)."""
        return Params({k: fn(v) for k, v in self._arrays.items()})

    @property
    def size(self) -> int:
        return sum(v.size for v in self._arrays.values())

    def flat(self) -> np.ndarray:
        """All weights in one float64 vector, in :meth:`names` order (one collective)."""
        return np.concatenate([np.ravel(v) for v in self._arrays.values()]).astype(
            np.float64, copy=False)

    @classmethod
    def from_flat(cls, buf: np.ndarray, like: Params) -> Params:
        """The inverse of :meth:`flat`, shaped like ``like`` (copies)."""
        arrays, lo = {}, 0
        for k, a in like._arrays.items():
            arrays[k] = np.array(buf[lo:lo + a.size]).reshape(a.shape)
            lo += a.size
        return cls(arrays)

    def astype(self, dtype: np.dtype) -> Params:
        """The arrays in ``dtype`` (no copies of arrays already in it)."""
        return Params({k: np.asarray(v, dtype=dtype) for k, v in self._arrays.items()})

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in self._arrays.items())
        return f"Params({shapes})"
