"""The ``llama3-triton`` command line: ``main`` parses the arguments and runs one command (``main.py``)."""
