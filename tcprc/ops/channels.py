"""The agent's command channels: the control socket and the serial console.

cli.run_agent calls start_channels once from the main thread after the app
runs, and Channels.close() once at the end; each channel serves the one
CommandParser from its own threads.
"""

import logging
import threading
from typing import Any, Callable, Dict, List, Optional

from ..errors import ControlError
from .config import Config
from .control import ControlServer

log = logging.getLogger("tcprc.control")


class DeferredCommands:
    """The agent's CommandParser, built at the first command line a channel reads.

    Why: ops.commands (with shlex, ops.changes and ops.tomlwrite) is about
    0.3 MB of RSS that an agent nobody asks anything would hold for ever
    (docs/benchmarks.md, third round). Channels call execute() from their
    threads, the main thread set_config() on SIGHUP: one lock covers both
    until the parser exists, which then takes its own locks.
    """

    def __init__(self, app: Any, cfg: Config,
                 appliers: Optional[Dict[str, Callable[[Any], None]]] = None):
        self.app = app
        self._cfg = cfg
        self._appliers = appliers
        self._parser: Any = None
        self._lock = threading.Lock()

    @property
    def cfg(self) -> Config:
        parser = self._parser
        return self._cfg if parser is None else parser.cfg

    def set_config(self, cfg: Config) -> None:
        with self._lock:
            if self._parser is None:
                self._cfg = cfg
                return
        self._parser.set_config(cfg)

    def execute(self, line: str) -> List[str]:
        parser = self._parser
        if parser is None:
            with self._lock:
                if self._parser is None:
                    from .commands import CommandParser
                    self._parser = CommandParser(self.app, self._cfg, self._appliers)
                parser = self._parser
        return parser.execute(line)


class Channels:
    """The command channels of one agent; close() stops them all."""

    def __init__(self) -> None:
        self.items: List[Any] = []

    def close(self) -> None:
        for item in reversed(self.items):
            try:
                item.close()
            except Exception:  # one channel's trouble must not keep the others open
                log.exception("closing %r failed", item)
        self.items = []


def start_channels(parser: Any, cfg: Config, console_port: Optional[str] = None) -> Channels:
    """Start the control socket and (device) serial console of `cfg`.

    A channel that cannot start is logged and skipped: the tunnel matters more.
    `console_port` (--console) overrides [console] port; the caller checks
    pyserial for it beforehand (see console.serial_available).
    """
    channels = Channels()
    path = cfg.control.socket
    if path:
        server = ControlServer(parser, path, liveness=getattr(parser.app, "liveness", None))
        try:
            server.start()
            channels.items.append(server)
        except ControlError as exc:
            log.warning("%s; tcprc ctl will not reach this agent", exc)
    if cfg.role == "device":
        port = console_port or cfg.console.port
        if port:
            from . import console   # only now: it imports pyserial
            if not console.serial_available():
                log.error("[console] port %s ignored: %s", port, console.INSTALL_HINT)
            else:
                channel = console.SerialConsole(parser, port, cfg.console.baudrate,
                                                cfg.console.echo, cfg.console.prompt)
                channel.start()
                channels.items.append(channel)
    return channels
