"""Client ids of one tunnel: 1..255 round-robin, with the quarantine of ids this side closed."""

import time
from typing import Any, Dict, Optional, Tuple

MAX_CLIENTS = 255
SCORE_LIMIT = 3


class ClientIds:
    """Ids 1..255, handed out round-robin so a just-closed id is reused as late as possible.

    An id this side closed first is held: a legacy Lua device answers our
    CLOSE with its own, maybe after DATA it still had for the old stream, and
    that must not reach the id's next client.  A device seen to answer holds
    the id until its CLOSE comes (at most `quarantine` seconds); one not seen
    to (a tcprc device never answers) only for the `grace` given at close, the
    time DATA it sent before reading our CLOSE may take to arrive.
    """

    def __init__(self, quarantine: float = 10.0) -> None:
        self._next = 1
        # After a failed allocate: seconds until a held id frees, when a client
        # should wait that long; 0.0: refuse it.
        self.wait = 0.0
        self.quarantine = quarantine
        self._held: Dict[int, Tuple[float, float]] = {}   # id -> (closed at, grace)
        # Answers seen minus ids reused unanswered, within +-SCORE_LIMIT: one CLOSE
        # that merely crossed ours does not turn a tcprc device into an answerer.
        self._score = 0

    @property
    def answering(self) -> bool:
        return self._score > 0

    def hold(self, client_id: int, now: float, grace: float) -> None:
        self._held[client_id] = (now, grace)

    def answer(self, client_id: int, closing: bool = False) -> bool:
        """The device's CLOSE for an id not open here: True when it answers ours.

        `closing`: our CLOSE went out but the stream is still winding up.
        An answer after the hold ran out still counts, until the id is reused.
        """
        if self._held.pop(client_id, None) is None and not closing:
            return False
        self._score = min(self._score + 1, SCORE_LIMIT)
        return True

    def is_held(self, client_id: int) -> bool:
        return client_id in self._held

    def allocate(self, in_use: Dict[int, Any], now: Optional[float] = None) -> Optional[int]:
        """A free id, or None (then `wait` says whether to wait or refuse)."""
        self.wait = 0.0
        if len(in_use) >= MAX_CLIENTS:
            return None
        if now is None:
            now = time.monotonic()
        answering = self._score > 0
        soonest = 0.0
        for _ in range(MAX_CLIENTS):
            candidate = self._next
            self._next = candidate % MAX_CLIENTS + 1
            if candidate in in_use:
                continue
            held = self._held.get(candidate)
            if held is not None:
                closed_at, grace = held
                left = closed_at + (max(grace, self.quarantine) if answering else grace) - now
                if left > 0:
                    soonest = left if not soonest else min(soonest, left)
                    continue
                del self._held[candidate]   # a CLOSE for it from now on is the new client's
                self._score = max(self._score - 1, -SCORE_LIMIT)
            return candidate
        # Only held ids are free: a grace of a few round trips is worth waiting
        # for; an answering device's quarantine is not.
        if not answering:
            self.wait = soonest
        return None

    def held_count(self) -> int:
        return len(self._held)
