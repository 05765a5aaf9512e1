"""Reading what a person names (--prompts-file, --calibration): a regular file or a pipe, under a byte cap; a device,
a socket or a folder refused at once. The cap holds however the bytes come (a file's size, a pipe that never ends)."""

from __future__ import annotations

import errno
import io
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from llama3_triton.model.checkpoints.files import read_capped, read_stream_capped
from llama3_triton.model.errors import UserError


def test_a_file_within_the_cap_is_read_whole(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"one\ntwo\n")
    assert read_capped(tmp_path / "p.txt", "--prompts-file p.txt", 8) == b"one\ntwo\n"


def test_a_file_over_the_cap_is_refused_by_its_size(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"x" * 9)
    with pytest.raises(UserError, match=r"^--prompts-file p.txt: 9 bytes, over the 8-byte limit$"):
        read_capped(tmp_path / "p.txt", "--prompts-file p.txt", 8)


@pytest.mark.parametrize("path, kind", [("/dev/zero", "a device"), ("/dev/urandom", "a device"), ("/", "a folder")])
def test_devices_and_folders_are_refused_without_reading(path, kind):
    with pytest.raises(UserError, match=f"not a file or a pipe but {kind}$"):
        read_capped(path, f"--calibration {path}", 1 << 20)


def test_a_socket_is_refused(tmp_path):
    """Linux refuses to open a Unix socket at all (ENXIO): an OSError, which the CLI prints as one line."""
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "s"))
        with pytest.raises(OSError) as e:
            read_capped(tmp_path / "s", "--prompts-file s", 1 << 20)
        assert e.value.errno == errno.ENXIO


def test_a_pipe_that_never_ends_stops_at_the_cap(tmp_path):
    """/dev/zero behind a FIFO (or ``<(yes)``): read until one byte past the cap, then refused; memory bounded."""
    fifo = tmp_path / "f"
    os.mkfifo(fifo)

    def endless():
        try:
            with open(fifo, "wb", buffering=0) as w:
                while True:
                    w.write(b"y\n" * 4096)
        except BrokenPipeError:
            pass

    writer = threading.Thread(target=endless, daemon=True)
    writer.start()
    with pytest.raises(UserError, match=r"^<\(yes\): more than the 65,536-byte limit$"):
        read_capped(fifo, "<(yes)", 1 << 16)
    writer.join(10)
    assert not writer.is_alive()  # the reader closed its end: the writer saw a broken pipe


def _echo_into_a_fifo(fifo: Path) -> threading.Thread:
    """``<(echo a prompt)``: makes the FIFO ``fifo``; returns a thread, not started, that writes into it and closes."""
    os.mkfifo(fifo)

    def echo():
        with open(fifo, "wb") as w:
            w.write(b"a prompt\n")

    return threading.Thread(target=echo, daemon=True)


def test_a_short_pipe_is_read_whole(tmp_path):
    fifo = tmp_path / "f"
    writer = _echo_into_a_fifo(fifo)
    writer.start()
    assert read_capped(fifo, "<(echo)", 64) == b"a prompt\n"
    writer.join(10)


def test_a_writer_that_comes_and_goes_before_the_read_is_read_whole(tmp_path, monkeypatch):
    """The race of a fast ``<(echo ...)``: the writer opens, writes and closes between read_capped's open and its
    read (made certain here: the writer runs to its end when read_capped looks at what it opened). Its bytes are
    read. A second, blocking open of the FIFO, the way this was first written, waited for a writer forever: the
    suite hung on test_a_short_pipe_is_read_whole under load."""
    from llama3_triton.model.checkpoints import files

    fifo = tmp_path / "f"
    writer = _echo_into_a_fifo(fifo)

    class OsWhoseFstatWaitsForTheWriter:  # files.py's ``os`` only: other threads keep the real os.fstat
        def __getattr__(self, name):
            return getattr(os, name)

        def fstat(self, fd):
            writer.start()  # its open returns: read_capped's open is a reader
            writer.join(10)
            assert not writer.is_alive()
            return os.fstat(fd)

    monkeypatch.setattr(files, "os", OsWhoseFstatWaitsForTheWriter())
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(read_capped(fifo, "<(echo)", 64)), daemon=True)
    reader.start()
    reader.join(20)  # a hang fails the test instead of the suite
    assert got == [b"a prompt\n"], "read_capped waited for a writer that had already come and gone"


def test_a_stream_is_read_under_the_cap():
    assert read_stream_capped(io.BytesIO(b"abc"), "stdin", 3) == b"abc"
    with pytest.raises(UserError, match=r"^stdin: more than the 3-byte limit$"):
        read_stream_capped(io.BytesIO(b"abcd"), "stdin", 3)


def test_a_slow_writer_is_read_to_the_end():
    """A pipe's read may return part of what is coming: the reader goes on to the end, it never takes a part for
    the whole (a prompt piped from a slow command arrives in pieces)."""

    class Trickle(io.RawIOBase):
        def __init__(self, data: bytes):
            self.data = data

        def readable(self):
            return True

        def readinto(self, b):
            n = min(3, len(self.data), len(b))
            b[:n], self.data = self.data[:n], self.data[n:]
            return n

    assert read_stream_capped(Trickle(b"a prompt that trickles in"), "stdin", 100) == b"a prompt that trickles in"
    with pytest.raises(UserError, match="more than the 10-byte limit"):
        read_stream_capped(Trickle(b"a prompt that trickles in"), "stdin", 10)


# ---- every file the project writes appears whole or not at all, with the usual modes -----------------------


def _modes(root: Path) -> set[tuple[str, int]]:
    out = {("dir", root.stat().st_mode & 0o777)}
    for p in root.rglob("*"):
        out.add(("dir" if p.is_dir() else "file", p.stat().st_mode & 0o777))
    return out


@pytest.mark.parametrize(
    ("mask", "want"), [(0o022, {("dir", 0o755), ("file", 0o644)}), (0o077, {("dir", 0o700), ("file", 0o600)})]
)
def test_make_tiny_files_have_the_usual_modes(tmp_path, mask, want):
    from llama3_triton.model.tools.tiny import make_tiny

    old = os.umask(mask)
    try:
        make_tiny(tmp_path / "t", dim=64, n_layers=1, hf=True)
    finally:
        os.umask(old)
    assert _modes(tmp_path / "t") == want
    assert [p.name for p in tmp_path.iterdir()] == ["t"]  # no temporary leftovers


def test_atomic_write_failing_half_way_leaves_the_old_file(tmp_path):
    from llama3_triton.model.checkpoints import files as _files

    target = tmp_path / "report.html"
    target.write_text("old")
    with pytest.raises(OSError, match="disk full"), _files.atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise OSError(28, "disk full")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.html"]
    _files.write_text(target, "new")
    assert target.read_text() == "new" and target.stat().st_mode & 0o777 == 0o666 & ~_files.umask()


def test_make_tiny_removes_the_temporary_folder_of_a_killed_run(tmp_path):
    from llama3_triton.model.tools.tiny import make_tiny

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".t.tmp-{int(dead.stdout)}-abc"
    leftover.mkdir()
    (leftover / "consolidated.00.pth").write_bytes(b"half")
    make_tiny(tmp_path / "t", dim=64, n_layers=1)
    assert [p.name for p in tmp_path.iterdir()] == ["t"]
