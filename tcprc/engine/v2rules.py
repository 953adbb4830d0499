"""The protocol-v2 half of a Link: credit windows, half-close, CLOSE reasons, heartbeats.

A mixin of engine.link.Link, split out so each file has one job: Link keeps
the uplink, the legacy rules and the stream table; these methods run in the
link thread and use Link's (self.streams, post(), close_stream(), _release(),
_watch_stream_write(), fail(), loop, session, settings).  See the rules in
docs/protocol.md, "Protocol version 2".
"""

import socket
import time
from typing import Any, Optional

from ..wire import frames as protocol
from .stream import SHUT, Stream

_monotonic = time.monotonic

# Window growth: over one TCP uplink, every byte queued in its socket buffers
# counts against a stream's window.  Loopback buffers megabytes there (a
# cellular path far less), so a fixed 256 KB window left a bulk stream
# waiting for credit (scripts/bench, 1 stream: 0.7x legacy; grown to 4x:
# 0.74x, 8x: 0.65x, 16x: 0.99x).  A stream whose local socket takes
# everything at once gets its window doubled at each CREDIT, up to GROWTH
# times the configured one, while the streams of one uplink hold at most
# GROWTH_BUDGET_WINDOWS windows beyond their own; a reader that falls behind
# stops growing.  Memory per side: window x streams + the budget, and both
# scale with `window`.
GROWTH = 16
GROWTH_BUDGET_WINDOWS = 64     # the budget, in configured windows (16 MB at 256 KB)


