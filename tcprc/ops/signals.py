"""Signals of a running agent: SIGTERM/SIGINT stop it, SIGHUP reloads its config."""

import os
import select
import signal
from typing import Callable, Optional, Tuple


class Signals:
    """SIGTERM/SIGINT ask to stop, SIGHUP to reload.

    The handlers only set flags: locks, logging and I/O are not safe inside a
    handler. wait() in the main thread turns the flags into actions; it sleeps
    in select() on the signal wakeup fd, so a signal acts at once.
    """

    # The sleep is bounded all the same: a signal delivered to another thread
    # wakes select() before its Python handler has run in this one, and the
    # flag it sets must still act, within a TICK.
    TICK = 1.0

    def __init__(self) -> None:
        self.stop_requested = False
        self.reload_requested = False
        self.stop_signal = 0
        self._wakeup: Optional[Tuple[int, int, int]] = None   # read end, write end, previous fd

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop(self, signum, frame) -> None:
        self.stop_signal = signum
        self.stop_requested = True

    def _on_hup(self, signum, frame) -> None:
        self.reload_requested = True

    def arm(self) -> None:
        """The wakeup pipe, made after detach() (it closes every inherited fd) and before
        the agent opens its ports: once its control socket is there, its descriptors
        are all open."""
        if self._wakeup is not None:
            return
        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        self._wakeup = rfd, wfd, signal.set_wakeup_fd(wfd)

    def wait(self, on_reload: Callable[[], None]) -> None:
        """Run until a stop signal, reloading on each SIGHUP."""
        self.arm()
        assert self._wakeup is not None
        rfd, wfd, previous = self._wakeup
        try:
            # A signal that came before set_wakeup_fd only set its flag: the
            # flags are checked before every sleep.
            while not self.stop_requested:
                if self.reload_requested:
                    self.reload_requested = False
                    on_reload()
                    continue
                if select.select([rfd], [], [], self.TICK)[0]:
                    try:
                        os.read(rfd, 512)
                    except BlockingIOError:
                        pass
        finally:
            self._wakeup = None
            signal.set_wakeup_fd(previous)
            os.close(rfd)
            os.close(wfd)
