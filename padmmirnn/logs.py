"""Logging with ``rank/size`` in every line; non-root ranks log warnings only.

Interactive runs (stdout is a terminal) get a progress bar on rank 0; batch logs
get a line every ``log_every`` iterations.
"""

from __future__ import annotations

import logging
import sys
import time

LOGGER_NAME = "padmmirnn"


def setup_logging(rank: int, size: int, verbose: bool = False) -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s [{rank}/{size}] %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.propagate = False
    if rank == 0:
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    else:
        logger.setLevel(logging.WARNING)
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


class Progress:
    """Rank-0 progress: a bar on a terminal, periodic log lines otherwise."""

    def __init__(self, total: int, rank: int, log_every: int, stream=None):
        self.total, self.log_every = total, log_every
        self.stream = stream or sys.stdout
        self.active = rank == 0
        self.bar = self.active and self.stream.isatty()
        self.start = time.perf_counter()

    def update(self, iteration: int, text: str) -> None:
        if not self.active:
            return
        if self.bar:
            width = 30
            done = int(width * iteration / max(self.total, 1))
            elapsed = time.perf_counter() - self.start
            self.stream.write(f"\r[{'#' * done}{'.' * (width - done)}] {iteration}/{self.total} "
                              f"{text} {elapsed:.1f}s")
            self.stream.flush()
        elif iteration == 1 or iteration % self.log_every == 0 or iteration == self.total:
            get_logger().info("iteration %d/%d %s", iteration, self.total, text)

    def close(self) -> None:
        if self.bar:
            self.stream.write("\n")
            self.stream.flush()
