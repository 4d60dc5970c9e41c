"""Benchmarks (not tests): memory, speed, bytes; results written to docs/BENCHMARKS.md."""
