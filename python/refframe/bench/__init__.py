"""Benchmarks behind `refframe bench`: the kernels against pure torch and the peers (kernels.py),
repeated builds through the build pipeline (repeated.py), and what they share (common.py)."""
