"""Local control socket: `tcprc ctl COMMAND` (ops/ctl.py) talks to the running agent.

The agent listens on a Unix socket (mode 0600) and answers each line with the
CommandParser's lines; the last one is `OK` or starts with `ERROR `.
ControlServer.start() and close() are called from the main thread; it accepts
in its own thread and serves each connection in another (at most MAX_CLIENTS).
"""

import errno
import logging
import os
import selectors
import socket
import stat
import threading
import time
from typing import Any, List, Optional

from ..errors import ControlError
from .commands import MAX_LINE

log = logging.getLogger("tcprc.control")

MAX_CLIENTS = 8          # concurrent ctl connections; more are refused at once
CLIENT_TIMEOUT = 30.0    # a ctl connection without a complete command for this long is dropped


class ControlServer:
    """Serves CommandParser on a Unix socket, one thread per connection."""

    def __init__(self, parser: Any, path: str, client_timeout: float = CLIENT_TIMEOUT):
        self.parser = parser
        self.path = path
        self.client_timeout = client_timeout
        self._sock: Optional[socket.socket] = None
        self._inode: Optional[int] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._clients: List[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        self._sock = self._bind()
        self._thread = threading.Thread(target=self._accept_loop, name="tcprc-control",
                                        daemon=True)
        self._thread.start()
        log.info("control socket %s", self.path)

    def _bind(self) -> socket.socket:
        path = self.path
        if len(os.fsencode(path)) >= 108:
            raise ControlError("control socket path %s is too long (max 107 bytes)" % path)
        self._clear_stale(path)
        directory = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(directory, 0o755, exist_ok=True)
        except OSError as exc:
            raise ControlError("cannot create %s for the control socket: %s"
                               % (directory, exc.strerror or exc))
        # Bind under a temporary name, restrict it, then rename: the socket is
        # never reachable with the umask's permissions.
        tmp = os.path.join(directory, ".%s.%d.tmp" % (os.path.basename(path), os.getpid()))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            sock.bind(tmp)
            os.chmod(tmp, 0o600)
            sock.listen(MAX_CLIENTS)
            os.replace(tmp, path)
            self._inode = os.stat(path).st_ino
        except OSError as exc:
            sock.close()
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise ControlError("cannot listen on control socket %s: %s"
                               % (path, exc.strerror or exc))
        sock.settimeout(None)
        return sock

    @staticmethod
    def _clear_stale(path: str) -> None:
        """Remove a socket left by a dead agent; refuse to touch anything else."""
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ControlError("cannot check control socket %s: %s" % (path, exc.strerror))
        if not stat.S_ISSOCK(mode):
            raise ControlError("%s exists and is not a socket; not replacing it" % path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            # Nobody listens: a dead agent's leftover.
            try:
                os.unlink(path)
            except OSError as exc:
                raise ControlError("cannot remove stale control socket %s: %s"
                                   % (path, exc.strerror or exc))
            return
        finally:
            probe.close()
        raise ControlError("control socket %s is in use by another running agent" % path)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with self._lock:
            clients = list(self._clients)
        for thread in clients:
            thread.join(timeout=10)
        # Only remove the file if it is still ours (a successor may own the path).
        try:
            if self._inode is not None and os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass
        self._inode = None

    def _accept_loop(self) -> None:
        assert self._sock is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._sock, selectors.EVENT_READ)
            while not self._stop.is_set():
                if not selector.select(timeout=0.2):
                    continue
                try:
                    conn, _ = self._sock.accept()
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EINTR):
                        log.warning("control socket accept failed: %s", exc)
                        self._stop.wait(0.5)
                    continue
                self._spawn(conn)

    def _spawn(self, conn: socket.socket) -> None:
        with self._lock:
            self._clients = [t for t in self._clients if t.is_alive()]
            if len(self._clients) >= MAX_CLIENTS:
                busy = True
            else:
                busy = False
                thread = threading.Thread(target=self._serve, args=(conn,),
                                          name="tcprc-control-client", daemon=True)
                self._clients.append(thread)
        if busy:
            try:
                conn.settimeout(1.0)
                conn.sendall(b"ERROR busy: too many control connections\n")
            except OSError:
                pass
            conn.close()
            return
        thread.start()

    def _serve(self, conn: socket.socket) -> None:
        # A short poll interval lets close() end an idle connection quickly.
        conn.settimeout(0.2)
        buf = bytearray()
        # Only a complete command restarts the clock: a client dripping bytes
        # without a newline must not hold one of the MAX_CLIENTS slots forever.
        deadline = time.monotonic() + self.client_timeout
        try:
            while not self._stop.is_set():
                if time.monotonic() >= deadline:
                    if buf:   # at most MAX_CLIENTS lines per client_timeout
                        log.info("control connection closed: no complete command in %gs",
                                 self.client_timeout)
                    return
                try:
                    chunk = conn.recv(4096)
                except socket.timeout:
                    continue
                if not chunk:
                    return
                buf += chunk
                while True:
                    end = buf.find(b"\n")
                    if end < 0:
                        break
                    line, buf = bytes(buf[:end]), buf[end + 1:]
                    if len(line) > MAX_LINE:
                        self._send(conn, ["ERROR line too long (max %d bytes)" % MAX_LINE])
                        return
                    self._send(conn, self._answer(line))
                    if line.strip():   # blank lines are no activity either
                        deadline = time.monotonic() + self.client_timeout
                if len(buf) > MAX_LINE:
                    self._send(conn, ["ERROR line too long (max %d bytes)" % MAX_LINE])
                    return
        except OSError as exc:
            log.debug("control connection ended: %s", exc)
        finally:
            conn.close()

    def _answer(self, line: bytes) -> List[str]:
        text = line.rstrip(b"\r").decode("utf-8", errors="replace")
        answer = self.parser.execute(text)
        return answer or ["ERROR empty command"]

    @staticmethod
    def _send(conn: socket.socket, lines: List[str]) -> None:
        conn.settimeout(5.0)
        conn.sendall("".join(line + "\n" for line in lines).encode("utf-8"))
        conn.settimeout(0.2)
