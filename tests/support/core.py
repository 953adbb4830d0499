"""A device core and a server core driven against each other in memory: no socket, no
thread, no clock but the one the test turns (as h11's tests drive a connection pair).

MemSide does, with byte strings, what engine.link and its pumps do with sockets:
it carries out the session's actions (wire.actions), asks each stream's rules
(wire.streams) at the same points, and stands in for the local socket with an
inbox the "application" reads from and an outbox it writes to.  What it checks
is wire's protocol: a conforming pair never breaks its own rules, every byte
arrives once and in order, half-closes and resets reach the other end, every
CLOSE is answered in version 2, window growth stays within its bounds.
"""

from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple

from tcprc.server.ids import ClientIds
from tcprc.wire import actions as A
from tcprc.wire import frames
from tcprc.wire.server_session import ServerSession
from tcprc.wire.session import DeviceSession

Frame = Tuple[int, int, bytes]
SECRET = b"correct-horse-battery-staple-42"


def _decoded(raw: bytes) -> Frame:
    length, command, client_id = frames.HEADER.unpack_from(raw)
    return command, client_id, raw[frames.HEADER_SIZE:frames.HEADER_SIZE + length]


class MemStream:
    """One stream on one side: its rules and the application's bytes."""

    def __init__(self, client_id: int, rules: Any) -> None:
        self.id = client_id
        self.rules = rules
        self.credit = rules.initial_credit
        self.closed = False          # a CLOSE went out or came in (the engine's mark_closed)
        self.outbox = b""            # written by the application, not yet sent
        self.inbox = b""             # received, not yet read by the application
        self.written = b""           # everything the application wrote
        self.read = b""              # everything it read
        self.want_eof = False        # the application shut its sending side
        self.sent_eof = False
        self.got_eof = False         # the application saw the peer's EOF
        self.reset = False           # the peer's reset reached it
        self.released = False

    def mark_closed(self) -> bool:
        if self.closed:
            return False
        self.closed = True
        return True


class MemSide:
    """What engine.link does with a session's actions, in memory."""

    def __init__(self, session: Any, name: str) -> None:
        self.session = session
        self.name = name
        self.out: Deque[Frame] = deque()
        self.streams: Dict[int, MemStream] = {}
        self.gone: Dict[int, MemStream] = {}        # closed here or there, kept for checks
        self.failed = ""
        self.errors: List[str] = []                  # streams this side closed for a violation
        self.logs: List[Tuple[int, str]] = []
        self.upgraded = False
        self.now = 0.0
        self.last_heard = 0.0
        self._handlers = {
            A.Send: lambda a: self.out.append((a.command, a.client_id, bytes(a.payload))),
            A.Log: lambda a: self.logs.append((a.level, a.message)),
            A.Fail: self._fail,
            A.OpenLocal: self._open_local,
            A.DropStream: lambda a: self._release(self.streams.pop(a.client_id)),
            A.CloseStream: self._close_stream,
            A.PeerClosed: self._peer_closed,
            A.PeerEof: self._peer_eof,
            A.Grant: self._grant,
            A.Upgraded: self._upgraded,
            A.Listened: lambda a: None,
            A.Authed: lambda a: self.act(self.session.welcome("127.0.0.1:2301")),
            A.Denied: lambda a: self.logs.append((A.WARNING, a.message)),
            A.Unlisten: lambda a: None,
        }

    # ---- the session's actions ---------------------------------------------------------
    def act(self, actions: List[Any]) -> None:
        for action in actions:
            self._handlers[type(action)](action)
            if self.failed:
                return

    def _fail(self, action: A.Fail) -> None:
        self.failed = self.failed or action.reason

    def _upgraded(self, action: A.Upgraded) -> None:
        self.upgraded = True

    def _open_local(self, action: A.OpenLocal) -> None:
        stream = MemStream(action.client_id, self.session.new_stream(action.client_id))
        stream.inbox = bytes(action.early)
        self.streams[action.client_id] = stream

    def _close_stream(self, action: A.CloseStream) -> None:
        stream = self.streams.get(action.client_id)
        if stream is not None:
            self.errors.append(action.reason)
            self.close(stream, action.code, action.text or action.reason)

    def _peer_closed(self, action: A.PeerClosed) -> None:
        stream = self.streams.pop(action.client_id)
        answered = not stream.mark_closed()
        self.act(self.session.peer_closed(stream.rules, answered, self.now))
        if action.code == frames.CLOSE_RESET:
            stream.reset = True
        stream.outbox = b""     # the local side is cut once the peer's bytes are drained
        self._release(stream)

    def _peer_eof(self, action: A.PeerEof) -> None:
        stream = self.streams.get(action.client_id)
        if stream is not None and not stream.inbox:
            self._deliver_eof(stream)

    def _grant(self, action: A.Grant) -> None:
        stream = self.streams.get(action.client_id)
        if stream is None:
            return
        if stream.credit + action.amount > stream.rules.credit_limit:
            self.close(stream, frames.CLOSE_ERROR, "credit past its limit")
            return
        stream.credit += action.amount

    def _deliver_eof(self, stream: MemStream) -> None:
        stream.got_eof = True
        self._maybe_finish(stream)

    def _maybe_finish(self, stream: MemStream) -> None:
        if not stream.rules.finished() or stream.inbox or self.streams.get(stream.id) is not stream:
            return
        del self.streams[stream.id]
        self.session.closed_here(stream.id, self.now)
        if stream.mark_closed():
            self.act([self.session.close_frame(stream.rules, 0, "")])
        self._release(stream)

    def _release(self, stream: MemStream) -> None:
        stream.released = True
        stream.rules.released()
        self.gone[stream.id] = stream

    # ---- what the local side does -------------------------------------------------------
    def close(self, stream: MemStream, code: int = 0, text: str = "") -> None:
        """This side ends a stream (its application reset it, or a rule was broken)."""
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
            self.session.closed_here(stream.id, self.now)
        if stream.mark_closed():
            self.act([self.session.close_frame(stream.rules, code, text)])
        self._release(stream)

    def write(self, client_id: int, data: bytes) -> None:
        stream = self.streams[client_id]
        stream.outbox += data
        stream.written += data
        self.pump(stream)

    def shut(self, client_id: int) -> None:
        """The application shuts its sending side (local EOF)."""
        stream = self.streams[client_id]
        stream.want_eof = True
        self.pump(stream)

    def reset(self, client_id: int) -> None:
        """The application's socket fails with a reset."""
        stream = self.streams[client_id]
        if stream.rules.pump_closes:
            if stream.mark_closed():
                self.out.append(_decoded(stream.rules.end_frame))
            self.streams.pop(client_id)
            self.session.closed_here(client_id, self.now)
            self._release(stream)
        else:
            self.close(stream, frames.CLOSE_RESET, "Connection reset by peer")

    def pump(self, stream: MemStream) -> None:
        """What a pump thread does: send what credit allows, then its end frame."""
        if stream.closed or stream.released:
            return
        while stream.outbox and (not stream.rules.credited or stream.credit > 0):
            size = min(len(stream.outbox), frames.MAX_PAYLOAD,
                       stream.credit if stream.rules.credited else len(stream.outbox))
            chunk, stream.outbox = stream.outbox[:size], stream.outbox[size:]
            if stream.rules.credited:
                stream.credit -= size
            self.out.append((frames.DATA, stream.id, chunk))
        if stream.outbox or not stream.want_eof or stream.sent_eof:
            return
        if stream.rules.pump_closes:
            if stream.mark_closed():
                self.out.append(_decoded(stream.rules.end_frame))
            self.streams.pop(stream.id, None)
            self.session.closed_here(stream.id, self.now)
            self._release(stream)
            return
        stream.sent_eof = True
        self.out.append(_decoded(stream.rules.end_frame))
        stream.rules.eof_sent()      # the link's pump_exited
        self._maybe_finish(stream)

    def read(self, client_id: int, count: Optional[int] = None) -> bytes:
        """The application reads up to `count` bytes (all by default)."""
        stream = self.streams.get(client_id) or self.gone[client_id]
        count = len(stream.inbox) if count is None else count
        data, stream.inbox = stream.inbox[:count], stream.inbox[count:]
        stream.read += data
        if data and not stream.released:
            grant = stream.rules.delivered(len(data), not stream.inbox)
            if grant:
                self.out.append((frames.CREDIT, client_id, frames.encode_credit(grant)))
        if not stream.inbox and stream.rules.peer_eof and not stream.got_eof \
                and not stream.released:
            self._deliver_eof(stream)
        return data

    # ---- frames in ----------------------------------------------------------------------------
    def receive(self, frame: Frame) -> None:
        command, client_id, payload = frame
        self.last_heard = self.now
        stream = self.streams.get(client_id)
        if command == frames.DATA and stream is not None:
            problem = stream.rules.received(len(payload))
            if problem:
                self.errors.append(problem)
                self.close(stream, frames.CLOSE_ERROR, problem)
                return
            stream.inbox += payload
            return
        self.act(self.session.frame(command, client_id, payload, self.streams, self.now))

    def tick(self) -> None:
        if self.upgraded:
            actions, _ = self.session.tick(self.now, self.last_heard)
            self.act(actions)


class Pair:
    """A device and a server core with their in-memory links, joined by two queues."""

    def __init__(self, v2: bool = True, window: int = 64 * 1024) -> None:
        self.closes: Dict[Tuple[str, int], int] = {}   # (side, id) -> CLOSE frames it sent
        ids = ClientIds(10.0)
        lookup = {"gw1": SECRET}.get
        self.device = MemSide(DeviceSession("v2" if v2 else "legacy", "gw1" if v2 else "",
                                            SECRET if v2 else None, window,
                                            heartbeat=(1.0, 3.0)), "device")
        self.server = MemSide(ServerSession(ids, frames.encode_connect_payload("", 0),
                                            lookup=lookup, legacy_allowed=not v2, window=window,
                                            heartbeat=(1.0, 3.0)), "server")
        self.device.act(self.device.session.start(0.0))
        self.flush()
        if not v2:   # the legacy wait for a HELLO runs out
            self.server.act(self.server.session.expire(self.server.session.next_deadline(), True))
        self.flush()

    def sides(self) -> Tuple[MemSide, MemSide]:
        return self.device, self.server

    def step(self, frm: MemSide) -> bool:
        """Deliver one frame from `frm` to the other side; False when none waits."""
        if not frm.out:
            return False
        frame = frm.out.popleft()
        if frame[0] == frames.CLOSE:
            self.closes[(frm.name, frame[1])] = self.closes.get((frm.name, frame[1]), 0) + 1
        (self.server if frm is self.device else self.device).receive(frame)
        return True

    def flush(self) -> None:
        """Deliver every frame both ways, pumping blocked senders as credit arrives."""
        for _ in range(100000):
            moved = self.step(self.device) | self.step(self.server)
            for side in self.sides():
                for stream in list(side.streams.values()):
                    side.pump(stream)
            if not moved and not self.device.out and not self.server.out:
                return
        raise AssertionError("frames kept flowing")

    def connect(self) -> int:
        """A client at the server: its stream on both sides; the id."""
        client_id, actions = self.server.session.open(self.server.streams, 0.0)
        assert client_id is not None
        self.server.streams[client_id] = MemStream(client_id,
                                                   self.server.session.new_stream(client_id))
        self.server.act(actions)
        self.flush()
        assert client_id in self.device.streams
        return client_id
