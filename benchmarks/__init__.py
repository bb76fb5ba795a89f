"""Throughput and memory benchmarks (run from the repository root, e.g. ``python benchmarks/vs_trl.py``)."""
