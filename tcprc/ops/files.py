"""Reading the small files an operator names (config, secret, device and TLS files)
so that none of them can block the reader or fill its memory.

One rule for all of them: the path must lead to a regular file.  It is opened
with O_NONBLOCK (a FIFO with no writer would otherwise block open() for ever:
on the server that is the acceptor thread, which then serves nobody), checked
with fstat() on the open descriptor (what is read is what was checked), and
read up to a size cap.  Symlinks are followed, because a config managed by a
deploy tool is often a link to a regular file; a link to anything else (a
FIFO, /dev/zero, a serial port) is refused like the thing it points to.  The
path is stat()ed before it is opened, so a device node is never opened at
all (opening a tty can toggle its modem lines).

Every failure is a FileProblem: a ConfigError whose message is one line,
"PATH: PROBLEM", with the problem alone in `.problem` for callers that name
the key ("[device] secret_file PATH: PROBLEM").
"""

import errno
import os
import stat
from typing import NamedTuple, Tuple

from ..errors import ConfigError

# open() flags: never block, never become our controlling tty, never leak into a child.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


class FileProblem(ConfigError):
    """A file that cannot be used; str() is "PATH: PROBLEM" on one line."""

    def __init__(self, path: str, problem: str, error: int = 0):
        super().__init__("%s: %s" % (printable(path), problem))
        self.path = path
        self.problem = problem
        self.errno = error     # the OSError's errno, 0 for a problem of our own


class FileContent(NamedTuple):
    data: bytes
    mode: int      # st_mode of the file read (permission bits included)
    uid: int


def printable(path: str) -> str:
    """A path for an error line: as written, or quoted when it holds a newline or
    another control character (the error stays one line)."""
    return path if path.isprintable() else repr(path)


def _not_regular(mode: int) -> str:
    for test, kind in _KINDS:
        if test(mode):
            return "is %s, not a regular file" % kind
    return "is not a regular file"


def _os_problem(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "no such file"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.ELOOP:
        return "too many levels of symbolic links"
    return exc.strerror or str(exc)


def _open_regular(path: str) -> Tuple[int, os.stat_result]:
    """(descriptor, fstat) of the regular file `path`; FileProblem if it is not one."""
    try:
        before = os.stat(path)
        if not stat.S_ISREG(before.st_mode):
            raise FileProblem(path, _not_regular(before.st_mode))
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise FileProblem(path, _os_problem(exc), exc.errno or 0) from None
    except ValueError:   # os.stat() says so of a NUL byte in the path
        raise FileProblem(path, "the path has a NUL byte") from None
    try:
        info = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise FileProblem(path, _os_problem(exc), exc.errno or 0) from None
    if not stat.S_ISREG(info.st_mode):   # swapped for something else meanwhile
        os.close(fd)
        raise FileProblem(path, _not_regular(info.st_mode))
    return fd, info


def read_regular_file(path: str, limit: int) -> FileContent:
    """The bytes of the regular file `path` (at most `limit`), its mode and owner.
    FileProblem (one line) for anything else: missing, unreadable, not a regular
    file, longer than `limit`."""
    fd, info = _open_regular(path)
    try:
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise FileProblem(path, _os_problem(exc), exc.errno or 0) from None
    finally:
        os.close(fd)
    if size > limit:
        raise FileProblem(path, "longer than %d bytes" % limit)
    return FileContent(b"".join(chunks), info.st_mode, info.st_uid)


def check_regular_file(path: str) -> None:
    """`path` is a regular file we may open (TLS files, which ssl reads itself later);
    FileProblem (one line) if not."""
    fd, _ = _open_regular(path)
    os.close(fd)


def readable_by_others(path: str, mode: int) -> bool:
    """May group or others read the file `path` of st_mode `mode`?  Then it is not
    fit to hold a secret (ssh refuses such a key).  They may when its bits let them
    and the directory holding it lets them in: a 0644 file in a 0700 directory is
    private (a temporary directory of a test or a benchmark)."""
    if not mode & (stat.S_IRGRP | stat.S_IROTH):
        return False
    try:
        folder = os.stat(os.path.dirname(os.path.realpath(path))).st_mode
    except (OSError, ValueError):
        return True   # cannot tell: take the file's own bits
    return bool((mode & stat.S_IRGRP and folder & stat.S_IXGRP)
                or (mode & stat.S_IROTH and folder & stat.S_IXOTH))


def unprotected(path: str, what: str, section: str) -> str:
    """The one-line complaint about a readable file holding a secret."""
    return ("%s is readable by group or others and holds %s: chmod 600 %s (or set "
            "allow_readable_secrets = true in [%s])" % (printable(path), what, printable(path),
                                                       section))
