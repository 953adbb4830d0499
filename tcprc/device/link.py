"""DeviceLink: the device's uplink: LISTEN first, a stream per CONNECT, early DATA held.

Early DATA: the Java server starts reading a new client before it writes
that client's CONNECT, so a client that speaks first can have DATA on the
uplink ahead of its CONNECT.  DATA for an id never seen is held (bounded)
and handed to the stream when the CONNECT comes; only when none comes is
it dropped and answered with one CLOSE.  An id this side closed stays quiet
for a while: its late DATA is dropped without another CLOSE, and if that
CLOSE refused early DATA, a CONNECT that was already in flight for it is
stale and opens nothing (the Java server answers our CLOSE with its own,
which ends the quiet time; a tcprc server does not, hence the bound).
"""

import socket
import time
from typing import Any, Dict, List, Optional, Set, Tuple

from ..addr import format_hostport
from ..engine.link import Link
from ..engine.pump import REFUSED, Stream
from ..wire import frames as protocol
from .policy import TargetPolicy

HostPort = Tuple[str, int]

# Early DATA is held this long for its CONNECT (the Java server writes it a
# moment after the DATA), and at most this much per id and in all.  The
# wait only runs while the uplink is read: a paused link has not yet read
# the CONNECT.
EARLY_WAIT = 2.0
EARLY_PER_ID = 64 * 1024
EARLY_TOTAL = 256 * 1024
# How long an id closed here stays quiet without the server's CLOSE for it.
QUIET = 10.0
# A server that hangs up this soon after LISTEN, having sent nothing, refused us.
REFUSED_WITHIN = 10.0


