"""Receive buffers as anonymous mappings, whose far pages go back when traffic calms.

A mapping costs memory only for the pages a read reached: an interactive
stream touches one page of its buffer.  But a stream or uplink that once
carried bulk data (a file copied over an ssh session that then stays open
for hours) would keep every page its biggest reads reached.  Pages tracks
how far reads reach and, after QUIET_READS reads in a row that all fit in
the first KEEP bytes, gives the rest back to the kernel (MADV_DONTNEED: the
next bulk read maps fresh zero pages).
"""

import mmap
from typing import Any

from ..wire.frames import FrameDecoder

KEEP = 64 * 1024      # page-aligned; what interactive traffic uses stays mapped
QUIET_READS = 32      # small reads in a row before the far pages are given back

_CAN_RELEASE = hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED")


def anonymous(size: int) -> mmap.mmap:
    """A private anonymous mapping of `size` bytes.

    Private: mmap(-1, ...) is MAP_SHARED by default, memory the kernel keeps
    as shmem, whose pages MADV_DONTNEED only unmaps from this process (RSS
    drops, the memory stays in use until the mapping is closed).
    """
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)


class Pages:
    """The pages of one mapping that reads reached.

    Callers check `end > KEEP or pages.wide` themselves before `note()`, so
    interactive traffic on a calm buffer costs no call.
    """
    __slots__ = ("_map", "wide", "_quiet")

    def __init__(self, mapping: mmap.mmap) -> None:
        self._map = mapping
        self.wide = False      # pages past KEEP were touched and not given back
        self._quiet = 0

    def note(self, end: int) -> None:
        """A read filled the buffer up to `end`; nothing past `end` is live."""
        if end > KEEP:
            self.wide = True
            self._quiet = 0
            return
        self._quiet += 1
        if self._quiet >= QUIET_READS:
            self.release()

    def release(self) -> None:
        """Give back the pages past KEEP now; nothing there may be live."""
        self.wide = False
        self._quiet = 0
        if _CAN_RELEASE and len(self._map) > KEEP:
            self._map.madvise(mmap.MADV_DONTNEED, KEEP, len(self._map) - KEEP)


class FrameBuffer(FrameDecoder):
    """The uplink's decoder over a mapped buffer, with the read that fills it.

    `receive()` is the engine's half of the wire decoder: recv_into the
    decoder's free space and report the count, in one call (every read of
    the uplink passes here).
    """

    def __init__(self, size: int = 1024 * 1024):
        # Mapped, not a zero-filled bytearray: an idle uplink pays only for
        # the pages its frames reached, and only until traffic calms down
        # (Pages).  1 MB: a bulk read holds 16 frames.
        super().__init__(anonymous(size))
        self._pages = Pages(self._buf)

    def receive(self, source: Any, flags: int = 0) -> int:
        """recv_into the free space of `source` (a socket or transport) and keep
        what came; 0 when the peer closed.  Raises what recv_into raises."""
        if self._start == self._end:   # all consumed: the whole buffer is free
            self._start = self._end = 0
            count = source.recv_into(self._view, 0, flags)
        else:
            count = source.recv_into(self.writable(), 0, flags)
        self._end += count
        if self._end > KEEP or self._pages.wide:
            self._pages.note(self._end)
        return count

    def calm(self) -> None:
        """Traffic stopped (the last stream closed): when nothing is held past
        the first KEEP bytes, give the pages there back now.  Not while
        payload views of the last read are in use: they may lie there."""
        if self._start == self._end:
            self._start = self._end = 0
        if self._pages.wide and self._end <= KEEP:
            self._pages.release()
