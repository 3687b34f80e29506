"""Microbenchmarks behind benchmarks/NOTES.md: each isolates one part of a step, side by side in one run."""
