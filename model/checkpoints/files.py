"""Writing files so that they appear whole or not at all, with the modes a plain ``open`` would give.

Every file the project writes (explain's report, tiny checkpoints, the cached default checkpoint,
benchmark results) goes through here. A file is written to a hidden temporary sibling in the same
folder, flushed to disk, given mode 0666 & ~umask, then renamed over the target with ``os.replace``
(atomic within one file system). A folder is built inside a hidden temporary sibling folder and renamed
into place the same way. A reader, a second process or a crash therefore sees either the old state or
the complete new one, never half a file.

``tempfile`` creates its files 0600 and folders 0700 (safe for /tmp, wrong for a checkpoint other users
should read), so the modes are set explicitly from the process umask.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from llama3_triton.model.errors import UserError

# Hidden temporary siblings are named ".<target name>.tmp-<pid>-<random>": the pid lets a later run tell
# the leftovers of a killed writer (pid gone) from a writer still at work.
TMP_MARK = ".tmp-"


def umask() -> int:
    """The process umask, read without changing it (os.umask can only be read by setting it, which races
    with other threads creating files); falls back to the set-and-restore dance off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    return 0o666 & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}{TMP_MARK}{os.getpid()}-"


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; when the block succeeds, the file written there becomes
    ``target`` (mode 0666 & ~umask, fsync'ed first). On any error (or Ctrl-C) the temporary file is removed
    and ``target`` is left as it was."""
    target = Path(target)
    fd, name = tempfile.mkstemp(prefix=_tmp_prefix(target), dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the writer may have closed its handle without fsync
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_bytes(target: str | os.PathLike, data: bytes) -> None:
    """``Path(target).write_bytes(data)``, whole or not at all."""
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(target: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """``Path(target).write_text(text)``, whole or not at all."""
    write_bytes(target, text.encode(encoding))


def fix_modes(root: Path) -> None:
    """Give every folder under ``root`` (and root) 0777 & ~umask and every file 0666 & ~umask."""
    fm, dm = file_mode(), dir_mode()
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(folder, d), dm)
        for f in files:
            p = os.path.join(folder, f)
            if not os.path.islink(p):
                os.chmod(p, fm)
    os.chmod(root, dm)


def new_tmp_dir(target: Path) -> Path:
    """A hidden temporary sibling folder of ``target`` (same file system, so it can be renamed onto it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=_tmp_prefix(target), dir=target.parent))


