"""Running as a service: pidfile, detaching, logging targets, signals.

Everything here is called from the main thread of `tcprc device|server`
before any worker thread exists (detach forks), or from its wait loop.
"""

import errno
import fcntl
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from typing import Callable, Optional

LOGGER = "tcprc"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
          "warning": logging.WARNING, "error": logging.ERROR}


class PidFileError(Exception):
    """A pidfile problem, phrased as one line for the user."""


class AlreadyRunning(PidFileError):
    pass


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


class SyslogHandler(logging.Handler):
    """Datagrams to the local syslog socket, facility daemon, ident tcprc.

    Unconnected and non-blocking on purpose: a syslogd that is not up yet,
    restarts or stalls loses lines but never blocks or stops the tunnels.
    """

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4,
                logging.ERROR: 3, logging.CRITICAL: 2}
    FACILITY_DAEMON = 3

    def __init__(self, address: str = "/dev/log", ident: str = "tcprc"):
        super().__init__()
        self.address = address
        self.ident = ident
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            severity = self.PRIORITY.get(record.levelno, 6)
            head = "<%d>%s[%d]: " % (self.FACILITY_DAEMON * 8 + severity, self.ident, os.getpid())
            data = (head + self.format(record)).encode("utf-8", "replace")[:2048]
            self.sock.sendto(data, self.address)
        except OSError:
            pass   # no syslogd (yet), or its queue is full
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


def make_handler(target: str, detached: bool, syslog_address: str = "/dev/log") -> logging.Handler:
    """One handler for a [log] target; raises OSError when a log file cannot be opened."""
    if target == "auto":
        target = "syslog" if detached else "stderr"
    if target == "syslog":
        handler = SyslogHandler(syslog_address)   # type: logging.Handler
        handler.setFormatter(logging.Formatter("%(message)s"))
        return handler
    if target == "stderr":
        handler = logging.StreamHandler(sys.stderr)
        # journald (systemd) stamps every line itself
        stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
        handler.setFormatter(logging.Formatter(stamp + "%(levelname)s %(name)s: %(message)s"))
        return handler
    from logging.handlers import WatchedFileHandler  # reopens after logrotate
    handler = WatchedFileHandler(target)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    return handler


def setup_logging(level: str, target: str, detached: bool, syslog_address: str = "/dev/log") -> None:
    """(Re)configure the "tcprc" logger; on error the old setup stays and OSError is raised."""
    handler = make_handler(target, detached, syslog_address)
    handler._tcprc_handler = True  # type: ignore[attr-defined]
    logger = logging.getLogger(LOGGER)
    for old in list(logger.handlers):
        if getattr(old, "_tcprc_handler", False):
            logger.removeHandler(old)
            old.close()
    logger.addHandler(handler)
    logger.setLevel(LEVELS.get(level, logging.INFO))
    logger.propagate = False


class Signals:
    """SIGTERM/SIGINT ask to stop, SIGHUP to reload.

    The handlers only set flags: locks, logging and I/O are not safe inside a
    handler. wait() in the main thread turns the flags into actions; it sleeps
    in select() on the signal wakeup fd, so a signal acts at once.
    """

    # The sleep is bounded all the same: a signal delivered to another thread
    # wakes select() before its Python handler has run in this one, and the
    # flag it sets must still act, within a TICK.
    TICK = 1.0

    def __init__(self) -> None:
        self.stop_requested = False
        self.reload_requested = False
        self.stop_signal = 0

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop(self, signum, frame) -> None:
        self.stop_signal = signum
        self.stop_requested = True

    def _on_hup(self, signum, frame) -> None:
        self.reload_requested = True

    def wait(self, on_reload: Callable[[], None]) -> None:
        """Run until a stop signal, reloading on each SIGHUP."""
        # Made here, not in install(): detach() closes every inherited fd.
        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        previous = signal.set_wakeup_fd(wfd)
        try:
            # A signal that came before set_wakeup_fd only set its flag: the
            # flags are checked before every sleep.
            while not self.stop_requested:
                if self.reload_requested:
                    self.reload_requested = False
                    on_reload()
                    continue
                if select.select([rfd], [], [], self.TICK)[0]:
                    try:
                        os.read(rfd, 512)
                    except BlockingIOError:
                        pass
        finally:
            signal.set_wakeup_fd(previous)
            os.close(rfd)
            os.close(wfd)


