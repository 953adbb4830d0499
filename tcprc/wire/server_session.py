"""The server's side of an uplink's protocol (wire.session's Session, without I/O).

Apart from wire.session so that a device, which never plays this role, does
not load its code (docs/benchmarks.md, third round).
"""

from typing import Any, Callable, List, Optional, Tuple

from . import frames
from .actions import DEBUG, LISTENED, UNLISTEN, WARNING, Authed, Denied, Fail, Log, Send
from .session import (GRACE_FLOOR, GRACE_RTTS, HELLO_WAIT_CAP, HELLO_WAIT_FLOOR, HELLO_WAIT_RTTS,
                      NONE, L, Action, Ev, Session, _reject)


class ServerSession(Session):
    """The server's rules: the device's LISTEN first, then CONNECT per accepted client.

    `ids` is the tunnel's client-id allocator with its quarantine (an
    engine-free object: server.ids.ClientIds); `rtt()` gives the uplink's
    smoothed round trip in seconds (0.0 when unknown), for the grace a held
    id gets.
    """

    role = "server"

    def __init__(self, ids: Any, connect_payload: bytes,
                 rtt: Callable[[], float] = lambda: 0.0,
                 lookup: Callable[[str], Optional[bytes]] = lambda device_id: None,
                 legacy_allowed: bool = True, window: int = 256 * 1024,
                 throttle: Callable[[float, str], float] = lambda now, device_id: 0.0,
                 heartbeat: Tuple[float, float] = (15.0, 45.0)) -> None:
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
        self._heartbeat = heartbeat
        self.state = L.LISTEN
        self._deadline: Optional[float] = None
        self._handshake: Any = None
        self._challenge = b""
        self.device_id = ""
        self._carried = False   # a CONNECT went out: a late HELLO can no longer change the session

    @property
    def authenticated_id(self) -> str:
        """The id this session proved ("": none, or not proved yet)."""
        return self.device_id if self.state is L.V2 or self.state is L.AUTHED else ""

    @property
    def held(self) -> bool:
        """Its CHALLENGE waits: the id it named failed from its source lately."""
        return self.state is L.DELAYED

    def listen(self, now: float) -> List[Action]:
        if self.listening:
            return [Log(WARNING, "repeated LISTEN ignored")]
        self.listening = True
        self._go(Ev.LISTEN)
        if self.legacy_allowed:   # else only a HELLO helps: listen_timeout bounds the wait
            self._deadline = now + min(HELLO_WAIT_CAP, max(HELLO_WAIT_FLOOR,
                                                           HELLO_WAIT_RTTS * self._rtt()))
        # Zero length: a legacy (Lua) device logs it as a bad command and carries on.
        return [Send(frames.OFFER, frames.V2, b"")]

    def handshake(self, command: int, payload: Any, now: float) -> List[Action]:
        name = frames.COMMAND_NAMES[command]
        if self.state is L.LISTEN:   # we offered nothing yet: no REJECT, a v2 frame
            return [Fail("%s before LISTEN: not a tcprc device" % name)]
        if self.state is L.LEGACY and command != frames.HELLO:
            return [Log(WARNING, "skipped unknown command %d (%d payload bytes): a legacy "
                                 "session" % (command, len(payload)))]
        from .handshake import HandshakeError
        from .server_handshake import ServerHandshake
        unlisten: List[Action] = []
        if command == frames.HELLO and self.state is L.LEGACY and not self._carried:
            # Slower than our wait (a relay or a proxy in the path hides the
            # real round trip from TCP_INFO), but nothing was carried as legacy yet.
            self._go(Ev.LATE_HELLO)
            unlisten = [UNLISTEN, Log(DEBUG, "HELLO after the legacy wait, before any client: "
                                             "the session is v2 after all")]
        try:
            if command == frames.HELLO and self.state is L.OFFERED:
                self._handshake = ServerHandshake(self._lookup, self.window, self.legacy_allowed)
                self._challenge = self._handshake.on_hello(payload)
                self.device_id = self._handshake.device_id
                wait = self._throttle(now, self.device_id)
                if wait > 0:   # this id failed from this source: its answer waits
                    self._go(Ev.HELLO_HELD)
                    self._deadline = now + wait
                    return unlisten + [Log(DEBUG, "CHALLENGE held %.1f s: recent failures of "
                                                  "id %s from this source" % (wait, self.device_id))]
                self._go(Ev.HELLO)
                self._deadline = None
                return unlisten + [Send(frames.CHALLENGE, 0, self._challenge)]
            if command == frames.AUTH and self.state is L.CHALLENGED:
                self._handshake.on_auth(payload)
                self._go(Ev.AUTH)
                return [Authed(self.device_id)]
            if command == frames.REJECT:
                code, text = _reject(payload)
                self._fail_handshake()
                return [Fail("the device rejected the handshake: %s%s" % (
                    frames.reject_name(code), ": " + text if text else ""))]
            if command == frames.HELLO and self.state is L.LEGACY:
                # The device sees our CONNECT before any CHALLENGE and stays legacy
                # too (or hangs up, if it must not).
                return [Log(WARNING, "HELLO after the uplink carried clients as legacy (the "
                                     "device answered our OFFER too late): the session stays "
                                     "legacy")]
            raise HandshakeError(frames.REJECT_MALFORMED, "%s out of order" % name)
        except HandshakeError as exc:
            self._fail_handshake()
            if self._handshake is not None:
                self.device_id = self._handshake.device_id
            # The log line may name the cause; the REJECT says only what the
            # device may know (an unknown id looks like a bad proof).
            return unlisten + [Denied(self.device_id, str(exc)),
                               Send(frames.REJECT, 0, frames.encode_reject(exc.code, exc.wire_text)),
                               Fail("v2 handshake failed: %s" % exc)]

    def _fail_handshake(self) -> None:
        if self.state is not L.FAILED:
            self._go(Ev.HANDSHAKE_FAILED)

    def welcome(self, host: str) -> List[Action]:
        """The link claimed the host port of an authenticated session: WELCOME."""
        self._go(Ev.WELCOMED)
        detail = ("authenticated as %s" % self.device_id if self.device_id else "no identity")
        return [Send(frames.WELCOME, 0, self._handshake.welcome(host)),
                self.upgraded(self._handshake.peer_window, detail, self._heartbeat)]

    def reject(self, code: int, text: str) -> List[Action]:
        """The link could not give an authenticated session its host port."""
        self._go(Ev.HOST_REFUSED)
        return [Send(frames.REJECT, 0, frames.encode_reject(code, text)), Fail(text)]

    def next_deadline(self) -> Optional[float]:
        return self._deadline

    def expire(self, now: float, reading: bool) -> List[Action]:
        if self._deadline is None or now < self._deadline:
            return NONE
        self._deadline = None
        if self.state is L.DELAYED:
            self._go(Ev.HOLD_OVER)
            return [Send(frames.CHALLENGE, 0, self._challenge)]
        if self.state is not L.OFFERED:
            return NONE
        self._go(Ev.HELLO_WAIT_OVER)
        return [LISTENED]

    def timed_out(self, limit: float) -> List[Action]:
        """listen_timeout ran out before the session was established."""
        if not self.listening:
            return [Fail("no LISTEN within %.1f s" % limit)]
        if self.state is L.OFFERED and self.legacy_allowed:
            # A listen_timeout shorter than the HELLO wait decides it: legacy.
            self._deadline = None
            self._go(Ev.HELLO_WAIT_OVER)
            return [LISTENED]
        if self.state is L.OFFERED:   # legacy not allowed, and no HELLO came
            self._go(Ev.LEGACY_REFUSED)
            # A legacy agent skips the REJECT as an unknown command (as it did the
            # OFFER); a tcprc device told to stay legacy can say why it was refused.
            return [Denied("", "legacy LISTEN (no HELLO within %.1f s)" % limit),
                    Send(frames.REJECT, 0, frames.encode_reject(
                        frames.REJECT_IDENTITY_REQUIRED,
                        "this server accepts only authenticated devices (protocol v2 with an id)")),
                    Fail("legacy LISTEN refused: this server requires authenticated devices "
                         "([server] legacy = false)")]
        return [Fail("handshake not done within %.1f s" % limit)]

    def _before_listen(self, what: str) -> Optional[List[Action]]:
        if self.established:
            return None
        if self.listening:
            return [Fail("%s before the session was established" % what)]
        return [Fail("%s before LISTEN: not a tcprc device" % what)]

    def connect(self, client_id: int, payload: Any, busy: bool, now: float) -> List[Action]:
        return self._before_listen("CONNECT") or Session.connect(self, client_id, payload, busy, now)

    def unknown_data(self, client_id: int, payloads: List[Any], now: float) -> List[Action]:
        # Late DATA for a client this side closed: the device gets our CLOSE anyway.
        return self._before_listen("DATA") or [
            Log(DEBUG, "DATA for unknown client %d dropped%s" % (
                client_id, " (held until the device's CLOSE)" if self.ids.is_held(client_id)
                else ""))]

    def peer_close(self, client_id: int, known: bool, answered: bool, now: float) -> List[Action]:
        if known:
            if answered:
                self.ids.answer(client_id, closing=True)
            return NONE
        if self.ids.answer(client_id):
            return [Log(DEBUG, "CLOSE for client %d answers ours: the id is free" % client_id)]
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
        return client_id, [Send(frames.CONNECT, client_id,
                                self.connect_payload if payload is None else payload)]

    def closed_here(self, client_id: int, now: float) -> None:
        self.ids.hold(client_id, now, GRACE_FLOOR + GRACE_RTTS * self._rtt())
