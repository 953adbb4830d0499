"""The rules of one stream, legacy or version 2, without I/O: its state, its credit
ledger, its CLOSE and EOF, as wire.states tables them.

A stream's driver (engine.link and the stream's pump) keeps its socket and its
threads and asks the rules at each point: how many bytes the peer may still
send (received), what credit goes back once bytes reached the local socket
(delivered), what a CREDIT, EOF or CLOSE of the peer means, which frame ends
the stream at local EOF (end_frame).  Both kinds answer the same questions,
so the driver never asks "is this v2".

Version 2's window growth: over one TCP uplink, every byte queued in its
socket buffers counts against a stream's window.  Loopback buffers megabytes
there (a cellular path far less), so a fixed 256 KB window left a bulk stream
waiting for credit (scripts/bench, 1 stream: 0.7x legacy; grown to 4x: 0.74x,
8x: 0.65x, 16x: 0.99x).  A stream whose local socket takes everything at once
gets its window doubled at each CREDIT, up to GROWTH times the configured
one, while the streams of one uplink hold at most GROWTH_BUDGET_WINDOWS
windows beyond their own (GrowthBudget); a reader that falls behind stops
growing.  Memory per side: window x streams + the budget; both scale with
`window`.
"""

from typing import Any, Optional, Tuple

from . import frames
from .frames import ProtocolError
from .states import STREAM, StreamEvent, StreamState

GROWTH = 16
GROWTH_BUDGET_WINDOWS = 64     # the budget, in configured windows (16 MB at 256 KB)

_OPEN, _CLOSED, _RESET, _RELEASED = (StreamState.OPEN, StreamState.CLOSED, StreamState.RESET,
                                     StreamState.RELEASED)


class GrowthBudget:
    """The window growth one uplink's streams share, beyond their configured windows."""
    __slots__ = ("window", "grown")

    def __init__(self, window: int) -> None:
        self.window = window     # the configured window of every stream
        self.grown = 0           # bytes of window grown beyond it, all streams


class StreamRules:
    """A legacy stream: no credit, no EOF, a CLOSE without reason that nobody answers.

    Link thread only (the pump reads the constant attributes).
    """
    __slots__ = ("client_id", "state", "end_frame", "peer_eof")

    credited = False       # the sender waits for the peer's credit
    credit_limit = frames.MAX_CREDIT   # the most credit a sender may hold
    pump_closes = True     # the frame at local EOF (CLOSE) ends the stream: whoever
                           # flips the stream closed first (pump or link) sends it
    answers_close = False  # a CLOSE from the peer is answered
    v2 = False

    def __init__(self, client_id: int) -> None:
        self.client_id = client_id
        self.state = _OPEN
        self.peer_eof = False     # the peer's EOF came (v2)
        # What the pump sends when its local socket ends: CLOSE here, EOF in v2.
        self.end_frame = frames.encode(frames.CLOSE, client_id)

    def advance(self, event: StreamEvent) -> bool:
        """Take the table's move for `event`; False (state unchanged) when there is none."""
        to = STREAM.get((self.state, event))
        if to is None:
            return False
        self.state = to
        return True

    # ---- the peer's frames ----------------------------------------------------------------
    def received(self, size: int) -> Optional[str]:
        """`size` DATA bytes came: None, or why they break the rules."""
        return None

    def on_credit(self, payload: Any) -> int:
        """The peer's CREDIT: how much more we may send (0: not for this stream)."""
        return 0

    def on_eof(self, payload: Any) -> Optional[str]:
        """The peer's EOF: None (then `peer_eof` says whether the local write half is
        to be shut after what is queued), or why it breaks the rules.  A legacy
        stream (opened before version 2 was negotiated) ignores it."""
        return None

    def on_close(self, payload: Any) -> Tuple[int, str]:
        """The peer's CLOSE: (reason code, text); 0 is a plain close."""
        self.advance(StreamEvent.CLOSE_RECEIVED)
        return frames.CLOSE_DONE, ""

    # ---- this side ----------------------------------------------------------------------------
    def delivered(self, count: int, keeping_up: bool) -> int:
        """`count` bytes reached the local socket: the credit to return now (0: none)."""
        return 0

    def close_payload(self, code: int, text: str) -> bytes:
        """The payload of our CLOSE (a legacy CLOSE carries nothing)."""
        self.advance(StreamEvent.CLOSE_SENT)
        return b""

    def eof_sent(self) -> None:
        self.advance(StreamEvent.EOF_SENT)

    def finished(self) -> bool:
        """Both directions ended by EOF (v2): our CLOSE is due once all is delivered."""
        return False

    def released(self) -> None:
        self.advance(StreamEvent.RELEASED)

    @property
    def initial_credit(self) -> int:
        return 0


