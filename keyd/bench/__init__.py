"""Benchmarks: the load generator, the reference server and the in-process harness."""
