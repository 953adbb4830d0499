"""ServerLink: the server's uplink: LISTEN opens the host port, a stream per accepted client."""

import logging
import socket
import struct
import time
from typing import TYPE_CHECKING, Any, List, Optional

from ..addr import format_hostport, source_key
from ..engine.link import LimitedLog, Link
from ..engine.pump import Stream
from ..engine.sockets import accept_nowait, tune_stream_socket
from ..wire import frames as protocol
from .ids import MAX_CLIENTS, ClientIds

if TYPE_CHECKING:  # pragma: no cover
    from .app import ServerApp

# A held id's grace: a floor for the device's own delay in reading our CLOSE,
# plus this many smoothed round trips of the uplink.
GRACE_FLOOR = 0.05
GRACE_RTTS = 4


class ServerLink(Link):
    role = "server"

    def __init__(self, sock: socket.socket, settings: Any, name: str, app: "ServerApp",
                 host: str = ""):
        super().__init__(sock, settings, name)
        self.app = app
        self.host = host                   # the source address, for allow_from
        self.source = source_key(host)     # what per-source limits count
        self.noisy = app.uplink_log.of(self.source)
        self.evicted = False
        self.listening = False
        self.host_sock: Optional[socket.socket] = None
        self.ids = ClientIds(settings.id_quarantine)
        self._accept_paused = False
        self.refusals = LimitedLog(self.log)
        self.connect_payload = protocol.encode_connect_payload(settings.connect_address,
                                                               settings.connect_port)
        self._listen_timer = None

    def on_start(self) -> None:
        self._listen_timer = self.loop.call_later(self.settings.listen_timeout, self._no_listen)

    def _no_listen(self) -> None:
        if not self.listening:
            self.fail("no LISTEN within %.1f s" % self.settings.listen_timeout)

    def evict(self, reason: str) -> None:
        """Thread-safe: drop this uplink unless its LISTEN got in first."""
        def drop() -> None:
            if not self.listening:
                self.evicted = True
                self.fail(reason)
        self.loop.call_soon(drop)

    def log_closed(self) -> None:
        level = logging.WARNING if self.evicted else logging.INFO
        self.app.uplink_log.log(self.source, level, "%s: uplink closed: %s",
                                self.name, self.end_reason or "stopped")

    def on_listen(self, client_id: int, payload: memoryview) -> None:
        if self.listening:
            self.noisy.warning("%s: repeated LISTEN ignored", self.name)
            return
        self.listening = True
        self._listen_timer.cancel()
        self.app.listened(self)
        try:
            self.host_sock = self.app.claim_host(self)
        except OSError as exc:
            self.fail("cannot open host port %s: %s" % (self.settings.host, exc.strerror or exc))
            return
        if self.host_sock is None:
            self.fail("host port %s belongs to a live uplink (takeover = false)" % self.settings.host)
            return
        self.loop.set_handlers(self.host_sock, self._accept, None)
        self.app.uplink_log.info(self.source, "%s: LISTEN: clients accepted on %s", self.name,
                                 format_hostport(*self.host_sock.getsockname()[:2]))

    def _before_listen(self, what: str) -> bool:
        if self.listening:
            return False
        self.fail("%s before LISTEN: not a tcprc device" % what)
        return True

    def on_connect(self, client_id: int, payload: memoryview) -> None:
        if not self._before_listen("CONNECT"):
            super().on_connect(client_id, payload)

    def on_unknown_data(self, client_id: int, payloads: List[memoryview]) -> None:
        # Late DATA for a client this side closed: the device gets our CLOSE anyway.
        if not self._before_listen("DATA"):
            self.log.debug("%s: DATA for unknown client %d dropped%s", self.name, client_id,
                           " (held until the device's CLOSE)" if self.ids.is_held(client_id) else "")

    # ---- ids this side closed: held until the device's CLOSE ---------------------
    def on_unknown_close(self, client_id: int) -> None:
        if self.ids.answer(client_id):
            self.log.debug("%s: CLOSE for client %d answers ours: the id is free", self.name, client_id)
        else:
            super().on_unknown_close(client_id)

    def on_close_answered(self, client_id: int) -> None:
        self.ids.answer(client_id, closing=True)

    def pump_exited(self, stream: Stream, reason: str) -> None:
        ours = self.streams.get(stream.id) is stream   # still listed: its pump sent CLOSE
        super().pump_exited(stream, reason)
        if ours:
            self.ids.hold(stream.id, time.monotonic(), self._grace())

    def close_stream(self, stream: Stream, reason: str, notify_peer: bool = True) -> None:
        ours = notify_peer and self.streams.get(stream.id) is stream
        super().close_stream(stream, reason, notify_peer)
        if ours:
            self.ids.hold(stream.id, time.monotonic(), self._grace())

    def _grace(self) -> float:
        """How long DATA the device sent before it read our CLOSE may still arrive."""
        info = self.transport.tcp_info(104)
        try:
            rtt = struct.unpack_from("=I", info, 68)[0] / 1e6   # tcpi_rtt, microseconds
        except (TypeError, struct.error):
            rtt = 0.0
        return GRACE_FLOOR + GRACE_RTTS * rtt

    def _resume_accept(self) -> None:
        self._accept_paused = False
        if self.host_sock is not None and not self.end_reason:
            self.loop.set_handlers(self.host_sock, self._accept, None)

    def _accept(self) -> None:
        client_id = self.ids.allocate(self.streams)
        if client_id is None and self.ids.wait:
            # Clients wait in the backlog until the first id's grace ends.
            if not self._accept_paused:
                self._accept_paused = True
                self.loop.forget(self.host_sock)
                self.loop.call_later(self.ids.wait, self._resume_accept)
            return
        try:
            accepted = accept_nowait(self.host_sock)
        except OSError as exc:
            self.refusals.warning("%s: accept failed: %s", self.name, exc.strerror or exc)
            return
        if accepted is None:
            return
        client, peer = accepted
        who = format_hostport(*peer[:2])
        if client_id is None:
            held = self.ids.held_count()
            self.refusals.warning("%s: refused client %s: all %d client ids of this tunnel are in use%s",
                                  self.name, who, MAX_CLIENTS,
                                  " (%d closed, awaiting the device's CLOSE)" % held if held else "")
            client.close()
            return
        tune_stream_socket(client)
        stream = Stream(client_id, who)
        stream.sock = client
        self.log.info("%s: client %d (%s) connected", self.name, client_id, who)
        # CONNECT is queued before the pump starts, so it precedes the client's DATA.
        self.post(protocol.CONNECT, client_id, self.connect_payload)
        self.open_stream(stream)

    def on_teardown(self) -> None:
        if self.host_sock is not None:
            self.loop.forget(self.host_sock)
            self.host_sock.close()
            self.host_sock = None
        self.app.release_host(self)
