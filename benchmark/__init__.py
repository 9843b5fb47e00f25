"""Speed benchmarks: `python -m benchmark.speed` (see docs/performance.md)."""