def log_uncaught(logger: logging.Logger) -> None:
    """Send uncaught exceptions (main and worker threads) to the log: detached,
    stderr is /dev/null and a crash would otherwise leave no trace."""
    def main_hook(exc_type, exc, tb):
        logger.critical("unexpected error, exiting", exc_info=(exc_type, exc, tb))

    def thread_hook(args):
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        logger.critical("thread %s: unexpected error", name,
                        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    sys.excepthook = main_hook
    threading.excepthook = thread_hook


class Service:
    """How one agent runs as a service: --daemon, --pidfile, [log] and signals.

    run_agent calls start() before it builds the app, ready() once the app
    and its channels run, wait() until told to stop, and stop() last, so the
    pidfile goes after everything else.
    """

    def __init__(self, args, cfg) -> None:
        self.detach = bool(getattr(args, "daemon", False))
        path = getattr(args, "pidfile", None)
        self.pidfile = PidFile(path) if path else None
        if getattr(args, "config", None):
            args.config = os.path.abspath(args.config)   # reloads happen after chdir /
        self.cfg = cfg
        self.report = StartReport()
        self.signals = Signals()
        self.status = 0
        self.log = logging.getLogger(LOGGER)

    def start(self) -> bool:
        """False: do not run; exit with self.status (the reason is reported)."""
        self.signals.install()   # before the slow part: a HUP must not kill us
        if self.detach:
            self.report = detach()
            log_uncaught(self.log)
        try:
            setup_logging(self.cfg.log.level, self.cfg.log.target, self.detach)
        except OSError as exc:
            self.status = self.fail("tcprc: cannot log to %s: %s"
                                    % (self.cfg.log.target, exc.strerror or exc))
            return False
        if self.pidfile is not None:
            try:
                self.pidfile.acquire()
            except PidFileError as exc:
                self.pidfile = None
                self.status = self.fail("tcprc: %s" % exc)
                return False
        return True

    def fail(self, message: str, status: int = 1) -> int:
        if self.report.detached:   # the parent prints it; the log keeps it too
            self.log.error("%s", message.split(": ", 1)[-1] if message.startswith("tcprc: ") else message)
        return self.report.fail(message, status)

    def ready(self) -> None:
        self.report.ok()
        self.log.info("%s agent running (pid %d%s)", self.cfg.role, os.getpid(),
                      ", detached" if self.detach else "")

    def wait(self, on_reload: Callable[[], None]) -> None:
        self.signals.wait(on_reload)
        if self.signals.stop_requested:
            self.log.info("signal %d: stopping", self.signals.stop_signal)

    def reload(self, load: Callable[[], object], app) -> None:
        """SIGHUP: a new config replaces the old only if it is valid as a whole."""
        from .config import ConfigError
        try:
            cfg = load()
        except ConfigError as exc:
            self.log.error("reload failed, keeping the running config: %s", exc)
            return
        try:
            setup_logging(cfg.log.level, cfg.log.target, self.detach)
        except OSError as exc:
            self.log.error("reload: cannot log to %s: %s; logging unchanged",
                           cfg.log.target, exc.strerror or exc)
        if cfg.control.socket != self.cfg.control.socket:
            self.log.warning("reload: [control] socket change takes effect at the next restart")
        app.apply_settings(getattr(cfg, cfg.role))
        self.cfg = cfg
        self.log.info("reloaded %s", cfg.path or "the defaults")

    def stop(self) -> None:
        if self.pidfile is not None:
            self.pidfile.release()
            self.pidfile = None