def build_dir(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Build a folder with ``write(tmp)`` in a temporary sibling and rename it to ``target`` (which must not
    exist, or be an empty folder). On any failure the temporary folder is removed and nothing appears.
    Raises FileExistsError when ``target`` is (or meanwhile became) a non-empty folder or a file."""
    target = Path(target)
    tmp = new_tmp_dir(target)
    try:
        write(tmp)
        fix_modes(tmp)
        _fsync_tree(tmp)
        try:
            os.replace(tmp, target)  # replaces an empty folder atomically; fails on a non-empty one
        except OSError as e:
            if isinstance(e, (FileExistsError, IsADirectoryError, NotADirectoryError)) or e.errno in (39, 66):
                raise FileExistsError(e.errno, "already exists and is not empty", str(target)) from None
            raise
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # Name the file as the user knows it (inside target), not inside our hidden temporary folder.
        if isinstance(e.filename, str) and e.filename.startswith(str(tmp)):
            raise type(e)(e.errno, e.strerror, str(target) + e.filename[len(str(tmp)) :]) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` before the rename publishes it (a crash must not publish zeros)."""
    for folder, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(folder, f)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def stale_tmp_siblings(target: Path, max_age_s: float = 24 * 3600) -> list[Path]:
    """Temporary siblings of ``target`` left by writers that are gone: their pid no longer runs, or they are
    older than ``max_age_s`` (a pid can be reused)."""
    import time

    out = []
    prefix = f".{target.name}{TMP_MARK}"
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return out
    for p in entries:
        if not p.name.startswith(prefix):
            continue
        pid_text = p.name[len(prefix) :].split("-", 1)[0]
        try:
            age = time.time() - p.lstat().st_mtime
        except OSError:
            continue
        alive = pid_text.isdigit() and _pid_alive(int(pid_text))
        if not alive or age > max_age_s:
            out.append(p)
    return out


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OSError:
        return False
    return True


def remove(path: Path) -> None:
    """Remove a file or a folder tree, ignoring one that is already gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def open_regular(path: Path, what: str = "file") -> int:
    """Open ``path`` for reading only if it is a regular file (after symlinks), and return the descriptor.

    O_NONBLOCK makes the open itself return at once for a FIFO or a device (a plain open of a FIFO blocks
    until a writer appears); fstat on the open descriptor then checks the very file that was opened.
    Raises OSError (FileNotFoundError, ...) or ValueError naming ``path`` for anything but a regular file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a folder" if stat.S_ISDIR(st.st_mode) else "a device"
            if stat.S_ISSOCK(st.st_mode):
                kind = "a socket"
            raise UserError(f"{path}: cannot read the {what} file: not a regular file but {kind}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_regular(path: Path, what: str = "file") -> int:
    """Check that ``path`` is a regular file without blocking; returns its size."""
    fd = open_regular(path, what)
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def read_regular_bytes(path: Path, what: str = "file") -> bytes:
    """The bytes of ``path``, which must be a regular file (a FIFO in its place does not hang the read)."""
    fd = open_regular(path, what)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def read_capped(path: str | os.PathLike, what: str, cap: int) -> bytes:
    """The bytes of an input file a person names (``--prompts-file``, ``--calibration``), read under a byte cap: a
    regular file or a pipe (``<(command)``); a device such as /dev/zero, a socket or a folder is refused at once.
    At most ``cap + 1`` bytes are ever held: more is refused as over the cap, named in the error, before it costs
    memory. (Standard input is read under the same kind of cap by its reader, ``read_stream_capped``.)"""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device"
            raise UserError(f"{what}: not a file or a pipe but {kind}")
        if st.st_size > cap:
            raise UserError(f"{what}: {st.st_size:,} bytes, over the {cap:,}-byte limit")
        if stat.S_ISFIFO(st.st_mode):
            return read_stream_capped(_FifoReader(fd), what, cap)
        os.set_blocking(fd, True)
        with os.fdopen(os.dup(fd), "rb") as f:
            return read_stream_capped(f, what, cap)
    finally:
        os.close(fd)


class _FifoReader:
    """``read(n)`` on a FIFO opened without waiting for a writer, which reads as empty until one comes: each read
    first polls, which waits for data or for a writer that has come and gone (Linux reports POLLHUP on such a FIFO
    only once it has seen a writer: one that has not opened yet is waited for, as a FIFO's reader does). Opening
    the FIFO again, blocking, would wait for a writer too, but forever when the writer has already written its
    bytes and left between the two opens (a fast ``<(echo ...)``): the bytes are in this open's pipe, read here."""

    def __init__(self, fd: int):
        self.fd, self.poller = fd, select.poll()
        self.poller.register(fd, select.POLLIN)

    def read(self, n: int) -> bytes:
        while True:
            self.poller.poll()
            try:
                return os.read(self.fd, n)  # b"": every writer has closed its end
            except BlockingIOError:  # woken with nothing to read yet
                continue


def read_stream_capped(f, what: str, cap: int) -> bytes:
    """The binary stream ``f`` to its end, at most ``cap`` bytes; more is a UserError naming ``what``. Read in a
    loop to the end: one ``read(n)`` may return less than is coming from a pipe whose writer is slower."""
    parts, held = [], 0
    while held <= cap:
        chunk = f.read(min(1 << 20, cap + 1 - held))
        if not chunk:
            break
        parts.append(chunk)
        held += len(chunk)
    if held > cap:
        raise UserError(f"{what}: more than the {cap:,}-byte limit")
    return b"".join(parts)
