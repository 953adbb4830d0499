"""The states of a session and of a stream, and every transition between them, as tables.

The code moves a state only through these tables (`advance`): a move that is
not in a table is a bug the fault barrier ends the uplink for, never a state
nobody described.  docs/protocol.md prints the same tables (`markdown()`),
and a test checks that the document and the tables agree.
"""

from enum import Enum
from typing import Dict, List, Tuple


class SessionState(Enum):
    LISTEN = "listen"            # device: LISTEN sent; server: waiting for the device's LISTEN
    OFFERED = "offered"          # server: OFFER sent, waiting for HELLO (or the legacy wait)
    HELLO = "hello"              # device: HELLO sent, the handshake under way
    DELAYED = "delayed"          # server: CHALLENGE held (failures of this id from this source)
    CHALLENGED = "challenged"    # server: CHALLENGE sent, waiting for AUTH
    AUTHED = "authed"            # server: AUTH proved, the host port being claimed
    LEGACY = "legacy"            # established: legacy frames only
    V2 = "v2"                    # established: protocol version 2
    FAILED = "failed"            # the handshake failed: the uplink ends


class StreamState(Enum):
    OPEN = "open"                        # bytes flow both ways
    HALF_CLOSED_HERE = "half-closed here"    # v2: our EOF went out; the peer may still send
    HALF_CLOSED_THERE = "half-closed there"  # v2: the peer's EOF came; we may still send
    CLOSING = "closing"                  # v2: EOF both ways: our CLOSE is due once all is delivered
    CLOSED = "closed"                    # a CLOSE went out or came in; the local socket drains
    RESET = "reset"                      # the peer's end was reset: ours is reset too
    RELEASED = "released"                # nothing of the stream remains


class StreamEvent(Enum):
    EOF_SENT = "our EOF sent"
    EOF_RECEIVED = "the peer's EOF"
    CLOSE_SENT = "our CLOSE sent"
    CLOSE_RECEIVED = "the peer's CLOSE"
    RESET_RECEIVED = "the peer's CLOSE with reason reset"
    RELEASED = "local socket closed"


class SessionEvent(Enum):
    OFFER = "OFFER (protocol auto or v2)"
    LEGACY_FRAME = "CONNECT, DATA or CLOSE before an OFFER (not strict)"
    REFUSE_LEGACY = "CONNECT, DATA or CLOSE before an OFFER, or no OFFER in time (strict)"
    WELCOME = "WELCOME, the server's proof checked"
    TAKEN_AS_LEGACY = "CONNECT during the handshake (not strict: the server took us as legacy)"
    HANDSHAKE_FAILED = "REJECT, a bad or unexpected frame, or no answer in time"
    REJECTED_LEGACY = "REJECT after an OFFER this legacy device ignored"
    LISTEN = "LISTEN"
    HELLO_WAIT_OVER = "no HELLO within the wait (legacy allowed)"
    HELLO = "HELLO"
    HELLO_HELD = "HELLO of an id that failed lately from this source"
    HOLD_OVER = "the hold is over: CHALLENGE"
    AUTH = "AUTH, the device's proof checked"
    WELCOMED = "host port claimed: WELCOME"
    HOST_REFUSED = "host port refused: REJECT"
    LATE_HELLO = "HELLO before any client (late): the port goes back"
    LEGACY_REFUSED = "no HELLO within listen_timeout (legacy refused)"


S, E, V = SessionState, StreamEvent, SessionEvent

