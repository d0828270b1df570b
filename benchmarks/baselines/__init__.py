"""Baseline implementations the benchmarks compare the lgm operator and kernels with."""
