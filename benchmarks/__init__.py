"""lightning-quant benchmarks: the per-technique scripts and the suite (``python -m benchmarks run``)."""