class V2Rules:
    """Link's v2 part; `v2` is False until the session negotiated it."""

    v2 = False
    window = 0                        # what each stream lets the peer send us
    peer_window = 0                   # what each stream may send the peer at first
    rtt: Optional[float] = None       # smoothed PING round trip, seconds
    _last_ping = 0.0
    grown = 0                         # bytes of window grown beyond `window`, all streams

    def upgrade(self, peer_window: int, detail: str) -> None:
        """The session's UPGRADED: v2 rules for every stream opened from now on."""
        self.v2 = True
        self.peer_window = peer_window
        self.window = self.session.window
        self._dispatch.update({protocol.CREDIT: self._on_credit, protocol.EOF: self._on_eof,
                               protocol.PING: self._on_ping, protocol.PONG: self._on_pong})
        self.on_upgraded(detail)
        self._heartbeat()

    def on_upgraded(self, detail: str) -> None:
        self.log.info("%s: protocol v2 (%s)", self.name, detail)

    def new_stream(self, client_id: int, peer: str) -> Stream:
        """A Stream under this uplink's rules (credit windows once v2)."""
        if self.v2:
            return Stream(client_id, peer, self.window, self.peer_window)
        return Stream(client_id, peer)

    def _delivered(self, stream: Stream, count: int) -> None:
        """`count` bytes of a v2 stream reached its local socket: credit goes back
        in steps of a quarter window (a CREDIT per byte would cost a frame each),
        with more window for a stream that keeps up (see GROWTH)."""
        stream.to_return += count
        if stream.to_return >= stream.window >> 2 and not stream.closed and not stream.peer_eof:
            grant = stream.to_return
            if not stream.pending:
                grow = min(stream.window, self.window * GROWTH - stream.window,
                           self.window * GROWTH_BUDGET_WINDOWS - self.grown)
                if grow > 0:
                    stream.window += grow
                    self.grown += grow
                    grant += grow
            self.post(protocol.CREDIT, stream.id, protocol.encode_credit(grant))
            stream.allowed += grant
            stream.to_return = 0

    def _forget_growth(self, stream: Stream) -> None:
        """A released stream gives its grown window back to the uplink's budget."""
        if stream.window > self.window:
            self.grown -= stream.window - self.window
            stream.window = self.window

    def _on_credit(self, client_id: int, payload: memoryview) -> None:
        stream = self.streams.get(client_id)
        if stream is None or not stream.window:
            return   # crossed our CLOSE
        try:
            count = protocol.decode_credit(payload)
        except protocol.ProtocolError as exc:
            self.close_stream(stream, "bad CREDIT: %s" % exc, code=protocol.CLOSE_ERROR)
            return
        if stream.credit + count > protocol.MAX_CREDIT:
            self.close_stream(stream, "the peer granted more than 2 GB of credit",
                              code=protocol.CLOSE_ERROR)
            return
        stream.add_credit(count)

    def _on_eof(self, client_id: int, payload: memoryview) -> None:
        stream = self.streams.get(client_id)
        if stream is None or not stream.window:
            return
        if stream.peer_eof or len(payload):
            self.close_stream(stream, "repeated or malformed EOF", code=protocol.CLOSE_ERROR)
            return
        stream.peer_eof = True
        if stream.sock is not None and not stream.pending:
            self._deliver_eof(stream)
        # else: stream_connected or the drain delivers it

    def _deliver_eof(self, stream: Stream) -> None:
        """The peer's EOF, after every byte before it: the local socket's write half ends."""
        try:
            stream.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._maybe_finish(stream)

    def _maybe_finish(self, stream: Stream) -> None:
        """Both directions ended (EOF each way, all delivered): CLOSE, and release."""
        if not (stream.pump_done and stream.sent_eof and stream.peer_eof) or stream.pending \
                or self.streams.get(stream.id) is not stream:
            return
        del self.streams[stream.id]
        self.session.closed_here(stream.id, time.monotonic())
        if stream.mark_closed():
            self.post(protocol.CLOSE, stream.id)
        self.on_stream_closed(stream, "closed both ways")
        self._release(stream)

    def _abort(self, stream: Stream) -> None:
        """End the local socket with RST once its pump is out of recv()."""
        stream.abort = True
        stream.state = SHUT
        stream.drop_pending()
        if stream.sock is None:
            return   # still connecting: stream_connected cuts it
        self._watch_stream_write(stream, False)
        if stream.pump_done:
            self._release(stream)
            return
        try:
            stream.sock.shutdown(socket.SHUT_RD)   # wakes the pump; sends nothing
        except OSError:
            pass

    def on_stream_failed(self, stream: Stream, code: int, text: str) -> None:
        """The peer's CLOSE said why the stream failed (v2)."""
        self.log.info("%s: client %d (%s) closed by peer: %s%s", self.name, stream.id,
                      stream.peer, protocol.close_reason_name(code),
                      ": " + text if text else "")

    def _on_ping(self, client_id: int, payload: memoryview) -> None:
        try:
            self.post(protocol.PONG, 0, protocol.decode_ping(payload))
        except protocol.ProtocolError as exc:
            self.fail("malformed PING: %s" % exc)

    def _on_pong(self, client_id: int, payload: memoryview) -> None:
        try:
            sample = (_monotonic_ns() - protocol.decode_pong(payload)) / 1e9
        except protocol.ProtocolError as exc:
            self.fail("malformed PONG: %s" % exc)
            return
        if not 0 <= sample < 3600:
            return   # not an echo of ours
        self.rtt = sample if self.rtt is None else 0.875 * self.rtt + 0.125 * sample

    def _heartbeat(self) -> None:
        """PING every heartbeat_interval; end the uplink after heartbeat_timeout of silence."""
        if self._closing or self.end_reason:
            return
        interval = self.settings.heartbeat_interval
        timeout = self.settings.heartbeat_timeout
        now = _monotonic()
        silent = now - self.last_heard
        if silent >= timeout:
            self.fail("no frame from the peer for %.0f s: heartbeat timeout" % silent)
            return
        if now - self._last_ping >= interval:
            self._last_ping = now
            self.post(protocol.PING, 0, protocol.encode_ping(_monotonic_ns()))
        self.loop.call_later(max(0.05, min(interval, timeout / 8, timeout - silent)),
                             self._heartbeat)


def _monotonic_ns() -> int:
    return int(_monotonic() * 1e9)   # time.monotonic_ns is 3.7+, but keeps one clock


def failure_code(exc: OSError) -> int:
    """The v2 CLOSE reason for a local socket that failed: a reset shows as one."""
    return protocol.CLOSE_RESET if isinstance(exc, (ConnectionResetError, BrokenPipeError)) \
        else protocol.CLOSE_ERROR


def close_reason(payload: memoryview) -> Any:
    """(code, text) of a v2 CLOSE; a malformed reason counts as an error."""
    try:
        return protocol.decode_close_reason(payload)
    except protocol.ProtocolError:
        return protocol.CLOSE_ERROR, "malformed CLOSE reason"
