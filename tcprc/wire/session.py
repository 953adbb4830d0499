"""The protocol of one uplink, without I/O: events in, typed actions out (as h11 does).

Both roles, legacy and version 2.  The driver (engine.link) owns the sockets,
the threads and the stream table; it reports every event here and carries
out the actions (wire.actions) answered, in order:

  events (method calls; an object per event would cost an allocation on the
  DATA fast path):
    start(now)                           the uplink is up
    frame(command, id, payload, streams, now)   any frame but DATA for an open
                                         stream (`streams`: id -> an object with
                                         `rules`, a wire.streams.StreamRules)
    unknown_data(id, payloads, now)      DATA for an id with no stream
    peer_closed(rules, answered, now)    the driver took a PeerClosed: its answer
    closed_here(id, now)                 this side ended a stream; its CLOSE is on the way
    expire(now, reading)                 a timer of next_deadline() is over
    tick(now, last_heard)                a heartbeat is due (version 2)
  a stream's own events (received, delivered, local EOF, local error) go
  to its rules (wire.streams), made by new_stream().

Rules kept here: at most one CLOSE per id from this side, LISTEN first
(server), a CONNECT on a busy id replaces its stream (device), the answer to
DATA or CLOSE for an id with no stream, the device's early-DATA hold and
quiet ids, the server's id quarantine, the negotiation and handshake of
version 2 (wire.handshake checks the proofs), its stream frames (CREDIT,
EOF, CLOSE with reasons, every CLOSE answered: wire.streams) and its
heartbeats (wire.heartbeat).  States move only along wire.states' tables.
Times are the caller's (`now`, monotonic seconds), so a test drives them.

The role is the session object handed to the link: a DeviceSession or a
ServerSession (wire.server_session: a device never loads it), each the one
place of its side's rules.
"""

from typing import Any, Dict, List, Optional, Tuple

from . import frames
from .actions import (DEBUG, WARNING, CloseStream, DropStream, Fail, Grant, Log, OpenLocal,
                      PeerClosed, PeerEof, Send, Upgraded)
from .heartbeat import Heartbeat
from .states import SessionEvent as Ev
from .states import SessionState, session_next
from .streams import GrowthBudget, StreamRules, V2StreamRules

Action = Any
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
# Server: the longest its CHALLENGE may wait after failed handshakes of the
# same id from the same address (its throttle); a device's handshake
# deadline includes it, so a good device is never timed out by it.
MAX_CHALLENGE_HOLD = 30.0
# Server: how long after its OFFER a device that says nothing is taken as
# legacy: a tcprc device answers at once, so a few round trips, but at least
# a second: a relay or a proxy in the path hides the real round trip from the
# uplink's TCP_INFO (a HELLO even later still counts until a client came).
HELLO_WAIT_FLOOR = 1.0
HELLO_WAIT_RTTS = 4
HELLO_WAIT_CAP = 3.0

_HANDSHAKE = (frames.OFFER, frames.HELLO, frames.CHALLENGE, frames.AUTH, frames.WELCOME,
              frames.REJECT)
_V2_STREAM = (frames.CREDIT, frames.EOF, frames.PING, frames.PONG)
_ESTABLISHED = (SessionState.LEGACY, SessionState.V2)

L = SessionState


