"""The gradient baselines: optimizers, schedules, clipping and CELGC
(:mod:`.optimizers`), and the data-parallel trainer (:mod:`.trainer`)."""
