"""Benchmark harness: matrices of runs from TOML, and pytest-benchmark regression checks."""
