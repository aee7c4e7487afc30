"""Benchmarks of padmmirnn: measured ratios, not timed tests (``python -m benchmarks``)."""
