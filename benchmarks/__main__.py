"""``python -m benchmarks run [--quick] [--only NAME ...]``: the benchmark suite (:mod:`benchmarks.suite.runner`)."""

import sys

from benchmarks.suite.runner import main

sys.exit(main())
