"""Detaching from the terminal (`--daemon`), and telling the starter how the start went.

detach() forks: call it from the main thread before any other thread exists
(Service.start does, before the app is built).
"""

import os
import select
import sys
import time
from typing import Optional


class StartReport:
    """Tells whoever started the agent how the start went.

    In the foreground that is stderr and the exit status; after detach() it is
    the waiting parent, which prints the line and exits with the status.
    """

    def __init__(self, fd: Optional[int] = None):
        self._fd = fd

    @property
    def detached(self) -> bool:
        return self._fd is not None

    def ok(self) -> None:
        self._send(b"OK\n")

    def fail(self, message: str, status: int = 1) -> int:
        if self._fd is None:
            print(message, file=sys.stderr)
        else:
            self._send(("FAIL %d %s\n" % (status, message.replace("\n", " "))).encode("utf-8", "replace"))
        return status

    def _send(self, data: bytes) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, data)
        except OSError:
            pass   # the parent is gone; nobody left to tell
        os.close(self._fd)
        self._fd = None


def detach(timeout: float = 30.0) -> StartReport:
    """Become a daemon: double fork, setsid, chdir /, stdio on /dev/null.

    The original process stays until the agent reports (StartReport.ok/fail),
    then exits with 0 or the failure status, so `tcprc ... --daemon` and init
    scripts see start errors. Only the detached agent returns from here.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    rfd, wfd = os.pipe()
    first = os.fork()
    if first:
        os.close(wfd)
        os.waitpid(first, 0)
        os._exit(_await_report(rfd, timeout))
    os.close(rfd)
    os.setsid()
    if os.fork():
        os._exit(0)   # the session leader leaves: the agent can never regain a tty
    os.chdir("/")
    os.umask(0o022)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
    _close_inherited(keep=wfd)
    return StartReport(wfd)


def _await_report(rfd: int, timeout: float) -> int:
    data = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([rfd], [], [], left)[0]:
            sys.stderr.write("tcprc: the agent did not report its start within %.0f s\n" % timeout)
            return 1
        chunk = os.read(rfd, 4096)
        if not chunk:
            break
        data += chunk
    line = data.decode("utf-8", "replace").strip()
    if line == "OK":
        return 0
    if line.startswith("FAIL "):
        _, status, message = (line.split(" ", 2) + [""])[:3]
        sys.stderr.write(message + "\n")
        return int(status) if status.isdigit() else 1
    sys.stderr.write("tcprc: the agent exited during start (see its log)\n")
    return 1


def _close_inherited(keep: int) -> None:
    # A shell's lock fd (the watchdog's flock) must not live on in the agent.
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd > 2 and fd != keep:
            try:
                os.close(fd)
            except OSError:
                pass
