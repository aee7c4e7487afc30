"""The ADMM trainers (docs/design.md, sections 3-6):

* :mod:`.minibatch`: mini-batch hybrid ADMM, the default (one block step per global
  mini-batch against running Gram statistics; local steps with averages);
* :mod:`.fullbatch`: the full-batch engine with per-sample auxiliaries and
  multipliers (the ``faithful`` and ``fullbatch`` presets), its block updates in
  :mod:`.blocks`;
* :mod:`.asynchronous`: AP over one-sided MPI windows;
* :mod:`.packed`: statistics packed into one buffer per reduction.
"""

from padmmirnn.admm import asynchronous
from padmmirnn.admm.fullbatch import AdmmEngine
from padmmirnn.admm.minibatch import MinibatchAdmm

__all__ = ["AdmmEngine", "MinibatchAdmm", "asynchronous"]
