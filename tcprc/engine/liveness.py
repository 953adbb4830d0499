"""Liveness of the threads an agent cannot live without, for `health` and the watchdog.

A process can stay alive while the thread that keeps its tunnel up is gone
(an exception nobody expected) or stuck (a call that never returns): the
control socket still answers, so a watchdog that only asks "do you answer"
never restarts it.  Each critical thread is watched here: it beats as it
makes progress (a loop thread on a timer, a supervisor in its waits), and
`problems()` names every watched thread that has ended or has not beaten
within its limit.  Fault barriers keep the threads running through the
errors we can foresee; this catches the rest within a bounded time.
"""

import threading
import time
from typing import Dict, List, Optional

TICK = 5.0            # seconds between the beats of a loop thread
DEFAULT_LIMIT = 60.0  # seconds without a beat after which a thread counts as stuck


class Liveness:
    """Watched threads by name; every method is thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # name -> [thread, last beat, limit]
        self._watched: Dict[str, List] = {}

    def watch(self, name: str, thread: Optional[threading.Thread] = None,
              limit: float = DEFAULT_LIMIT) -> None:
        """Watch `thread` (the calling one by default) under `name`, from now."""
        with self._lock:
            self._watched[name] = [thread or threading.current_thread(), time.monotonic(), limit]

    def set_limit(self, name: str, limit: float) -> None:
        with self._lock:
            entry = self._watched.get(name)
            if entry is not None:
                entry[2] = limit

    def beat(self, name: str) -> None:
        entry = self._watched.get(name)
        if entry is not None:
            entry[1] = time.monotonic()   # one store: no lock needed

    def forget(self, name: str) -> None:
        """A thread that ends on purpose (the agent stopping) is no problem."""
        with self._lock:
            self._watched.pop(name, None)

    def problems(self, now: Optional[float] = None) -> List[str]:
        """One line per watched thread that ended or made no progress in time."""
        now = time.monotonic() if now is None else now
        with self._lock:
            entries = sorted(self._watched.items())
        found = []
        for name, (thread, last, limit) in entries:
            if not thread.is_alive():
                found.append("thread %s has ended" % name)
            elif now - last > limit:
                found.append("thread %s made no progress for %.0f s (limit %.0f s)"
                             % (name, now - last, limit))
        return found
