"""Baseline implementations the GPU benchmark compares the lgm kernels with."""
