import sys

from llama3_triton.model.cli.main import main

sys.exit(main())
