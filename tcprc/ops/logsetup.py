"""Logging targets: stderr, syslog or a file, set up for the "tcprc" logger.

setup_logging runs in the main thread: at start, and again on SIGHUP while
worker threads log (logging's own lock guards the handler list).
"""

import logging
import os
import socket
import sys
import threading

LOGGER = "tcprc"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
          "warning": logging.WARNING, "error": logging.ERROR}


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
