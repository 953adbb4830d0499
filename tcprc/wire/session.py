"""The protocol rules of one uplink, without I/O: events in, actions out (as h11 does).

The link owns the sockets, the stream table and the DATA fast path; at every
point where the legacy protocol has a rule it asks its session, which returns
a list of actions for the link to carry out, in order:

    (SEND, command, client id, payload)   queue a control frame for the peer
    (OPEN, client id, address, port, early bytes)   device: dial, start a stream
    (REPLACE, client id)    drop the stream on this id without a CLOSE
    (LISTENED,)             server: the device's first LISTEN; open the host port
    (FAIL, reason)          end the uplink
    (WARN, message) / (DEBUG, message)   one log line about this uplink

Rules kept here: at most one CLOSE per id from this side (the link's
`closed_here` calls and the session's own refusals), LISTEN first (server),
a CONNECT on a busy id replaces its stream (device), the answer to DATA or
CLOSE for an id with no stream, the device's early-DATA hold and quiet ids,
and the server's id quarantine.  Times are the caller's (`now`, monotonic
seconds), so a test drives them.  The next protocol's handshake and credit
logic belong here too.
"""

from typing import Any, Callable, Dict, List, Optional, Tuple

from . import frames

SEND, OPEN, REPLACE, LISTENED, FAIL, WARN, DEBUG = (
    "send", "open", "replace", "listened", "fail", "warn", "debug")
Action = Tuple[Any, ...]
NONE: List[Action] = []   # shared and never appended to: the common answer costs nothing

# Device: early DATA is held this long for its CONNECT (the Java server
# writes it a moment after the DATA), and at most this much per id and in
# all.  The wait only runs while the uplink is read: a paused link has not
# yet read the CONNECT.
EARLY_WAIT = 2.0
EARLY_PER_ID = 64 * 1024
EARLY_TOTAL = 256 * 1024
# Device: how long an id closed here stays quiet without the server's CLOSE for it.
QUIET = 10.0
# Server: a held id's grace: a floor for the device's own delay in reading
# our CLOSE, plus this many smoothed round trips of the uplink.
GRACE_FLOOR = 0.05
GRACE_RTTS = 4


class Session:
    """Rules both sides share; the link thread is its only caller."""

    def start(self, now: float) -> List[Action]:
        """The uplink is up."""
        return NONE

    def frame(self, command: int, client_id: int, payload: Any, open_ids: Any,
              now: float) -> List[Action]:
        """Any frame but DATA for an open stream (the link delivers that itself).

        `open_ids`: the ids with a stream here (a dict or set).  A CLOSE for
        an open id is the link's to carry out; it calls peer_close() too.
        """
        if command == frames.DATA:
            return self.unknown_data(client_id, [payload], now)
        if command == frames.CONNECT:
            return self.connect(client_id, payload, client_id in open_ids, now)
        if command == frames.CLOSE:
            return self.peer_close(client_id, client_id in open_ids, False, now)
        if command == frames.LISTEN:
            return self.listen()
        return [(WARN, "skipped unknown command %d for client %d (%d payload bytes)"
                 % (command, client_id, len(payload)))]

    def connect(self, client_id: int, payload: Any, busy: bool, now: float) -> List[Action]:
        return [(WARN, "ignored CONNECT for client %d: not expected on this side" % client_id)]

    def listen(self) -> List[Action]:
        return [(WARN, "ignored LISTEN: not expected on this side")]

    def unknown_data(self, client_id: int, payloads: List[Any], now: float) -> List[Action]:
        """DATA frames in a row for an id with no stream; the views die with this call."""
        return NONE

    def peer_close(self, client_id: int, known: bool, answered: bool, now: float) -> List[Action]:
        """The peer's CLOSE.  `known`: a stream is open on the id; `answered`:
        this side had closed it already (the peer's CLOSE crossed ours)."""
        if known:
            return NONE
        return [(DEBUG, "CLOSE for unknown client %d ignored" % client_id)]

    def closed_here(self, client_id: int, now: float) -> None:
        """This side ended the stream on `client_id` and its CLOSE is on the way."""

    def next_deadline(self) -> Optional[float]:
        """When expire() has work to do; None: nothing waits."""
        return None

    def expire(self, now: float, reading: bool) -> List[Action]:
        """Timers: `reading` False while the link does not read the uplink."""
        return NONE

    def reset(self) -> None:
        """The uplink ended: forget everything per id."""


