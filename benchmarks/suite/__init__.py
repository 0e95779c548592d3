"""The benchmark suite behind ``python -m benchmarks run``: converged teachers, every technique and the peers."""
