"""What the hostile-file tests share (a helper module, not a test module): a checkpoint file replaced by a FIFO."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def fifo_in_place(path: Path):
    """Replace ``path`` by a FIFO. Should the code under test block on it, a writer opens it after 20 s so the
    test fails instead of hanging."""
    path.unlink()
    os.mkfifo(path)
    rescued = []

    def rescue():
        if not done.wait(20):
            rescued.append(True)
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)

    done = threading.Event()
    t = threading.Thread(target=rescue, daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()
        assert not rescued, f"{path}: the loader blocked on a FIFO"
