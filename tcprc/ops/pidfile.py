"""The agent's pidfile: written atomically and flock-ed for as long as the agent lives.

Used from the main thread only (Service.start and Service.stop).
"""

import errno
import fcntl
import os
import time
from typing import Optional

from ..errors import AlreadyRunning, PidFileError

__all__ = ["AlreadyRunning", "PidFile", "PidFileError", "read_pid"]


def read_pid(path: str) -> Optional[int]:
    try:
        with open(path, "rb") as handle:
            text = handle.read(32).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class PidFile:
    """A pidfile that is locked (flock) for as long as its owner lives.

    The lock, not the pid in it, says whether an agent runs: a pidfile left by
    a dead agent is unlocked and taken over. Content is published by link or
    rename of a locked temporary file, so readers never see it half written.
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._fd = None  # type: Optional[int]

    def acquire(self, patience: float = 0.5) -> None:
        # `patience`: a shell probing the lock (flock -n) holds it for a moment.
        deadline = time.monotonic() + max(patience, 0.0) + 2.0
        while time.monotonic() < deadline:
            old = self._open_current()
            if old is not None:
                if not self._lock(old, time.monotonic() + patience):
                    os.close(old)
                    pid = read_pid(self.path)
                    raise AlreadyRunning("%s: already running (pid %s)"
                                         % (self.path, pid if pid else "unknown"))
                if not self._still_current(old):
                    os.close(old)   # replaced or removed while we waited: look again
                    continue
            try:
                self._fd = self._publish(replace=old is not None)
            finally:
                if old is not None:
                    os.close(old)
            if self._fd is not None:
                return
        raise PidFileError("%s: could not take the pidfile (it keeps changing)" % self.path)

    def release(self) -> None:
        if self._fd is None:
            return
        if self._still_current(self._fd):
            try:
                os.unlink(self.path)
            except OSError:
                pass
        os.close(self._fd)
        self._fd = None

    def _open_current(self) -> Optional[int]:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise PidFileError("%s: cannot open pidfile: %s" % (self.path, exc.strerror)) from None

    @staticmethod
    def _lock(fd: int, deadline: float) -> bool:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def _still_current(self, fd: int) -> bool:
        try:
            here, ours = os.stat(self.path), os.fstat(fd)
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (ours.st_dev, ours.st_ino)

    def _publish(self, replace: bool) -> Optional[int]:
        """Put a locked file holding our pid at self.path; None if someone beat us."""
        tmp = "%s.%d.tmp" % (self.path, os.getpid())
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise PidFileError("%s: cannot write pidfile: %s" % (self.path, exc.strerror)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, b"%d\n" % os.getpid())
            if replace:
                os.rename(tmp, self.path)   # we hold the old file's lock
            else:
                try:
                    os.link(tmp, self.path)  # fails if another agent got there first
                except FileExistsError:
                    os.close(fd)
                    return None
            return fd
        except OSError as exc:
            os.close(fd)
            raise PidFileError("%s: cannot write pidfile: %s" % (self.path, exc.strerror)) from None
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass
