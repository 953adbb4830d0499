"""Rate-limited log lines: a noisy peer or source cannot flood the log."""

import logging
import threading
import time
from typing import Any, Dict, List


class LimitedLog:
    """At most one line per `interval` seconds for a noisy event; counts the rest."""

    def __init__(self, logger: logging.Logger, interval: float = 1.0):
        self._log = logger
        self._interval = interval
        self._last = -interval
        self._suppressed = 0

    def warning(self, msg: str, *args: Any) -> None:
        self.log(logging.WARNING, msg, *args)

    def error(self, msg: str, *args: Any, exc_info: Any = None) -> None:
        self.log(logging.ERROR, msg, *args, exc_info=exc_info)

    def log(self, level: int, msg: str, *args: Any, exc_info: Any = None) -> None:
        now = time.monotonic()
        if now - self._last < self._interval:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += " (%d similar lines suppressed)" % self._suppressed
            self._suppressed = 0
        self._last = now
        self._log.log(level, msg, *args, exc_info=exc_info)


class SourceLog:
    """Rate-limited lines per source address: a noisy source cannot hide another's.

    Each source may log `burst` lines at once, then `rate` lines a second; all
    sources together ten times that, so many sources cannot flood either.
    Suppressed lines are counted into the source's next line.  The table keeps
    the `sources` most recently heard ones.
    """

    def __init__(self, logger: logging.Logger, burst: int = 10, rate: float = 1.0,
                 sources: int = 256):
        self._log = logger
        self._burst = float(burst)
        self._rate = rate
        self._max = sources
        self._lock = threading.Lock()
        self._sources: Dict[Any, List[float]] = {}   # key -> [tokens, stamp, suppressed]
        self._all = [10.0 * burst, time.monotonic(), 0]

    @staticmethod
    def _take(entry: List[float], now: float, burst: float, rate: float) -> bool:
        entry[0] = min(burst, entry[0] + (now - entry[1]) * rate)
        entry[1] = now
        if entry[0] < 1:
            entry[2] += 1
            return False
        entry[0] -= 1
        return True

    def log(self, source: Any, level: int, msg: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            entry = self._sources.pop(source, None)
            if entry is None:
                entry = [self._burst, now, 0]
                if len(self._sources) >= self._max:   # forget the least recently heard
                    del self._sources[next(iter(self._sources))]
            self._sources[source] = entry
            if not self._take(entry, now, self._burst, self._rate) \
                    or not self._take(self._all, now, 10 * self._burst, 10 * self._rate):
                return
            mine, others = int(entry[2]), int(self._all[2])
            entry[2] = self._all[2] = 0
        if mine:
            msg += " (%d similar lines from this source suppressed)" % mine
        if others:
            msg += " (%d lines suppressed over all sources)" % others
        self._log.log(level, msg, *args)

    def warning(self, source: Any, msg: str, *args: Any) -> None:
        self.log(source, logging.WARNING, msg, *args)

    def info(self, source: Any, msg: str, *args: Any) -> None:
        self.log(source, logging.INFO, msg, *args)

    def of(self, source: Any) -> "_OneSource":
        return _OneSource(self, source)


class _OneSource:
    """A SourceLog bound to one source, usable where a LimitedLog is."""

    def __init__(self, owner: SourceLog, source: Any):
        self._owner = owner
        self._source = source

    def warning(self, msg: str, *args: Any) -> None:
        self._owner.log(self._source, logging.WARNING, msg, *args)

    def info(self, msg: str, *args: Any) -> None:
        self._owner.log(self._source, logging.INFO, msg, *args)
