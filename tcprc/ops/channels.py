"""The agent's command channels: the control socket and the serial console.

cli.run_agent calls start_channels once from the main thread after the app
runs, and Channels.close() once at the end; each channel serves the one
CommandParser from its own threads.
"""

import logging
from typing import Any, List, Optional

from ..errors import ControlError
from .commands import CommandParser
from .config import Config
from .control import ControlServer

log = logging.getLogger("tcprc.control")


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


def start_channels(parser: CommandParser, cfg: Config, console_port: Optional[str] = None) -> Channels:
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