class DeviceSession(Session):
    """The device's rules: LISTEN first from here, streams opened on CONNECT.

    Early DATA: the Java server starts reading a new client before it writes
    that client's CONNECT, so a client that speaks first can have DATA on the
    uplink ahead of its CONNECT.  DATA for an id never seen is held (bounded)
    and handed to the stream when the CONNECT comes; only when none comes is
    it dropped and answered with one CLOSE.  An id this side closed stays
    quiet for a while: its late DATA is dropped without another CLOSE, and if
    that CLOSE refused early DATA, a CONNECT that was already in flight for
    it is stale and opens nothing (the Java server answers our CLOSE with its
    own, which ends the quiet time; a tcprc server does not, hence the bound).
    """

    def __init__(self) -> None:
        # Per client id, so at most 256 entries each; cleared by reset().
        self._early: Dict[int, List[Any]] = {}          # id -> [bytearray, deadline]
        self._early_bytes = 0
        self._quiet: Dict[int, Tuple[float, bool]] = {}  # id -> (closed at, refused early DATA)

    def start(self, now: float) -> List[Action]:
        return [(SEND, frames.LISTEN, 0, b"")]

    def connect(self, client_id: int, payload: Any, busy: bool, now: float) -> List[Action]:
        quiet = self._quiet.pop(client_id, None)
        if quiet is not None and quiet[1] and now - quiet[0] < QUIET:
            # Sent before the server saw our CLOSE: its client is gone already.
            self._quiet[client_id] = quiet
            return [(DEBUG, "stale CONNECT for client %d (refused before, no CLOSE from "
                     "the server yet): ignored" % client_id)]
        early = self._drop_early(client_id) or bytearray()
        # Legacy rule: a CONNECT on a busy id replaces the stream, silently.
        actions: List[Action] = [(REPLACE, client_id)] if busy else []
        try:
            address, port = frames.decode_connect_payload(payload)
        except frames.ProtocolError as exc:
            actions.append((WARN, "refused client %d: %s" % (client_id, exc)))
            actions.append(self._close(client_id, now, False))
            return actions
        actions.append((OPEN, client_id, address, port, early))
        return actions

    def unknown_data(self, client_id: int, payloads: List[Any], now: float) -> List[Action]:
        quiet = self._quiet.get(client_id)
        if quiet is not None:
            if now - quiet[0] < QUIET:
                return NONE   # late DATA for an id closed here: it has its CLOSE
            del self._quiet[client_id]
        size = sum(map(len, payloads))
        entry = self._early.get(client_id)
        held = len(entry[0]) if entry is not None else 0
        if held + size > EARLY_PER_ID or self._early_bytes + size > EARLY_TOTAL:
            return self._refuse_early(client_id, now,
                                      "more DATA before its CONNECT than the device holds")
        if entry is None:
            entry = self._early[client_id] = [bytearray(), now + EARLY_WAIT]
        for payload in payloads:
            entry[0] += payload
        self._early_bytes += size
        return NONE

    def peer_close(self, client_id: int, known: bool, answered: bool, now: float) -> List[Action]:
        # The server's CLOSE ends the quiet time, and any wait for a CONNECT.
        self._quiet.pop(client_id, None)
        self._drop_early(client_id)
        return Session.peer_close(self, client_id, known, answered, now)

    def closed_here(self, client_id: int, now: float) -> None:
        self._quiet[client_id] = (now, False)

    def next_deadline(self) -> Optional[float]:
        if not self._early:
            return None
        return min(entry[1] for entry in self._early.values())

    def expire(self, now: float, reading: bool) -> List[Action]:
        if not reading:
            # Not reading: the CONNECT may be waiting unread; give it time after reading resumes.
            for entry in self._early.values():
                entry[1] = max(entry[1], now + EARLY_WAIT / 4)
            return NONE
        actions: List[Action] = []
        for client_id in [c for c, entry in self._early.items() if entry[1] <= now]:
            actions.extend(self._refuse_early(client_id, now,
                                              "DATA with no CONNECT for %g s" % EARLY_WAIT))
        return actions

    def reset(self) -> None:
        self._early.clear()
        self._early_bytes = 0
        self._quiet.clear()

    def held_bytes(self) -> int:
        return self._early_bytes

    def _close(self, client_id: int, now: float, refused: bool) -> Action:
        self._quiet[client_id] = (now, refused)
        return (SEND, frames.CLOSE, client_id, b"")

    def _drop_early(self, client_id: int) -> Optional[bytearray]:
        entry = self._early.pop(client_id, None)
        if entry is None:
            return None
        self._early_bytes -= len(entry[0])
        return entry[0]

    def _refuse_early(self, client_id: int, now: float, why: str) -> List[Action]:
        self._drop_early(client_id)
        return [(WARN, "client %d: %s: answered CLOSE" % (client_id, why)),
                self._close(client_id, now, True)]


