"""Running as a service: the order of detach, logging, pidfile and signals.

Service is driven by cli.run_agent from the main thread only: start() (it
may detach, which forks, so before any other thread exists), ready(), then
wait(), whose SIGHUP reloads run in the main thread while the app's and the
channels' threads work; stop() last.
"""

import logging
import os
import sys
import threading
from typing import Any, Callable

from ..errors import ConfigError, PidFileError
from .config import Config
from .detach import StartReport, detach
from .logsetup import LOGGER, log_uncaught, setup_logging
from .signals import Signals


class Service:
    """How one agent runs as a service: --daemon, --pidfile, [log] and signals.

    run_agent calls start() before it builds the app, ready() once the app
    and its channels run, wait() until told to stop, and stop() last, so the
    pidfile goes after everything else.
    """

    def __init__(self, args: Any, cfg: Config) -> None:
        self.detach = bool(getattr(args, "daemon", False))
        path = getattr(args, "pidfile", None)
        self.pidfile = None
        if path:   # only then: a unit runs without one (docs/benchmarks.md, third round)
            from .pidfile import PidFile
            self.pidfile = PidFile(path)
        if getattr(args, "config", None):
            args.config = os.path.abspath(args.config)   # reloads happen after chdir /
        self.cfg = cfg
        self.report = StartReport()
        self.signals = Signals()
        self.status = 0
        self.log = logging.getLogger(LOGGER)
        self._log_lock = threading.Lock()

    def start(self) -> bool:
        """False: do not run; exit with self.status (the reason is reported)."""
        self.signals.install()   # before the slow part: a HUP must not kill us
        if self.detach:
            self.report = detach()
            log_uncaught(self.log)
        self.signals.arm()
        try:
            self.apply_log(self.cfg.log)
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
        if sys.flags.optimize:   # README "Smaller still": only with the byte-code it needs
            from .bytecode import compiled_from_source, warning_line
            line = warning_line(compiled_from_source())
            if line:
                self.log.warning("%s", line)

    def wait(self, on_reload: Callable[[], None]) -> None:
        self.signals.wait(on_reload)
        if self.signals.stop_requested:
            self.log.info("signal %d: stopping", self.signals.stop_signal)

    def apply_log(self, settings: Any) -> None:
        """[log] set up anew (SIGHUP, `config set log.*`); OSError: the old setup stays."""
        with self._log_lock:   # a reload and a `config set` never interleave here
            setup_logging(settings.level, settings.target, self.detach)

    def reload(self, load: Callable[[], Config], app: Any) -> None:
        """SIGHUP: a new config replaces the old only if it is valid as a whole. One line
        names the changed keys that were applied, one WARNING those that wait for a restart."""
        try:
            cfg = load()
        except ConfigError as exc:
            self.log.error("reload failed, keeping the running config: %s", exc)
            return
        cfg.started = self.cfg.started   # what a key that needs a restart still runs with
        # Only now: ops.changes (and tomlwrite) would sit in every idle agent for a
        # reload that may never come (docs/benchmarks.md, third round).
        from .changes import changes, reload_lines
        found = changes(cfg.role, self.cfg.sections, cfg.sections, cfg.started)
        try:
            self.apply_log(cfg.log)
        except OSError as exc:
            self.log.error("reload: cannot log to %s: %s; logging unchanged",
                           cfg.log.target, exc.strerror or exc)
            found = [change for change in found if not change.name.startswith("log.")]
        try:
            app.apply_settings(getattr(cfg, cfg.role))
        except ConfigError as exc:   # a TLS file the new config names cannot be used
            self.log.error("reload failed, keeping the running config: %s", exc)
            return
        self.cfg = cfg
        applied, waiting = reload_lines(cfg.role, cfg.path or "the defaults", found)
        self.log.info("%s", applied)
        if waiting:
            self.log.warning("%s", waiting)

    def stop(self) -> None:
        if self.pidfile is not None:
            self.pidfile.release()
            self.pidfile = None
