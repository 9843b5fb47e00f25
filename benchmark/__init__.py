"""Speed benchmarks: `python -m benchmark.speed` (see README, "Speed")."""
