"""Local control socket: `tcprc ctl COMMAND` (ops/ctl.py) talks to the running agent.

The agent listens on a Unix socket (mode 0600) and answers each line with the
CommandParser's lines; the last one is `OK` or starts with `ERROR `.
ControlServer.start() and close() are called from the main thread; it accepts
in its own thread and serves each connection in another (at most MAX_CLIENTS).
"""

import errno
import logging
import os
import select
import socket
import stat
import threading
import time
from typing import Any, List, Optional

from ..errors import ControlError
log = logging.getLogger("tcprc.control")

MAX_LINE = 4096          # bytes in one command line, on every channel

MAX_CLIENTS = 8          # concurrent ctl connections; more are refused at once
CLIENT_TIMEOUT = 30.0    # a ctl connection without a complete command for this long is dropped
MAX_LIFE = 120.0         # a ctl connection is closed after this long, however busy: one
                         # that sends a command every few seconds must not hold a slot for ever
ACCEPTOR = "tcprc-control (control socket)"


class ControlServer:
    """Serves CommandParser on a Unix socket, one thread per connection."""

    def __init__(self, parser: Any, path: str, client_timeout: float = CLIENT_TIMEOUT,
                 max_life: float = MAX_LIFE, liveness: Any = None):
        """`liveness`: the app's engine.liveness.Liveness (watch, beat, forget), if any:
        the accept thread is one the agent cannot do without."""
        self.parser = parser
        self.path = path
        self.client_timeout = client_timeout
        self.max_life = max_life
        self.liveness = liveness
        self._errors_logged = 0.0
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
        if self.liveness is not None:
            self.liveness.watch(ACCEPTOR, self._thread)
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
        if self.liveness is not None:
            self.liveness.forget(ACCEPTOR)
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
        # poll(), not a selector: no descriptor of its own, so the agent's descriptors
        # are all open once its control socket is there (an epoll came a moment later).
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        while not self._stop.is_set():
            if self.liveness is not None:
                self.liveness.beat(ACCEPTOR)
            try:
                if not poller.poll(200):
                    continue
                try:
                    conn, _ = self._sock.accept()
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EINTR):
                        log.warning("control socket accept failed: %s", exc)
                        self._stop.wait(0.5)
                    continue
                self._spawn(conn)
            except Exception as exc:   # the fault barrier: the next ctl still gets in
                self._internal_error(exc)

    def _internal_error(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._errors_logged >= 10.0:   # a traceback at most every 10 s
            self._errors_logged = now
            log.error("internal error in the control socket (it carries on): %s: %s",
                      type(exc).__name__, exc, exc_info=exc)
        self._stop.wait(0.1)

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
        if not busy:
            try:
                thread.start()
                return
            except (RuntimeError, MemoryError) as exc:   # a thread limit: refuse this one
                with self._lock:
                    self._clients.remove(thread)
                log.warning("control connection refused: cannot start its thread: %s", exc)
        try:
            conn.settimeout(1.0)
            conn.sendall(b"ERROR busy: too many control connections\n" if busy else
                         b"ERROR busy: the agent cannot start a thread for this connection\n")
        except OSError:
            pass
        conn.close()

    def _serve(self, conn: socket.socket) -> None:
        # A short poll interval lets close() end an idle connection quickly.
        conn.settimeout(0.2)
        buf = bytearray()
        # Only a complete command restarts the clock: a client dripping bytes
        # without a newline must not hold one of the MAX_CLIENTS slots forever.
        deadline = time.monotonic() + self.client_timeout
        end_of_life = time.monotonic() + self.max_life
        try:
            while not self._stop.is_set():
                if time.monotonic() >= deadline:
                    if buf:   # at most MAX_CLIENTS lines per client_timeout
                        log.info("control connection closed: no complete command in %gs",
                                 self.client_timeout)
                    return
                if time.monotonic() >= end_of_life:
                    self._send(conn, ["ERROR connection closed: open for %gs (the most a "
                                      "control connection may last)" % self.max_life])
                    log.info("control connection closed after %gs (its maximum life)",
                             self.max_life)
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
        except Exception as exc:   # ends this connection only
            self._internal_error(exc)
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