class DeviceLink(Link):
    role = "device"

    def __init__(self, sock: socket.socket, settings: Any, name: str,
                 target: HostPort, allowed: Set[HostPort]):
        super().__init__(sock, settings, name)
        self.policy = TargetPolicy(target, allowed)
        # Per client id, so at most 256 entries each; cleared at teardown.
        self._early: Dict[int, List[Any]] = {}         # id -> [bytearray, deadline]
        self._early_bytes = 0
        self._early_sweep_armed = False
        self._quiet: Dict[int, Tuple[float, bool]] = {}  # id -> (closed at, refused early DATA)
        self.refused = False

    def on_start(self) -> None:
        self.post(protocol.LISTEN, 0)

    def on_teardown(self) -> None:
        self._early.clear()
        self._early_bytes = 0
        self._quiet.clear()

    def on_silent_close(self) -> str:
        up = time.monotonic() - self.started
        if up >= REFUSED_WITHIN:
            return super().on_silent_close()
        # A legacy server has nothing to say before a client comes; closing
        # at once is how a server turns a device away.
        self.refused = True
        return ("refused by the server: it closed the uplink %.1f s after LISTEN, before any "
                "frame (another device may hold its tunnel, or this one is not let in)" % up)

    def on_connect(self, client_id: int, payload: memoryview) -> None:
        early = self._take_early(client_id)
        if early is None:
            return
        old = self.streams.get(client_id)
        if old is not None:
            # Legacy rule: a CONNECT on a busy id replaces the stream, silently.
            self.close_stream(old, "replaced by a new CONNECT", notify_peer=False)
        try:
            address, port = protocol.decode_connect_payload(payload)
        except protocol.ProtocolError as exc:
            self.noisy.warning("%s: refused client %d: %s", self.name, client_id, exc)
            self.post(protocol.CLOSE, client_id)
            return
        direct = self.policy.direct(address, port)
        if direct is None:
            # Needs name lookups: the pump thread does them, never this one.
            stream = Stream(client_id, format_hostport(address, port))
            self._give_early(stream, early)
            self.open_stream(stream, connect_to=lambda: self._dial_checked(client_id, address, port))
            return
        peer = format_hostport(*direct)
        self.log.info("%s: client %d: connecting to %s", self.name, client_id, peer)
        stream = Stream(client_id, peer)
        self._give_early(stream, early)
        self.open_stream(stream, connect_to=direct + (self.settings.connect_timeout,))

    def _dial_checked(self, client_id: int, address: str, port: int) -> socket.socket:
        """Pump thread: dial what the policy allows, with its log line for this client."""
        def said(what: str) -> None:
            self.log.info("%s: client %d: %s", self.name, client_id, what)
        return self.policy.dial(address, port, self.settings.connect_timeout, said)

    def on_stream_closed(self, stream: Stream, reason: str) -> None:
        if reason.startswith(REFUSED):   # rate-limited: the server picks what it names
            self.noisy.warning("%s: refused client %d: %s", self.name, stream.id,
                               reason[len(REFUSED):])
        else:
            super().on_stream_closed(stream, reason)

    # ---- DATA before CONNECT, and ids closed here -----------------------------------
    def _take_early(self, client_id: int) -> Optional[bytearray]:
        """On CONNECT: the DATA held for `client_id` (maybe empty); None if the CONNECT is stale."""
        quiet = self._quiet.pop(client_id, None)
        if quiet is not None and quiet[1] and time.monotonic() - quiet[0] < QUIET:
            # Sent before the server saw our CLOSE: its client is gone already.
            self._quiet[client_id] = quiet
            self.log.debug("%s: stale CONNECT for client %d (refused before, no CLOSE from "
                           "the server yet): ignored", self.name, client_id)
            return None
        return self._drop_early(client_id) or bytearray()

    def _give_early(self, stream: Stream, early: bytearray) -> None:
        # Queued ahead of any later DATA; written once the connect completes (stream_connected).
        if early:
            stream.queue(memoryview(early))
            stream.bytes_from_peer += len(early)
            self.bytes_from_peer += len(early)

    def on_unknown_data(self, client_id: int, payloads: List[memoryview]) -> None:
        quiet = self._quiet.get(client_id)
        if quiet is not None:
            if time.monotonic() - quiet[0] < QUIET:
                return   # late DATA for an id closed here: it has its CLOSE
            del self._quiet[client_id]
        size = sum(map(len, payloads))
        entry = self._early.get(client_id)
        held = len(entry[0]) if entry is not None else 0
        if held + size > EARLY_PER_ID or self._early_bytes + size > EARLY_TOTAL:
            self._refuse_early(client_id, "more DATA before its CONNECT than the device holds")
            return
        if entry is None:
            entry = self._early[client_id] = [bytearray(), time.monotonic() + EARLY_WAIT]
            self._arm_early_sweep(EARLY_WAIT)
        for payload in payloads:
            entry[0] += payload
        self._early_bytes += size

    def _drop_early(self, client_id: int) -> Optional[bytearray]:
        entry = self._early.pop(client_id, None)
        if entry is None:
            return None
        self._early_bytes -= len(entry[0])
        return entry[0]

    def _refuse_early(self, client_id: int, why: str) -> None:
        self._drop_early(client_id)
        self.noisy.warning("%s: client %d: %s: answered CLOSE", self.name, client_id, why)
        self.post(protocol.CLOSE, client_id)
        self._quiet[client_id] = (time.monotonic(), True)

    def _arm_early_sweep(self, delay: float) -> None:
        # One timer for all held ids: a timer per hold would pile up in the
        # loop's heap when a server holds and closes ids in a fast cycle.
        if not self._early_sweep_armed:
            self._early_sweep_armed = True
            self.loop.call_later(delay, self._early_sweep)

    def _early_sweep(self) -> None:
        self._early_sweep_armed = False
        if not self._early:
            return
        now = time.monotonic()
        if self._paused or self._control_full:
            # Not reading: the CONNECT may be waiting unread; give it time after reading resumes.
            for entry in self._early.values():
                entry[1] = max(entry[1], now + EARLY_WAIT / 4)
        else:
            for client_id in [c for c, entry in self._early.items() if entry[1] <= now]:
                self._refuse_early(client_id, "DATA with no CONNECT for %g s" % EARLY_WAIT)
        if self._early:
            self._arm_early_sweep(max(0.01, min(e[1] for e in self._early.values()) - now))

    def post(self, command: int, client_id: int, payload: bytes = b"") -> None:
        if command == protocol.CLOSE:
            self._quiet[client_id] = (time.monotonic(), False)
        super().post(command, client_id, payload)

    def pump_exited(self, stream: Stream, reason: str) -> None:
        if self.streams.get(stream.id) is stream:
            self._quiet[stream.id] = (time.monotonic(), False)   # its pump sent the CLOSE
        super().pump_exited(stream, reason)

    def _on_close(self, client_id: int, payload: memoryview) -> None:
        # The server's CLOSE ends the quiet time, and any wait for a CONNECT.
        self._quiet.pop(client_id, None)
        self._drop_early(client_id)
        super()._on_close(client_id, payload)
