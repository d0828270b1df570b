"""Benchmark scripts of lgm-op (run them as scripts; see each module's docstring)."""