class ServerSession(Session):
    """The server's rules: the device's LISTEN first, then CONNECT per accepted client.

    `ids` is the tunnel's client-id allocator with its quarantine (an
    engine-free object: server.ids.ClientIds); `rtt()` gives the uplink's
    smoothed round trip in seconds (0.0 when unknown), for the grace a held
    id gets.
    """

    def __init__(self, ids: Any, connect_payload: bytes,
                 rtt: Callable[[], float] = lambda: 0.0) -> None:
        self.ids = ids
        self.connect_payload = connect_payload
        self.listening = False
        self._rtt = rtt

    def listen(self) -> List[Action]:
        if self.listening:
            return [(WARN, "repeated LISTEN ignored")]
        self.listening = True
        return [(LISTENED,)]

    def _before_listen(self, what: str) -> Optional[List[Action]]:
        if self.listening:
            return None
        return [(FAIL, "%s before LISTEN: not a tcprc device" % what)]

    def connect(self, client_id: int, payload: Any, busy: bool, now: float) -> List[Action]:
        return self._before_listen("CONNECT") or Session.connect(self, client_id, payload, busy, now)

    def unknown_data(self, client_id: int, payloads: List[Any], now: float) -> List[Action]:
        # Late DATA for a client this side closed: the device gets our CLOSE anyway.
        return self._before_listen("DATA") or [
            (DEBUG, "DATA for unknown client %d dropped%s" % (
                client_id, " (held until the device's CLOSE)" if self.ids.is_held(client_id) else ""))]

    def peer_close(self, client_id: int, known: bool, answered: bool, now: float) -> List[Action]:
        if known:
            if answered:
                self.ids.answer(client_id, closing=True)
            return NONE
        if self.ids.answer(client_id):
            return [(DEBUG, "CLOSE for client %d answers ours: the id is free" % client_id)]
        return Session.peer_close(self, client_id, known, answered, now)

    def open(self, open_ids: Any, now: float) -> Tuple[Optional[int], List[Action]]:
        """A client is waiting to be accepted: its id and the CONNECT that announces it,
        or (None, []) with `ids.wait` saying how long to wait (0.0: refuse it)."""
        client_id = self.ids.allocate(open_ids, now)
        if client_id is None:
            return None, NONE
        return client_id, [(SEND, frames.CONNECT, client_id, self.connect_payload)]

    def closed_here(self, client_id: int, now: float) -> None:
        self.ids.hold(client_id, now, GRACE_FLOOR + GRACE_RTTS * self._rtt())
