"""What a side adds to an uplink: the role handed to engine.link.Link.

A link drives the protocol the same way for both sides; a role adds what
only one side does: the handlers of the actions only it meets (the device's
OpenLocal, the server's Listened, Authed, Denied, Unlisten), and what it says
about the uplink's and its streams' ends.  One object per uplink, given the
link at attach(); every method runs in the link thread.  This base is a role
that adds nothing (tests, tools).
"""

import logging
from typing import Any, Callable, Dict, Optional


class Role:
    log_name = "link"        # the link logs to "tcprc.<log_name>"

    def attach(self, link: Any) -> Dict[type, Callable[[Any], None]]:
        """The link this role serves; returns its handlers: action type -> handler."""
        self.link = link
        return {}

    def on_start(self) -> None:
        """The link thread starts serving the uplink."""

    def on_upgraded(self, detail: str) -> None:
        """Version 2 was negotiated."""
        self.link.log.info("%s: protocol v2 (%s)", self.link.name, detail)

    def on_stream_closed(self, stream: Any, reason: str) -> None:
        self.link.log.info("%s: client %d (%s) closed: %s (%d bytes to the peer, %d from it)",
                           self.link.name, stream.id, stream.peer, reason, stream.bytes_to_peer,
                           stream.bytes_from_peer)

    def on_stream_failed(self, stream: Any, code: int, text: str) -> None:
        """The peer's CLOSE said why the stream failed (a reason code and text)."""
        from ..wire.frames import close_reason_name
        self.link.log.info("%s: client %d (%s) closed by peer: %s%s", self.link.name, stream.id,
                           stream.peer, close_reason_name(code), ": " + text if text else "")

    def on_stream_refused(self, stream: Any) -> None:
        """A stream could not start (no thread for it)."""

    def silent_close(self, reset: bool) -> Optional[str]:
        """The reason when the peer hung up without ever sending a byte; None: the
        link's own."""
        return None

    def eof_reason(self, default: str) -> str:
        """The reason for an EOF on the uplink that is no silent close."""
        return default

    def on_teardown(self) -> None:
        """The uplink ends: give back what the role holds (before its streams go)."""

    def log_closed(self) -> None:
        self.link.log.log(logging.INFO, "%s: uplink closed: %s", self.link.name,
                          self.link.end_reason or "stopped")
