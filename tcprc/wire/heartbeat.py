"""Version 2's heartbeats without I/O: when to PING, when silence ends the uplink, the RTT.

The driver calls tick() when the delay it returned is over, with the time and
when it last heard a byte from the peer; PINGs and PONGs of the peer go to
on_ping() and on_pong().  Times are the caller's (monotonic seconds), so a
test drives them.
"""

from typing import List, Optional, Tuple

from . import frames
from .actions import Fail, Send


class Heartbeat:
    """PING every `interval`; end the uplink after `timeout` of silence."""

    def __init__(self, interval: float, timeout: float) -> None:
        self.interval = interval
        self.timeout = timeout
        self.rtt: Optional[float] = None   # smoothed PING round trip, seconds
        self._last_ping = -interval
        self._probe: Optional[bytes] = None   # the stamp of an unanswered probe()
        self.probe_answered = False

    def tick(self, now: float, last_heard: float) -> Tuple[List, float]:
        """(actions, seconds until the next tick)."""
        silent = now - last_heard
        if silent >= self.timeout:
            return [Fail("no frame from the peer for %.0f s: heartbeat timeout" % silent)], 0.0
        actions: List = []
        if now - self._last_ping >= self.interval:
            self._last_ping = now
            actions.append(Send(frames.PING, 0, frames.encode_ping(int(now * 1e9))))
        return actions, max(0.05, min(self.interval, self.timeout / 8, self.timeout - silent))

    def probe(self, now: float) -> Send:
        """A PING whose PONG answers "is this uplink alive right now" (probe_answered)."""
        stamp = frames.encode_ping(int(now * 1e9))
        self._probe, self.probe_answered = stamp, False
        return Send(frames.PING, 0, stamp)

    def on_ping(self, payload) -> List:
        try:
            return [Send(frames.PONG, 0, frames.decode_ping(payload))]
        except frames.ProtocolError as exc:
            return [Fail("malformed PING: %s" % exc)]

    def on_pong(self, payload, now: float) -> List:
        try:
            sample = (int(now * 1e9) - frames.decode_pong(payload)) / 1e9
        except frames.ProtocolError as exc:
            return [Fail("malformed PONG: %s" % exc)]
        if self._probe is not None and bytes(payload) == self._probe:
            self.probe_answered = True
        if 0 <= sample < 3600:   # else not an echo of ours
            self.rtt = sample if self.rtt is None else 0.875 * self.rtt + 0.125 * sample
        return []
