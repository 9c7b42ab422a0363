"""Benchmarks and measurements: workloads, FLOP counts, throughput against a baseline, and
the copy profiler. Benchmarks are programs, not tests: each command warms up, measures a
baseline in the same process, and prints one summary table (optionally JSON and a PNG).

Heavy dependencies (transformers, matplotlib) are imported inside the functions that need
them, so importing this package stays cheap.
"""
