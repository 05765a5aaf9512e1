"""``python -m llama3_triton.model.cli``: the command line (``torchrun ... -m llama3_triton.model.cli`` under TP)."""

import sys

from llama3_triton.model.cli.main import main

sys.exit(main())
