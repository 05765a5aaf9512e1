"""The ``llama3-triton`` command line.

main.py      ``main``: parse, check, run one command; the commands (generate, chat, info, explain, make-tiny)
parser.py    the argument parser (building it imports no torch: --help answers at once)
serve.py     ``serve``'s options and command
terminal.py  stdin, stdout and Ctrl-C: capped reads, readline for chat, the one-line exit on Ctrl-C
threads.py   how many CPU threads a run uses by default
"""

from llama3_triton.model.errors import UserError


class CliError(UserError):
    """An error with a message for the user; exits 1."""