class Session:
    """What both roles share: frame dispatch, version 2's stream frames and
    heartbeats, the rules of new streams.  The link thread is its only caller."""

    role = ""
    window = 0          # v2: each stream's receive window, announced in the handshake
    v2 = False          # v2 negotiated
    state = L.LISTEN
    heartbeat: Optional[Heartbeat] = None
    _budget: Optional[GrowthBudget] = None
    _peer_window = 0

    def _go(self, event: Ev) -> None:
        self.state = session_next(self.role, self.state, event)

    @property
    def established(self) -> bool:
        """Clients may come: a legacy session, or v2 past its welcome."""
        return self.state is L.LEGACY or self.state is L.V2

    def upgraded(self, peer_window: int, detail: str, heartbeat: Tuple[float, float]) -> Upgraded:
        """Version 2 from now on: the streams' budget, the heartbeat."""
        self.v2 = True
        self._peer_window = peer_window
        self._budget = GrowthBudget(self.window)
        self.heartbeat = Heartbeat(*heartbeat)
        return Upgraded(peer_window, detail)

    def new_stream(self, client_id: int) -> StreamRules:
        """The rules of a stream opened now (version 2's once negotiated)."""
        if self.v2:
            return V2StreamRules(client_id, self._budget, self._peer_window)
        return StreamRules(client_id)

    def grown(self) -> int:
        """Bytes of window grown beyond the configured windows, all streams."""
        return self._budget.grown if self._budget is not None else 0

    # ---- events ------------------------------------------------------------------------------
    def start(self, now: float) -> List[Action]:
        """The uplink is up."""
        return NONE

    def frame(self, command: int, client_id: int, payload: Any, streams: Dict[int, Any],
              now: float) -> List[Action]:
        """Any frame but DATA for an open stream (the link delivers that itself)."""
        if command == frames.DATA:
            return self.unknown_data(client_id, [payload], now)
        if command == frames.CONNECT:
            return self.connect(client_id, payload, client_id in streams, now)
        if command == frames.CLOSE:
            stream = streams.get(client_id)
            if stream is not None:
                code, text = stream.rules.on_close(payload)
                return [PeerClosed(client_id, code, text, False)]
            return self.peer_close(client_id, False, False, now)
        if command == frames.LISTEN:
            return self.listen(now)
        if command in _HANDSHAKE:
            return self.handshake(command, payload, now)
        if self.v2 and command in _V2_STREAM:
            return self._v2_frame(command, client_id, payload, streams.get(client_id), now)
        return [Log(WARNING, "skipped unknown command %d for client %d (%d payload bytes)"
                    % (command, client_id, len(payload)))]

    def _v2_frame(self, command: int, client_id: int, payload: Any, stream: Any,
                  now: float) -> List[Action]:
        if command == frames.PING:
            return self.heartbeat.on_ping(payload)
        if command == frames.PONG:
            return self.heartbeat.on_pong(payload, now)
        if stream is None:
            return NONE   # crossed our CLOSE
        rules = stream.rules
        if command == frames.CREDIT:
            try:
                amount = rules.on_credit(payload)
            except frames.ProtocolError as exc:
                return [CloseStream(client_id, "bad CREDIT: %s" % exc, frames.CLOSE_ERROR, "")]
            return [Grant(client_id, amount)] if amount else NONE
        already = rules.peer_eof
        problem = rules.on_eof(payload)
        if problem:
            return [CloseStream(client_id, problem, frames.CLOSE_ERROR, "")]
        return [PeerEof(client_id)] if rules.peer_eof and not already else NONE

    def peer_closed(self, rules: StreamRules, answered: bool, now: float) -> List[Action]:
        """The driver carried out a PeerClosed (`answered`: our CLOSE had gone out
        already): the answer the rules want, and the id's bookkeeping."""
        actions = self.peer_close(rules.client_id, True, answered, now)
        if rules.answers_close and not answered:
            return [Send(frames.CLOSE, rules.client_id, b"")] + actions   # every CLOSE answered
        return actions

    def close_frame(self, rules: StreamRules, code: int, text: str) -> Send:
        """Our CLOSE for a stream, with its reason where the rules carry one."""
        return Send(frames.CLOSE, rules.client_id, rules.close_payload(code, text))

    def tick(self, now: float, last_heard: float) -> Tuple[List[Action], float]:
        """Heartbeat (version 2): (actions, seconds until the next tick)."""
        return self.heartbeat.tick(now, last_heard)

    @property
    def rtt(self) -> Optional[float]:
        return self.heartbeat.rtt if self.heartbeat is not None else None

    # ---- the role's parts ------------------------------------------------------------------
    def handshake(self, command: int, payload: Any, now: float) -> List[Action]:
        """A handshake frame (OFFER..REJECT)."""
        return [Log(WARNING, "skipped %s: not expected on this side"
                    % frames.COMMAND_NAMES.get(command, command))]

    def connect(self, client_id: int, payload: Any, busy: bool, now: float) -> List[Action]:
        return [Log(WARNING, "ignored CONNECT for client %d: not expected on this side"
                    % client_id)]

    def listen(self, now: float) -> List[Action]:
        return [Log(WARNING, "ignored LISTEN: not expected on this side")]

    def unknown_data(self, client_id: int, payloads: List[Any], now: float) -> List[Action]:
        """DATA frames in a row for an id with no stream; the views die with this call."""
        return NONE

    def peer_close(self, client_id: int, known: bool, answered: bool, now: float) -> List[Action]:
        """The peer's CLOSE.  `known`: a stream was open on the id; `answered`:
        this side had closed it already (the peer's CLOSE crossed ours)."""
        if known:
            return NONE
        return [Log(DEBUG, "CLOSE for unknown client %d ignored" % client_id)]

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

    role = "device"

    def __init__(self, protocol: str = "auto", device_id: str = "", secret: Optional[bytes] = None,
                 window: int = 256 * 1024, strict: bool = False, offer_wait: float = 10.0,
                 heartbeat: Tuple[float, float] = (15.0, 45.0)) -> None:
        # Per client id, so at most 256 entries each; cleared by reset().
        self._early: Dict[int, List[Any]] = {}          # id -> [bytearray, deadline]
        self._early_bytes = 0
        self._quiet: Dict[int, Tuple[float, bool]] = {}  # id -> (closed at, refused early DATA)
        # v2: "auto" answers an OFFER; "legacy" never does; `strict` (v2, or
        # credentials or TLS configured) never falls back to legacy.
        self.protocol = protocol
        self.device_id = device_id
        self._secret = secret
        self.window = window
        self.strict = strict or protocol == "v2"
        self._offer_wait = offer_wait
        self._heartbeat = heartbeat
        self._offer_deadline: Optional[float] = None
        self.state = L.LISTEN
        self._handshake: Any = None
        self.rejected = ""             # the server's REJECT, for the app's last error
        self._ignored_offer = False    # protocol "legacy" ignored a v2 server's OFFER

    def start(self, now: float) -> List[Action]:
        if self.strict:
            self._offer_deadline = now + self._offer_wait
        return [Send(frames.LISTEN, 0, b"")]

    def _stream_frame(self, name: str) -> Optional[List[Action]]:
        """A CONNECT, DATA or CLOSE came: before any OFFER it tells a legacy
        server.  None: go on with the frame; else what to do instead."""
        if self.state is L.LISTEN:
            if self.strict:
                self._go(Ev.REFUSE_LEGACY)
                return [Fail("the server speaks only the legacy protocol (it sent %s without "
                             "an OFFER): refusing to fall back, %s" % (name, self._why_strict()))]
            self._go(Ev.LEGACY_FRAME)
            self._offer_deadline = None
        elif self.state is L.HELLO:
            self._go(Ev.HANDSHAKE_FAILED)
            return [Fail("%s during the v2 handshake" % name)]
        return None

    def _handshake_wait(self) -> float:
        """How long the handshake may take after the OFFER: connect_timeout, and for
        a device with an id (only ids are ever held) the longest hold of its CHALLENGE."""
        return self._offer_wait + (MAX_CHALLENGE_HOLD if self.device_id else 0.0)

    def _why_strict(self) -> str:
        if self.protocol == "v2":
            return "[device] protocol = \"v2\""
        return "this device has credentials or TLS configured"

    def handshake(self, command: int, payload: Any, now: float) -> List[Action]:
        if command == frames.OFFER:
            if self.protocol == "legacy":
                self._ignored_offer = True
                return [Log(DEBUG, "OFFER of protocol v2 ignored: [device] protocol = \"legacy\"")]
            if self.state is L.HELLO:   # a server that offers twice is broken: no waiting on it
                self._go(Ev.HANDSHAKE_FAILED)
                return [Send(frames.REJECT, 0, frames.encode_reject(
                            frames.REJECT_MALFORMED, "OFFER out of order")),
                        Fail("v2 handshake failed: a second OFFER during the handshake")]
            if self.state is not L.LISTEN or len(payload):
                return [Log(WARNING, "unexpected OFFER ignored")]
            from .handshake import DeviceHandshake
            self._handshake = DeviceHandshake(self.device_id, self._secret, self.window)
            self._go(Ev.OFFER)
            # A bound for the rest of the handshake: a server gone quiet now (or
            # a path that black-holes, TCP still up) must not hold the uplink.
            # For an id it includes the longest a server may hold its CHALLENGE
            # after failures of that id from this address (someone else's,
            # perhaps): a good device waits, it is not timed out.
            self._offer_deadline = now + self._handshake_wait()
            return [Send(frames.HELLO, 0, self._handshake.hello())]
        if command == frames.REJECT and self._ignored_offer and self.state is not L.V2:
            # A tcprc server that offered v2 refuses this legacy device (it takes
            # only authenticated ones): say why, not just "closed by peer".
            code, text = _reject(payload)
            self.rejected = "the server refused this legacy device: %s%s" % (
                frames.reject_name(code), ": " + text if text else "")
            self._go(Ev.REJECTED_LEGACY)
            return [Fail(self.rejected)]
        if self.state is not L.HELLO:
            # Only an OFFER opens the handshake: before it (a legacy server's garbage)
            # or on a legacy uplink these are unknown commands, skipped and never
            # answered with a v2 frame.
            if self.state is L.V2:
                return [Send(frames.REJECT, 0, frames.encode_reject(
                            frames.REJECT_MALFORMED, "%s out of order" % frames.COMMAND_NAMES[command])),
                        Fail("%s out of order (after the handshake)" % frames.COMMAND_NAMES[command])]
            return [Log(WARNING, "skipped unknown command %d (%d payload bytes): no v2 handshake "
                                 "on this uplink" % (command, len(payload)))]
        if command == frames.REJECT:
            code, text = _reject(payload)
            self.rejected = "the server rejected this device: %s%s" % (
                frames.reject_name(code), ": " + text if text else "")
            self._go(Ev.HANDSHAKE_FAILED)
            return [Fail(self.rejected)]
        from .handshake import HandshakeError
        try:
            if command == frames.CHALLENGE:
                return [Send(frames.AUTH, 0, self._handshake.on_challenge(payload))]
            if command == frames.WELCOME:
                host = self._handshake.on_welcome(payload)
                self._go(Ev.WELCOME)
                self._offer_deadline = None
                return [self.upgraded(self._handshake.peer_window, "%s; the server takes our "
                                      "clients on %s" % ("authenticated as %s" % self.device_id
                                                         if self.device_id else "no identity",
                                                         host), self._heartbeat)]
            raise HandshakeError(frames.REJECT_MALFORMED,
                                 "%s is not for a device" % frames.COMMAND_NAMES[command])
        except HandshakeError as exc:
            self.rejected = str(exc)
            self._go(Ev.HANDSHAKE_FAILED)
            return [Send(frames.REJECT, 0, frames.encode_reject(exc.code, exc.wire_text)),
                    Fail("v2 handshake failed: %s" % exc)]

    def connect(self, client_id: int, payload: Any, busy: bool, now: float) -> List[Action]:
        if self.state is L.HELLO and not self.strict:
            # The server took us as legacy before our HELLO reached it, and
            # carried a client: it ignores the HELLO, so this uplink is legacy.
            self._go(Ev.TAKEN_AS_LEGACY)
            self._handshake, self._offer_deadline = None, None
            return [Log(WARNING, "the server took this uplink as legacy before our HELLO "
                                 "reached it: staying legacy")] + self.connect(client_id, payload,
                                                                               busy, now)
        if not self.established:
            refused = self._stream_frame("CONNECT")
            if refused is not None:
                return refused
        quiet = self._quiet.pop(client_id, None)
        if quiet is not None and quiet[1] and now - quiet[0] < QUIET:
            # Sent before the server saw our CLOSE: its client is gone already.
            self._quiet[client_id] = quiet
            return [Log(DEBUG, "stale CONNECT for client %d (refused before, no CLOSE from "
                               "the server yet): ignored" % client_id)]
        early = self._drop_early(client_id) or bytearray()
        # Legacy rule: a CONNECT on a busy id replaces the stream, silently.
        actions: List[Action] = [DropStream(client_id, "replaced by a new CONNECT")] if busy else []
        try:
            address, port = frames.decode_connect_payload(payload)
        except frames.ProtocolError as exc:
            actions.append(Log(WARNING, "refused client %d: %s" % (client_id, exc)))
            actions.append(self._close(client_id, now, False))
            return actions
        actions.append(OpenLocal(client_id, address, port, early))
        return actions

    def unknown_data(self, client_id: int, payloads: List[Any], now: float) -> List[Action]:
        if not self.established:
            refused = self._stream_frame("DATA")
            if refused is not None:
                return refused
        if self.v2:
            # No early DATA in v2 (CONNECT always comes first): it crossed our CLOSE.
            return [Log(DEBUG, "DATA for closed client %d dropped" % client_id)]
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
        if not self.established:
            refused = self._stream_frame("CLOSE")
            if refused is not None:
                return refused
        # The server's CLOSE ends the quiet time, and any wait for a CONNECT.
        self._quiet.pop(client_id, None)
        self._drop_early(client_id)
        return Session.peer_close(self, client_id, known, answered, now)

    def closed_here(self, client_id: int, now: float) -> None:
        self._quiet[client_id] = (now, False)

    def next_deadline(self) -> Optional[float]:
        if not self._early:
            return self._offer_deadline
        return min(entry[1] for entry in self._early.values())

    def expire(self, now: float, reading: bool) -> List[Action]:
        if self._offer_deadline is not None and now >= self._offer_deadline:
            self._offer_deadline = None
            if self.state is L.HELLO:
                self._go(Ev.HANDSHAKE_FAILED)
                return [Fail("the v2 handshake did not finish within %g s of the OFFER"
                             % self._handshake_wait())]
            self._go(Ev.REFUSE_LEGACY)
            return [Fail("no OFFER of protocol v2 within %g s of LISTEN (a legacy server?): "
                         "refusing to fall back, %s" % (self._offer_wait, self._why_strict()))]
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
        return Send(frames.CLOSE, client_id, b"")

    def _drop_early(self, client_id: int) -> Optional[bytearray]:
        entry = self._early.pop(client_id, None)
        if entry is None:
            return None
        self._early_bytes -= len(entry[0])
        return entry[0]

    def _refuse_early(self, client_id: int, now: float, why: str) -> List[Action]:
        self._drop_early(client_id)
        return [Log(WARNING, "client %d: %s: answered CLOSE" % (client_id, why)),
                self._close(client_id, now, True)]


def _reject(payload: Any) -> Tuple[int, str]:
    try:
        return frames.decode_reject(payload)
    except frames.ProtocolError:
        return frames.REJECT_MALFORMED, "(malformed REJECT)"
