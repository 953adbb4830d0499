"""Failed handshakes slow their source down: a guessing attacker gets a few tries a minute."""

from typing import Any, Dict, List

FIRST_PENALTY = 0.5      # seconds, doubled per failure
MAX_PENALTY = 30.0
FORGET_AFTER = 600.0     # a source with no failure for this long starts afresh
MAX_SOURCES = 4096


class AuthThrottle:
    """Per source (addr.source_key): after failures, its next CHALLENGE waits.

    A success does not clear the count: a device with credentials of its own
    must not be able to reset its penalty while it guesses another id's.

    Thread-safe enough for its callers: every method is a few dict
    operations under the GIL, called from link threads.
    """

    def __init__(self) -> None:
        self._sources: Dict[Any, List[float]] = {}   # key -> [failures, next attempt, last failure]

    def delay(self, source: Any, now: float) -> float:
        """Seconds the source's next CHALLENGE must wait (0.0: none)."""
        entry = self._sources.get(source)
        if entry is None:
            return 0.0
        if now - entry[2] > FORGET_AFTER:
            self._sources.pop(source, None)
            return 0.0
        return max(0.0, entry[1] - now)

    def failed(self, source: Any, now: float) -> float:
        """Count a failure; the penalty it earned, in seconds."""
        entry = self._sources.pop(source, None)
        if entry is None or now - entry[2] > FORGET_AFTER:
            entry = [0, now, now]
            if len(self._sources) >= MAX_SOURCES:   # forget the least recently failed
                del self._sources[next(iter(self._sources))]
        entry[0] += 1
        penalty = min(MAX_PENALTY, FIRST_PENALTY * 2 ** min(entry[0] - 1, 16))
        entry[1] = max(entry[1], now) + penalty
        entry[2] = now
        self._sources[source] = entry
        return penalty

    def __len__(self) -> int:
        return len(self._sources)


class LateHellos:
    """Per source: it answered an OFFER after the server had taken it for legacy.

    The server waits for HELLO a few round trips of its own socket, which a
    relay or proxy in front of it hides; such a source would redial into the
    same too-short wait for ever, so from then on it gets the longest wait.
    Bounded like AuthThrottle; forgotten after FORGET_AFTER.
    """

    def __init__(self) -> None:
        self._sources: Dict[Any, float] = {}   # key -> when it was last late

    def note(self, source: Any, now: float) -> None:
        self._sources.pop(source, None)
        if len(self._sources) >= MAX_SOURCES:
            del self._sources[next(iter(self._sources))]
        self._sources[source] = now

    def recent(self, source: Any, now: float) -> bool:
        when = self._sources.get(source)
        return when is not None and now - when <= FORGET_AFTER
