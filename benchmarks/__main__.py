"""``python -m llama3_triton.benchmarks``: the benchmark runner (see ``benchmarks.runner``)."""

import sys

from llama3_triton.benchmarks.runner import main

sys.exit(main())
