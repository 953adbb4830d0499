"""The protocol rules of one uplink, without I/O: events in, actions out (as h11 does).

The link owns the sockets, the stream table and the DATA fast path; at every
point where the legacy protocol has a rule it asks its session, which returns
a list of actions for the link to carry out, in order:

    (SEND, command, client id, payload)   queue a control frame for the peer
    (OPEN, client id, address, port, early bytes)   device: dial, start a stream
    (REPLACE, client id)    drop the stream on this id without a CLOSE
    (LISTENED,)             server: a legacy session is established; open the host port
    (AUTHED, device id)     server: a v2 handshake passed; the link claims the host port
                            and answers with welcome() or reject()
    (UPGRADED, peer window, detail)   v2 is negotiated: v2 rules from now on
    (DENIED, device id, message)      server: a handshake failed its checks (the
                            link logs it with the source and slows the source down)
    (UNLISTEN,)             server: a HELLO came after the session was taken as
                            legacy, before any client: give the host port back
    (FAIL, reason)          end the uplink
    (WARN, message) / (DEBUG, message)   one log line about this uplink

Rules kept here: at most one CLOSE per id from this side (the link's
`closed_here` calls and the session's own refusals), LISTEN first (server),
a CONNECT on a busy id replaces its stream (device), the answer to DATA or
CLOSE for an id with no stream, the device's early-DATA hold and quiet ids,
and the server's id quarantine.  Times are the caller's (`now`, monotonic
seconds), so a test drives them.

Protocol v2 is negotiated here (docs/protocol.md): the server answers LISTEN
with OFFER and waits a moment for HELLO before taking the device as legacy;
the device answers OFFER unless told to stay legacy, and refuses to fall back
when it must not.  The handshake's checks are wire.handshake's.
"""

from typing import Any, Callable, Dict, List, Optional, Tuple

from . import frames

SEND, OPEN, REPLACE, LISTENED, FAIL, WARN, DEBUG = (
    "send", "open", "replace", "listened", "fail", "warn", "debug")
AUTHED, UPGRADED, DENIED, UNLISTEN = "authed", "upgraded", "denied", "unlisten"
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
# Server: how long after its OFFER a device that says nothing is taken as
# legacy: a tcprc device answers at once, so a few round trips, but at least
# a second: a relay or a proxy in the path hides the real round trip from the
# uplink's TCP_INFO (a HELLO even later still counts until a client came).
# Server: the longest its CHALLENGE may wait after failed handshakes of the
# same id from the same address (its throttle); a device's handshake
# deadline includes it, so a good device is never timed out by it.
MAX_CHALLENGE_HOLD = 30.0
HELLO_WAIT_FLOOR = 1.0
HELLO_WAIT_RTTS = 4
HELLO_WAIT_CAP = 3.0

_HANDSHAKE = (frames.OFFER, frames.HELLO, frames.CHALLENGE, frames.AUTH, frames.WELCOME,
              frames.REJECT)