# (role, state, event) -> next state.
SESSION: Dict[Tuple[str, SessionState, SessionEvent], SessionState] = {
    ("device", S.LISTEN, V.OFFER): S.HELLO,
    ("device", S.LISTEN, V.LEGACY_FRAME): S.LEGACY,
    ("device", S.LISTEN, V.REFUSE_LEGACY): S.FAILED,
    ("device", S.LISTEN, V.REJECTED_LEGACY): S.FAILED,
    ("device", S.HELLO, V.WELCOME): S.V2,
    ("device", S.HELLO, V.TAKEN_AS_LEGACY): S.LEGACY,
    ("device", S.HELLO, V.HANDSHAKE_FAILED): S.FAILED,
    ("device", S.LEGACY, V.REJECTED_LEGACY): S.FAILED,
    ("server", S.LISTEN, V.LISTEN): S.OFFERED,
    ("server", S.OFFERED, V.HELLO_WAIT_OVER): S.LEGACY,
    ("server", S.OFFERED, V.HELLO): S.CHALLENGED,
    ("server", S.OFFERED, V.HELLO_HELD): S.DELAYED,
    ("server", S.OFFERED, V.LEGACY_REFUSED): S.FAILED,
    ("server", S.OFFERED, V.HANDSHAKE_FAILED): S.FAILED,
    ("server", S.DELAYED, V.HOLD_OVER): S.CHALLENGED,
    ("server", S.DELAYED, V.HANDSHAKE_FAILED): S.FAILED,
    ("server", S.CHALLENGED, V.AUTH): S.AUTHED,
    ("server", S.CHALLENGED, V.HANDSHAKE_FAILED): S.FAILED,
    ("server", S.AUTHED, V.WELCOMED): S.V2,
    ("server", S.AUTHED, V.HOST_REFUSED): S.FAILED,
    ("server", S.AUTHED, V.HANDSHAKE_FAILED): S.FAILED,
    ("server", S.LEGACY, V.LATE_HELLO): S.OFFERED,
    ("server", S.LEGACY, V.HANDSHAKE_FAILED): S.FAILED,
    ("server", S.V2, V.HANDSHAKE_FAILED): S.FAILED,
}

# (state, event) -> next state, for the streams of both roles.  A legacy stream
# knows only OPEN -> CLOSED -> RELEASED (no EOF, no reasons).
STREAM: Dict[Tuple[StreamState, StreamEvent], StreamState] = {}


def _stream(states, event, to):
    for state in states:
        STREAM[(state, event)] = to


_LIVE = (StreamState.OPEN, StreamState.HALF_CLOSED_HERE, StreamState.HALF_CLOSED_THERE,
         StreamState.CLOSING)
_stream([StreamState.OPEN], E.EOF_SENT, StreamState.HALF_CLOSED_HERE)
_stream([StreamState.OPEN], E.EOF_RECEIVED, StreamState.HALF_CLOSED_THERE)
_stream([StreamState.HALF_CLOSED_THERE], E.EOF_SENT, StreamState.CLOSING)
_stream([StreamState.HALF_CLOSED_HERE], E.EOF_RECEIVED, StreamState.CLOSING)
_stream(_LIVE + (StreamState.CLOSED,), E.CLOSE_SENT, StreamState.CLOSED)
_stream(_LIVE + (StreamState.CLOSED,), E.CLOSE_RECEIVED, StreamState.CLOSED)
_stream(_LIVE + (StreamState.CLOSED,), E.RESET_RECEIVED, StreamState.RESET)
_stream(_LIVE + (StreamState.CLOSED, StreamState.RESET, StreamState.RELEASED), E.RELEASED,
        StreamState.RELEASED)


class BadTransition(Exception):
    """A move no table has: the protocol code has a bug (the fault barrier's)."""


def session_next(role: str, state: SessionState, event: SessionEvent) -> SessionState:
    try:
        return SESSION[(role, state, event)]
    except KeyError:
        raise BadTransition("%s session: no move from %s on %r"
                            % (role, state.value, event.value)) from None


def markdown() -> str:
    """The tables as docs/protocol.md shows them."""
    lines: List[str] = ["#### Session states", "",
                        "| role | state | event | next state |", "|---|---|---|---|"]
    for (role, state, event), to in SESSION.items():
        lines.append("| %s | %s | %s | %s |" % (role, state.value, event.value, to.value))
    lines += ["", "#### Stream states", "", "| state | event | next state |", "|---|---|---|"]
    for (state, event), to in STREAM.items():
        lines.append("| %s | %s | %s |" % (state.value, event.value, to.value))
    return "\n".join(lines) + "\n"
