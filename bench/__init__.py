"""Benchmarks: performance claims measured side by side, run with `python -m bench`."""
