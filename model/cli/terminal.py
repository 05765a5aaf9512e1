"""The terminal around a command: stdin read under a byte cap, a chat's lines with readline, stdout whose failures
are one line, and Ctrl-C before the model is loaded as one line and exit 130."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from llama3_triton.model.cli import CliError
from llama3_triton.model.errors import UserError, shown


def _stdin():
    """sys.stdin, or a CliError when the process was started with stdin closed (sys.stdin is then None)."""
    if sys.stdin is None:
        raise CliError("stdin is closed: nothing to read the prompt from (pass --prompt TEXT)")
    return sys.stdin


# The most bytes read of a prompt, a prompt file or a calibration text (and of one chat line): far more than any
# context holds (Llama-3.1's 131,072 tokens are ~0.5 MB of English), far less than /dev/zero or a stray file
# could cost. A longer text is refused before it is held, and tokenized text stops at the context.
INPUT_BYTES = 16 << 20
CHAT_LINE_BYTES = 1 << 20


def read_stdin_text() -> str:
    from llama3_triton.model.checkpoints.files import read_stream_capped

    data = read_stream_capped(_stdin().buffer, "stdin", INPUT_BYTES)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CliError(f"stdin is not valid UTF-8 (byte {e.start}: {shown(data[e.start : e.start + 1])})") from None


def _history_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama3-triton" / "chat_history"


def enable_readline() -> None:
    """Line editing and a history kept across sessions, where Python has readline (not on Windows)."""
    try:
        import readline
    except ImportError:
        return
    import atexit

    path = _history_file()
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass

    atexit.register(save)


def read_chat_line(interactive: bool) -> str | None:
    """The next user line, stripped; None at the end of input. On a terminal: input() with readline editing,
    and Ctrl-C at the prompt clears the line instead of ending the session."""
    if not interactive:
        return _read_stdin_line()
    while True:
        try:
            return input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return None
        except KeyboardInterrupt:
            print(file=sys.stderr)


def _read_stdin_line() -> str | None:
    """The next line of stdin, stripped; None at end of input."""
    if sys.stdin is None:  # started with stdin closed: no input, as at end of file
        return None
    raw = sys.stdin.buffer.readline(CHAT_LINE_BYTES + 1)
    if not raw:
        return None
    if len(raw) > CHAT_LINE_BYTES:
        raise CliError(f"a line of stdin is longer than the {CHAT_LINE_BYTES:,}-byte limit")
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CliError("stdin is not valid UTF-8") from None


def _interrupted(signum, frame) -> None:
    """Ctrl-C before the model is loaded: print one line and leave at once with 130. Not a KeyboardInterrupt:
    raised while torch or the kernels are imported it leaves them half-imported (later imports then fail with
    unrelated errors), and raised inside a Python callback of torch's C++ (the meta-device model construction
    while loading) it aborts the process with a C++ backtrace; both were seen here. Files being written are
    hidden temporary ones (model._files); the next run that writes beside them removes them. Once the model is
    loaded, ``_load`` hands Ctrl-C back to Python: chat stops a reply with it, generate ends with 130."""
    try:
        sys.stdout.flush()
    except Exception:
        pass
    print("\ninterrupted", file=sys.stderr, flush=True)
    os._exit(130)


def install_ctrl_c_handler():
    """Install ``_interrupted`` for SIGINT when Python's own handler is in place; returns what to restore."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        return None  # SIGINT ignored (a background job) or handled by the embedding program: leave it so
    signal.signal(signal.SIGINT, _interrupted)
    return previous


def ctrl_c_to_python() -> None:
    """After loading: Ctrl-C raises KeyboardInterrupt again (if main() had installed ``_interrupted``)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class StdoutError(UserError):
    """Standard output cannot take what the command prints: closed (``>&-``), a full disk, an I/O error."""


class GuardedStdout:
    """sys.stdout, whose write and flush failures become a StdoutError ("cannot write to stdout: No space left
    on device") instead of an OSError that reads like a file of ours. A reader that left (``| head``,
    BrokenPipeError) is not an error: that passes through to the callers that end quietly on it."""

    def __init__(self, stream):
        self._stream = stream

    def _guard(self, call, *a):
        try:
            return call(*a)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise StdoutError(f"cannot write to stdout: {e.strerror or e}") from None

    def write(self, text: str) -> int:
        return self._guard(self._stream.write, text)

    def flush(self) -> None:
        self._guard(self._stream.flush)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)
