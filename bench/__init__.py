"""Benchmarks: `python -m bench` runs the side-by-side suite (bench/run.py)."""
