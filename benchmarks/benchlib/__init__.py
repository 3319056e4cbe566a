"""Helpers of benchmarks/run_benchmark.py: local services, the generated data set, the measured strategies."""