class V2StreamRules(StreamRules):
    """A version 2 stream: a credit window each way, EOF (half-close), CLOSE with a
    reason, every CLOSE answered."""
    __slots__ = ("window", "allowed", "to_return", "_budget", "_peer_window")

    credited = True
    pump_closes = False
    answers_close = True
    v2 = True

    def __init__(self, client_id: int, budget: GrowthBudget, peer_window: int) -> None:
        super().__init__(client_id)
        self.end_frame = frames.encode(frames.EOF, client_id)
        self._budget = budget
        self._peer_window = peer_window
        self.window = budget.window   # what the peer may have in flight to us
        self.allowed = budget.window  # what the peer may still send us
        self.to_return = 0            # delivered since our last CREDIT

    @property
    def initial_credit(self) -> int:
        return self._peer_window

    def received(self, size: int) -> Optional[str]:
        if size > self.allowed or self.peer_eof:
            return ("the peer sent DATA after its EOF" if self.peer_eof
                    else "the peer sent %d bytes past its window" % (size - self.allowed))
        self.allowed -= size
        return None

    def delivered(self, count: int, keeping_up: bool) -> int:
        """Credit goes back in steps of a quarter window (a CREDIT per byte would cost
        a frame each), with more window for a stream that keeps up (GROWTH)."""
        self.to_return += count
        if self.to_return < self.window >> 2 or self.peer_eof or self.state is not _OPEN \
                and self.state is not StreamState.HALF_CLOSED_HERE:
            return 0
        grant = self.to_return
        if keeping_up:
            budget = self._budget
            grow = min(self.window, budget.window * GROWTH - self.window,
                       budget.window * GROWTH_BUDGET_WINDOWS - budget.grown)
            if grow > 0:
                self.window += grow
                budget.grown += grow
                grant += grow
        self.allowed += grant
        self.to_return = 0
        return grant

    def on_credit(self, payload: Any) -> int:
        """Raises ProtocolError for a malformed CREDIT or one past the largest credit."""
        return frames.decode_credit(payload)

    def on_eof(self, payload: Any) -> Optional[str]:
        if self.peer_eof or len(payload):
            return "repeated or malformed EOF"
        if not self.advance(StreamEvent.EOF_RECEIVED):
            return None   # crossed our CLOSE: nothing to do
        self.peer_eof = True
        return None

    def on_close(self, payload: Any) -> Tuple[int, str]:
        try:
            code, text = frames.decode_close_reason(payload)
        except ProtocolError:
            code, text = frames.CLOSE_ERROR, "malformed CLOSE reason"
        self.advance(StreamEvent.RESET_RECEIVED if code == frames.CLOSE_RESET
                     else StreamEvent.CLOSE_RECEIVED)
        return code, text

    def close_payload(self, code: int, text: str) -> bytes:
        self.advance(StreamEvent.CLOSE_SENT)
        return frames.encode_close_reason(code, text) if code else b""

    def finished(self) -> bool:
        return self.state is StreamState.CLOSING

    def released(self) -> None:
        """A released stream gives its grown window back to the uplink's budget."""
        self.advance(StreamEvent.RELEASED)
        if self.window > self._budget.window:
            self._budget.grown -= self.window - self._budget.window
            self.window = self._budget.window


def failure_code(exc: BaseException) -> int:
    """The v2 CLOSE reason for a local socket that failed: a reset shows as one."""
    return frames.CLOSE_RESET if isinstance(exc, (ConnectionResetError, BrokenPipeError)) \
        else frames.CLOSE_ERROR