class Session:
    """Rules both sides share; the link thread is its only caller."""

    window = 0          # v2: each stream's receive window, announced in the handshake
    v2 = False          # v2 negotiated

    def handshake(self, command: int, payload: Any, now: float) -> List[Action]:
        """A handshake frame (OFFER..REJECT)."""
        return [(WARN, "skipped %s: not expected on this side"
                 % frames.COMMAND_NAMES.get(command, command))]

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
            return self.listen(now)
        if command in _HANDSHAKE:
            return self.handshake(command, payload, now)
        return [(WARN, "skipped unknown command %d for client %d (%d payload bytes)"
                 % (command, client_id, len(payload)))]

    def connect(self, client_id: int, payload: Any, busy: bool, now: float) -> List[Action]:
        return [(WARN, "ignored CONNECT for client %d: not expected on this side" % client_id)]

    def listen(self, now: float) -> List[Action]:
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

    def __init__(self, protocol: str = "auto", device_id: str = "", secret: Optional[bytes] = None,
                 window: int = 256 * 1024, strict: bool = False, offer_wait: float = 10.0) -> None:
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
        self._offer_deadline: Optional[float] = None
        self.state = "listen"          # -> legacy | hello -> v2
        self._handshake: Any = None
        self.rejected = ""             # the server's REJECT, for the app's last error
        self._ignored_offer = False    # protocol "legacy" ignored a v2 server's OFFER

    def start(self, now: float) -> List[Action]:
        if self.strict:
            self._offer_deadline = now + self._offer_wait
        return [(SEND, frames.LISTEN, 0, b"")]

    def _stream_frame(self, name: str) -> Optional[List[Action]]:
        """A CONNECT, DATA or CLOSE came: before any OFFER it tells a legacy
        server.  None: go on with the frame; else what to do instead."""
        if self.state == "listen":
            if self.strict:
                return [(FAIL, "the server speaks only the legacy protocol (it sent %s without "
                         "an OFFER): refusing to fall back, %s" % (name, self._why_strict()))]
            self.state = "legacy"
            self._offer_deadline = None
        elif self.state == "hello":
            return [(FAIL, "%s during the v2 handshake" % name)]
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
                return [(DEBUG, "OFFER of protocol v2 ignored: [device] protocol = \"legacy\"")]
            if self.state == "hello":   # a server that offers twice is broken: no waiting on it
                return [(SEND, frames.REJECT, 0, frames.encode_reject(
                            frames.REJECT_MALFORMED, "OFFER out of order")),
                        (FAIL, "v2 handshake failed: a second OFFER during the handshake")]
            if self.state != "listen" or len(payload):
                return [(WARN, "unexpected OFFER ignored")]
            from .handshake import DeviceHandshake
            self._handshake = DeviceHandshake(self.device_id, self._secret, self.window)
            self.state = "hello"
            # A bound for the rest of the handshake: a server gone quiet now (or
            # a path that black-holes, TCP still up) must not hold the uplink.
            # For an id it includes the longest a server may hold its CHALLENGE
            # after failures of that id from this address (someone else's,
            # perhaps): a good device waits, it is not timed out.
            self._offer_deadline = now + self._handshake_wait()
            return [(SEND, frames.HELLO, 0, self._handshake.hello())]
        if command == frames.REJECT and self._ignored_offer and self.state != "v2":
            # A tcprc server that offered v2 refuses this legacy device (it takes
            # only authenticated ones): say why, not just "closed by peer".
            code, text = _reject(payload)
            self.rejected = "the server refused this legacy device: %s%s" % (
                frames.reject_name(code), ": " + text if text else "")
            return [(FAIL, self.rejected)]
        if self.state != "hello":
            # Only an OFFER opens the handshake: before it (a legacy server's garbage)
            # or on a legacy uplink these are unknown commands, skipped and never
            # answered with a v2 frame.
            if self.state == "v2":
                return [(SEND, frames.REJECT, 0, frames.encode_reject(
                            frames.REJECT_MALFORMED, "%s out of order" % frames.COMMAND_NAMES[command])),
                        (FAIL, "%s out of order (after the handshake)" % frames.COMMAND_NAMES[command])]
            return [(WARN, "skipped unknown command %d (%d payload bytes): no v2 handshake on "
                           "this uplink" % (command, len(payload)))]
        if command == frames.REJECT:
            code, text = _reject(payload)
            self.rejected = "the server rejected this device: %s%s" % (
                frames.reject_name(code), ": " + text if text else "")
            return [(FAIL, self.rejected)]
        from .handshake import HandshakeError
        try:
            if command == frames.CHALLENGE:
                return [(SEND, frames.AUTH, 0, self._handshake.on_challenge(payload))]
            if command == frames.WELCOME:
                host = self._handshake.on_welcome(payload)
                self.state = "v2"
                self._offer_deadline = None
                self.v2 = True
                return [(UPGRADED, self._handshake.peer_window,
                         "%s; the server takes our clients on %s" % (
                             "authenticated as %s" % self.device_id if self.device_id
                             else "no identity", host))]
            raise HandshakeError(frames.REJECT_MALFORMED,
                                 "%s is not for a device" % frames.COMMAND_NAMES[command])
        except HandshakeError as exc:
            self.rejected = str(exc)
            return [(SEND, frames.REJECT, 0, frames.encode_reject(exc.code, exc.wire_text)),
                    (FAIL, "v2 handshake failed: %s" % exc)]

    def connect(self, client_id: int, payload: Any, busy: bool, now: float) -> List[Action]:
        if self.state == "hello" and not self.strict:
            # The server took us as legacy before our HELLO reached it, and
            # carried a client: it ignores the HELLO, so this uplink is legacy.
            self.state, self._handshake, self._offer_deadline = "legacy", None, None
            return [(WARN, "the server took this uplink as legacy before our HELLO reached it: "
                           "staying legacy")] + self.connect(client_id, payload, busy, now)
        if self.state != "legacy" and self.state != "v2":
            refused = self._stream_frame("CONNECT")
            if refused is not None:
                return refused
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
        if self.state != "legacy" and self.state != "v2":
            refused = self._stream_frame("DATA")
            if refused is not None:
                return refused
        if self.v2:
            # No early DATA in v2 (CONNECT always comes first): it crossed our CLOSE.
            return [(DEBUG, "DATA for closed client %d dropped" % client_id)]
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
        if self.state != "legacy" and self.state != "v2":
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
            if self.state == "hello":
                return [(FAIL, "the v2 handshake did not finish within %g s of the OFFER"
                         % self._handshake_wait())]
            return [(FAIL, "no OFFER of protocol v2 within %g s of LISTEN (a legacy server?): "
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
                 rtt: Callable[[], float] = lambda: 0.0,
                 lookup: Callable[[str], Optional[bytes]] = lambda device_id: None,
                 legacy_allowed: bool = True, window: int = 256 * 1024,
                 throttle: Callable[[float, str], float] = lambda now, device_id: 0.0) -> None:
        self.ids = ids
        self.connect_payload = connect_payload
        self.listening = False
        self._rtt = rtt
        # v2: `lookup(id)` gives a configured device's secret; `throttle(now, id)`
        # how long a HELLO naming that id from this source waits for its CHALLENGE.
        self._lookup = lookup
        self.legacy_allowed = legacy_allowed
        self.window = window
        self._throttle = throttle
        self.state = "listen"   # -> offered -> (legacy | challenged -> authed -> v2)
        self._deadline: Optional[float] = None
        self._handshake: Any = None
        self._challenge = b""
        self.device_id = ""
        self._carried = False   # a CONNECT went out: a late HELLO can no longer change the session

    @property
    def established(self) -> bool:
        """Clients may come: a legacy session, or v2 past its WELCOME."""
        return self.state in ("legacy", "v2")

    def listen(self, now: float) -> List[Action]:
        if self.listening:
            return [(WARN, "repeated LISTEN ignored")]
        self.listening = True
        self.state = "offered"
        if self.legacy_allowed:   # else only a HELLO helps: listen_timeout bounds the wait
            self._deadline = now + min(HELLO_WAIT_CAP, max(HELLO_WAIT_FLOOR,
                                                           HELLO_WAIT_RTTS * self._rtt()))
        # Zero length: a legacy (Lua) device logs it as a bad command and carries on.
        return [(SEND, frames.OFFER, frames.V2, b"")]

    def handshake(self, command: int, payload: Any, now: float) -> List[Action]:
        name = frames.COMMAND_NAMES[command]
        if self.state == "listen":   # we offered nothing yet: no REJECT, a v2 frame
            return [(FAIL, "%s before LISTEN: not a tcprc device" % name)]
        if self.state == "legacy" and command != frames.HELLO:
            return [(WARN, "skipped unknown command %d (%d payload bytes): a legacy session"
                           % (command, len(payload)))]
        from .handshake import HandshakeError, ServerHandshake
        unlisten: List[Action] = []
        if command == frames.HELLO and self.state == "legacy" and not self._carried:
            # Slower than our wait (a relay or a proxy in the path hides the
            # real round trip from TCP_INFO), but nothing was carried as legacy yet.
            self.state = "offered"
            unlisten = [(UNLISTEN,), (DEBUG, "HELLO after the legacy wait, before any client: "
                                             "the session is v2 after all")]
        try:
            if command == frames.HELLO and self.state == "offered":
                self._handshake = ServerHandshake(self._lookup, self.window, self.legacy_allowed)
                self._challenge = self._handshake.on_hello(payload)
                self.device_id = self._handshake.device_id
                wait = self._throttle(now, self.device_id)
                if wait > 0:   # this id failed from this source: its answer waits
                    self.state, self._deadline = "delayed", now + wait
                    return unlisten + [(DEBUG, "CHALLENGE held %.1f s: recent failures of "
                                               "id %s from this source" % (wait, self.device_id))]
                self.state, self._deadline = "challenged", None
                return unlisten + [(SEND, frames.CHALLENGE, 0, self._challenge)]
            if command == frames.AUTH and self.state == "challenged":
                self._handshake.on_auth(payload)
                self.state = "authed"
                return [(AUTHED, self.device_id)]
            if command == frames.REJECT:
                code, text = _reject(payload)
                return [(FAIL, "the device rejected the handshake: %s%s" % (
                    frames.reject_name(code), ": " + text if text else ""))]
            if command == frames.HELLO and self.state == "legacy":
                # The device sees our CONNECT before any CHALLENGE and stays legacy
                # too (or hangs up, if it must not).
                return [(WARN, "HELLO after the uplink carried clients as legacy (the device "
                         "answered our OFFER too late): the session stays legacy")]
            raise HandshakeError(frames.REJECT_MALFORMED, "%s out of order" % name)
        except HandshakeError as exc:
            self.state = "failed"
            if self._handshake is not None:
                self.device_id = self._handshake.device_id
            # The log line may name the cause; the REJECT says only what the
            # device may know (an unknown id looks like a bad proof).
            return unlisten + [(DENIED, self.device_id, str(exc)),
                    (SEND, frames.REJECT, 0, frames.encode_reject(exc.code, exc.wire_text)),
                    (FAIL, "v2 handshake failed: %s" % exc)]

    def welcome(self, host: str) -> List[Action]:
        """The link claimed the host port of an authenticated session: WELCOME."""
        self.state = "v2"
        self.v2 = True
        detail = ("authenticated as %s" % self.device_id if self.device_id else "no identity")
        return [(SEND, frames.WELCOME, 0, self._handshake.welcome(host)),
                (UPGRADED, self._handshake.peer_window, detail)]

    def reject(self, code: int, text: str) -> List[Action]:
        """The link could not give an authenticated session its host port."""
        self.state = "failed"
        return [(SEND, frames.REJECT, 0, frames.encode_reject(code, text)), (FAIL, text)]

    def next_deadline(self) -> Optional[float]:
        return self._deadline

    def expire(self, now: float, reading: bool) -> List[Action]:
        if self._deadline is None or now < self._deadline:
            return NONE
        self._deadline = None
        if self.state == "delayed":
            self.state = "challenged"
            return [(SEND, frames.CHALLENGE, 0, self._challenge)]
        if self.state != "offered":
            return NONE
        self.state = "legacy"
        return [(LISTENED,)]

    def timed_out(self, limit: float) -> List[Action]:
        """listen_timeout ran out before the session was established."""
        if not self.listening:
            return [(FAIL, "no LISTEN within %.1f s" % limit)]
        if self.state == "offered" and self.legacy_allowed:
            # A listen_timeout shorter than the HELLO wait decides it: legacy.
            self._deadline = None
            self.state = "legacy"
            return [(LISTENED,)]
        if self.state == "offered":   # legacy not allowed, and no HELLO came
            self.state = "failed"
            # A legacy agent skips the REJECT as an unknown command (as it did the
            # OFFER); a tcprc device told to stay legacy can say why it was refused.
            return [(DENIED, "", "legacy LISTEN (no HELLO within %.1f s)" % limit),
                    (SEND, frames.REJECT, 0, frames.encode_reject(
                        frames.REJECT_IDENTITY_REQUIRED,
                        "this server accepts only authenticated devices (protocol v2 with an id)")),
                    (FAIL, "legacy LISTEN refused: this server requires authenticated devices "
                           "([server] legacy = false)")]
        return [(FAIL, "handshake not done within %.1f s" % limit)]

    def _before_listen(self, what: str) -> Optional[List[Action]]:
        if self.established:
            return None
        if self.listening:
            return [(FAIL, "%s before the session was established" % what)]
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

    def open(self, open_ids: Any, now: float,
             payload: Optional[bytes] = None) -> Tuple[Optional[int], List[Action]]:
        """A client is waiting to be accepted: its id and the CONNECT that announces it
        (`payload`, or the session's connect_payload), or (None, []) with `ids.wait`
        saying how long to wait (0.0: refuse it)."""
        client_id = self.ids.allocate(open_ids, now)
        if client_id is None:
            return None, NONE
        self._carried = True
        return client_id, [(SEND, frames.CONNECT, client_id,
                            self.connect_payload if payload is None else payload)]

    def closed_here(self, client_id: int, now: float) -> None:
        self.ids.hold(client_id, now, GRACE_FLOOR + GRACE_RTTS * self._rtt())


def _reject(payload: Any) -> Tuple[int, str]:
    try:
        return frames.decode_reject(payload)
    except frames.ProtocolError:
        return frames.REJECT_MALFORMED, "(malformed REJECT)"
