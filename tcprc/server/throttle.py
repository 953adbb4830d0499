"""Failed handshakes slow down the id they named, from the source they came from.

What the throttle is for: a secret has at least 128 bits, so guessing it
online is hopeless however fast one tries; what repeated failures do cost
is CPU (a thread and a handshake each) and log lines.  So a failure slows
down only the pair it belongs to, (source address, claimed id): the next
CHALLENGE for that pair waits 0.5 s, doubling per failure, at most 30 s
after the latest failure (never summed beyond that).  Other ids from the
same address are not slowed at all: gateways behind one carrier NAT share
an address, and one misconfigured or hostile neighbour must not lock the
others out.  A success clears its pair.  The concurrency of unauthenticated
handshakes per source is bounded separately (ServerApp's pending budget,
which drops held handshakes first), and log lines per source by SourceLog.
"""

from typing import Any, Dict, List, Tuple

from ..wire.session import MAX_CHALLENGE_HOLD

FIRST_PENALTY = 0.5                 # seconds, doubled per failure
MAX_PENALTY = MAX_CHALLENGE_HOLD    # the longest a CHALLENGE waits (docs/protocol.md)
FORGET_AFTER = 600.0     # a pair with no failure for this long starts afresh
MAX_PAIRS = 4096

Pair = Tuple[Any, str]


class AuthThrottle:
    """Per (source, id) pair (addr.source_key, the id a HELLO named): after its
    failures, that pair's next CHALLENGE waits.

    Thread-safe enough for its callers: every method is a few dict
    operations under the GIL, called from link threads.
    """

    def __init__(self) -> None:
        self._pairs: Dict[Pair, List[float]] = {}   # pair -> [failures, next attempt, last failure]

    def delay(self, source: Any, device_id: str, now: float) -> float:
        """Seconds the pair's next CHALLENGE must wait (0.0: none)."""
        entry = self._pairs.get((source, device_id))
        if entry is None:
            return 0.0
        if now - entry[2] > FORGET_AFTER:
            self._pairs.pop((source, device_id), None)
            return 0.0
        return max(0.0, entry[1] - now)

    def failed(self, source: Any, device_id: str, now: float) -> float:
        """Count a failure of the pair; the penalty it earned, in seconds."""
        pair = (source, device_id)
        entry = self._pairs.pop(pair, None)
        if entry is None or now - entry[2] > FORGET_AFTER:
            entry = [0, now, now]
            if len(self._pairs) >= MAX_PAIRS:   # forget the least recently failed
                del self._pairs[next(iter(self._pairs))]
        entry[0] += 1
        penalty = min(MAX_PENALTY, FIRST_PENALTY * 2 ** min(entry[0] - 1, 16))
        entry[1] = now + penalty   # from this failure: a wait never adds up past MAX_PENALTY
        entry[2] = now
        self._pairs[pair] = entry
        return penalty

    def succeeded(self, source: Any, device_id: str) -> None:
        """The pair proved its secret: its failures are forgotten."""
        self._pairs.pop((source, device_id), None)

    def __len__(self) -> int:
        return len(self._pairs)
