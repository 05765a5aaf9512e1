"""``python -m benchmarks``: the benchmark runner (see ``benchmarks.runner``)."""

import sys

from benchmarks.runner import main

sys.exit(main())
